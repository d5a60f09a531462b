"""A preprocessing cache: encode a Pick-a-Pic-format dataset once, train from latents.

The public recipe decodes two JPEGs, resizes them and runs the VAE encoder and the text encoder at
*every* step, though none of that depends on the weights being trained. ``build_cache`` does it once
and stores, per row and per orientation (plain, and flipped when ``random_flip``), the VAE posterior's
mean and std — training still *samples* a latent each step, ``mean + std * randn``, exactly as
``latent_dist.sample()`` does — plus one text embedding per distinct caption (SDXL: and the pooled
embedding and per-image ``time_ids``). A ``manifest.json`` records the model, resolution and dataset;
:func:`check_cache` refuses a cache made for anything else.

Rows are kept in the source order, ties and undecodable rows included (flagged), so a run from the cache
visits the same pairs in the same order, with the same flips and caption dropout, as a run from the
images with the same seed — and gives the same losses (``tests/test_cache.py``).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import DataError, PairTransform, SkipRow, decode_image, drop_caption, load_pickapic, pair_order
from .models import encode_prompts, load_parts

CACHE_VERSION = 1


def _fingerprint(config) -> dict:
    """What a cache depends on; a run must match it to use the cache."""
    local = Path(config.pretrained).expanduser()
    pretrained = str(local.resolve()) if local.exists() else config.pretrained
    return {"pretrained": pretrained, "vae": config.vae, "resolution": config.resolution}


def encode_rows(parts, rows: list[dict], transform: PairTransform, flips: int):
    """VAE posterior mean/std ``(n, 2, flips, C, h, w)``, time ids ``(n, 2, flips, 6)`` and ok flags."""
    pixels, time_ids, ok = [], [], []
    for row in rows:
        try:
            imgs = [decode_image(row["jpg_0"]), decode_image(row["jpg_1"])]
        except SkipRow:
            imgs = None
        ok.append(imgs is not None)
        size = transform.resolution
        for img in imgs or [None, None]:
            for flip in (False, True)[:flips]:  # the very transform training applies, per orientation
                x, hw, crop = (transform.transform_image(img, 0.5, 0.5, flip) if img is not None
                               else (torch.zeros(3, size, size), (size, size), (0, 0)))
                pixels.append(x)
                time_ids.append([*hw, *crop, size, size])
    batch = torch.stack(pixels).to(parts.vae.device, parts.vae.dtype)  # (n * 2 * flips, 3, H, W)
    with torch.no_grad():
        dist = parts.vae.encode(batch).latent_dist
    shape = (len(rows), 2, flips, *dist.mean.shape[1:])
    return (dist.mean.float().cpu().reshape(shape), dist.std.float().cpu().reshape(shape),
            torch.tensor(time_ids, dtype=torch.long).reshape(len(rows), 2, flips, 6), torch.tensor(ok))


def build_cache(config, out_dir: str | Path, batch_size: int = 64, shard_size: int = 4096, parts=None,
                dataset=None, extra: dict | None = None) -> Path:
    """Encode ``config.dataset`` (split ``config.split``) for ``config.pretrained`` at ``config.resolution``.

    ``parts`` and ``dataset``: already loaded models (on their device) and rows, else loaded here; ``extra``:
    more entries for the manifest (the automatic cache records its source files there).

    Writes ``manifest.json``, ``text.safetensors`` and ``shard-<k>.safetensors`` to ``out_dir``.
    Center crops only (a random crop cannot be precomputed); both orientations when ``random_flip``.
    Every file is written under a temporary name and renamed into place, and ``manifest.json`` (what makes
    the folder a cache) is removed first and written last: a cut build never looks finished.
    """
    from tqdm.auto import tqdm

    if config.random_crop:
        raise DataError("a latent cache stores center crops: set random_crop=False to build or use one")
    if config.streaming:
        raise DataError("a latent cache is built from a local or downloaded split, not a stream")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    parts = parts or load_parts(config.pretrained, config.vae, config.prediction_type)
    ds = load_pickapic(config.dataset, config.split) if dataset is None else dataset
    transform, flips = PairTransform(config.resolution), 2 if config.random_flip else 1
    captions = sorted({c or "" for c in ds["caption"]} | {""})
    embeds, pooled = zip(*[encode_prompts(parts, captions[i:i + batch_size])
                           for i in range(0, len(captions), batch_size)])
    text = {"embeds": torch.cat(embeds).float().contiguous()}
    if parts.is_sdxl:
        text["pooled"] = torch.cat(pooled).float().contiguous()
    _save_atomic(text, out / "text.safetensors")
    caption_id = {c: i for i, c in enumerate(captions)}
    for start in tqdm(range(0, len(ds), shard_size), desc="caching latents", unit="shard"):
        rows = ds.select(range(start, min(start + shard_size, len(ds))))
        chunks = [encode_rows(parts, [rows[j] for j in range(i, min(i + batch_size, len(rows)))], transform, flips)
                  for i in range(0, len(rows), batch_size)]
        mean, std, time_ids, ok = (torch.cat(t) for t in zip(*chunks))
        _save_atomic({"mean": mean, "std": std, "time_ids": time_ids, "ok": ok,
                      "caption_id": torch.tensor([caption_id[c or ""] for c in rows["caption"]])},
                     out / f"shard-{start // shard_size:05d}.safetensors")
    manifest = {"version": CACHE_VERSION, **_fingerprint(config), "dataset": config.dataset, "split": config.split,
                "num_rows": len(ds), "random_flip": config.random_flip, "is_sdxl": parts.is_sdxl,
                "shard_size": shard_size, "scaling_factor": parts.vae.config.scaling_factor,
                "captions": captions, "label_0": [None if x is None else float(x) for x in ds["label_0"]],
                **(extra or {})}
    tmp = out / ".tmp-manifest.json"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, out / "manifest.json")
    return out


def _save_atomic(tensors: dict, path: Path) -> None:
    """``save_file`` to a temporary name, then rename into place."""
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def check_cache(path: str | Path, config) -> dict:
    """The cache's manifest, or a :class:`DataError` saying why it does not fit ``config``."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.exists():
        raise DataError(f"{path} is not a latent cache (no manifest.json): build one with `dpo-tutorial cache`")
    manifest = json.loads(manifest_path.read_text())
    wanted = _fingerprint(config)
    diffs = [f"{k}: cache {manifest.get(k)!r} vs run {v!r}" for k, v in wanted.items() if manifest.get(k) != v]
    if config.random_flip and not manifest["random_flip"]:
        diffs.append("random_flip: the cache has no flipped latents")
    if config.random_crop:
        diffs.append("random_crop: a cache stores center crops only")
    if manifest.get("version") != CACHE_VERSION:
        diffs.append(f"version: cache {manifest.get('version')} vs {CACHE_VERSION}")
    if diffs:
        raise DataError(f"the latent cache {path} was made for something else ({'; '.join(diffs)}); "
                        "rebuild it with `dpo-tutorial cache` for this model and resolution")
    return manifest


@dataclass
class CachedPair:
    """One winner-first pair from the cache (the counterpart of ``PairExample``)."""

    caption: str
    caption_id: int
    mean: torch.Tensor  # (2, C, h, w): winner, loser
    std: torch.Tensor
    time_ids: torch.Tensor  # (2, 6)


class LatentCache:
    """Map-style view of a cache that :class:`dpo_tutorial.data.PairStream` iterates like a dataset."""

    def __init__(self, path: str | Path, config):
        self.path = Path(path)
        self.manifest = check_cache(path, config)
        self.transform = PairTransform(config.resolution, False, config.random_flip)
        self.empty_prompt_prob = config.empty_prompt_prob
        with safe_open(str(self.path / "text.safetensors"), "pt") as f:
            self.text = {k: f.get_tensor(k) for k in f.keys()}
        self._shards: dict[int, object] = {}  # open safetensors handles, one per shard
        self.empty_id = self.manifest["captions"].index("")

    def __len__(self) -> int:
        return self.manifest["num_rows"]

    def __getitem__(self, key):
        """``cache["label_0"]``: all labels; ``cache[i]``: row ``i`` as ``{"label_0", "index"}``."""
        if key == "label_0":
            return self.manifest["label_0"]
        return {"label_0": self.manifest["label_0"][key], "index": int(key)}

    def _row(self, index: int) -> dict:
        """One row's tensors, read from the memory-mapped shard without loading the rest of it."""
        k, j = divmod(index, self.manifest["shard_size"])
        if k not in self._shards:
            self._shards[k] = safe_open(str(self.path / f"shard-{k:05d}.safetensors"), "pt")
        f = self._shards[k]
        return {name: f.get_slice(name)[j:j + 1][0] for name in ("mean", "std", "time_ids", "ok", "caption_id")}

    def make(self, row: dict, rng: random.Random) -> CachedPair:
        """Same random decisions as ``make_example`` (flip, caption dropout), looked up instead of computed."""
        order = pair_order(row["label_0"])
        if order in ("tie", "invalid"):
            raise SkipRow(order)
        cached = self._row(row["index"])
        if not bool(cached["ok"]):
            raise SkipRow("undecodable")
        _, _, flip = self.transform.decide(rng)
        sides = [0, 1] if order == "0" else [1, 0]  # winner first
        caption_id = int(cached["caption_id"])
        caption = drop_caption(self.manifest["captions"][caption_id], rng, self.empty_prompt_prob)
        return CachedPair(caption, caption_id if caption else self.empty_id, cached["mean"][sides, int(flip)],
                          cached["std"][sides, int(flip)], cached["time_ids"][sides, int(flip)])

    def collate(self, pairs: list[CachedPair]) -> dict:
        """The cached counterpart of ``collate_pairs``: ``(2B, C, h, w)`` winners then losers."""
        ids = torch.tensor([p.caption_id for p in pairs])
        batch = {"latent_mean": torch.cat([torch.stack([p.mean[0] for p in pairs]),
                                           torch.stack([p.mean[1] for p in pairs])]),
                 "latent_std": torch.cat([torch.stack([p.std[0] for p in pairs]),
                                          torch.stack([p.std[1] for p in pairs])]),
                 "time_ids": torch.cat([torch.stack([p.time_ids[0] for p in pairs]),
                                        torch.stack([p.time_ids[1] for p in pairs])]),
                 "prompt_embeds": self.text["embeds"][ids], "captions": [p.caption for p in pairs]}
        if "pooled" in self.text:
            batch["pooled"] = self.text["pooled"][ids]
        return batch


# ------------------------------------------------------------------ the automatic cache of a training run
AUTO_CACHE_DIR = "latent-cache"  # inside the run's output folder
AUTO_CACHE_MAX_BYTES = 4 * 2**30  # above this the run reads images instead (a user can still build one on purpose)


def source_files(config) -> list[list]:
    """``[path, size, mtime_ns]`` of each local parquet file of the run's split: an edited file invalidates a cache."""
    from .data import local_parquet_files

    return [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns]
            for f in local_parquet_files(Path(config.dataset).expanduser(), config.split)]


def settings_skip_reason(config) -> str | None:
    """The part of :func:`auto_cache_skip_reason` the settings alone decide (no rows read): a cache folder is
    given, ``cache_latents`` is off, the dataset is not a local folder or file, or crops are random."""
    from .hub import is_hub_id

    if config.cache:
        return "a cache folder is given"
    if not config.cache_latents:
        return "cache_latents is off"
    if config.streaming or is_hub_id(config.dataset) or not Path(config.dataset).expanduser().exists():
        return "the dataset is not a local folder or file"
    if config.random_crop:
        return "random_crop needs the images (a cache stores center crops)"
    return None


def auto_cache_skip_reason(config, num_rows: int, latent_bytes: int, world_size: int = 1) -> str | None:
    """Why a run should read images rather than build its own latent cache, or ``None`` when it should build one.

    Worth it when the dataset is a local folder or file (not the Hub, not a stream), crops are centred, and
    the run draws more pairs than the cache costs to build (``num_rows`` pairs, twice when ``random_flip``
    encodes both orientations); possible when the cache (``latent_bytes`` per row) stays under
    :data:`AUTO_CACHE_MAX_BYTES`.
    """
    reason = settings_skip_reason(config)
    if reason:
        return reason
    drawn = config.max_steps * config.batch_size * config.grad_accum * world_size
    flips = 2 if config.random_flip else 1
    if drawn <= flips * num_rows:
        return f"the run draws {drawn} pairs, not more than the {flips * num_rows} encodings a cache costs"
    if num_rows * latent_bytes > AUTO_CACHE_MAX_BYTES:
        return f"the cache would take {num_rows * latent_bytes / 2**30:.1f} GiB"
    return None


def latent_bytes_per_row(parts, config) -> int:
    """Bytes one row takes in a cache: posterior mean and std of two images in each orientation, float32."""
    from .models import latent_elements

    return 2 * 2 * (2 if config.random_flip else 1) * latent_elements(parts.vae.config, config.resolution) * 4


def auto_cache(config, parts, world_size: int = 1) -> Path | None:
    """The latent cache ``train`` reads from: ``<output_dir>/latent-cache``, built now with the run's own ``parts``
    (or reused when it was built for this model, resolution and unchanged source files), or ``None`` when
    :func:`auto_cache_skip_reason` says images are better. Same losses either way (``tests/test_cache.py``)."""
    if settings_skip_reason(config):  # before reading any rows
        return None
    try:
        dataset = load_pickapic(config.dataset, config.split)
    except DataError:
        return None  # the image path reports the problem in its own words
    if auto_cache_skip_reason(config, len(dataset), latent_bytes_per_row(parts, config), world_size):
        return None
    folder = Path(config.output_dir) / AUTO_CACHE_DIR
    stamp = source_files(config)
    try:
        manifest = check_cache(folder, config)
        if manifest.get("source_files") == stamp and manifest.get("split") == config.split:
            return folder
    except DataError:
        pass
    return build_cache(config, folder, parts=parts, dataset=dataset, extra={"source_files": stamp})
