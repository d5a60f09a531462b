"""A tiny, offline CLIP tokenizer built from a word list.

Real Stable Diffusion checkpoints ship a 49,408-token byte-level BPE tokenizer. The toy model and the
test fixtures need the *same class* (``transformers.CLIPTokenizer``) without any download, so we build
one here: the vocabulary holds the 256 byte characters (plain and with the end-of-word marker
``</w>``), the two special tokens, and a chain of BPE merges per word so that every word in ``words``
becomes exactly one token. Unknown words still tokenize (into characters), as with real BPE.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for the bytes 0..255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that fuse ``word`` into the single token ``word</w>``."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, current = [], symbols[0]
    for nxt in symbols[1:]:
        merges.append((current, nxt))
        current = current + nxt
    return merges


def clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and BPE merge list giving one token per word in ``words``."""
    byte_chars = _byte_chars()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    for word in sorted({w.lower() for w in words if len(w) > 1}):
        for left, right in _word_merges(word):
            line = f"{left} {right}"
            if line not in merges:
                merges.append(line)
            if left + right not in tokens:
                tokens.append(left + right)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(words: list[str], out_dir: str | Path, model_max_length: int = 16):
    """Write a CLIP tokenizer to ``out_dir`` whose vocabulary makes each of ``words`` one token.

    The files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) are exactly what a real SD
    checkpoint's ``tokenizer/`` folder holds, so ``CLIPTokenizer.from_pretrained(out_dir)`` reloads it
    offline with any transformers version. ``model_max_length`` plays the role of SD's 77-token limit.
    Returns the loaded tokenizer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(words)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": model_max_length, "bos_token": BOS, "eos_token": EOS,
              "unk_token": EOS, "pad_token": EOS, "tokenizer_class": "CLIPTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(out))
