"""A preprocessing cache: encode a Pick-a-Pic-format dataset once, train from latents.

The public recipe decodes two JPEGs, resizes them and runs the VAE encoder and the text encoder at
*every* step, though none of that depends on the weights being trained. ``build_cache`` does it once
and stores, per row and per orientation (plain, and flipped when ``random_flip``), the VAE posterior's
mean and std — training still *samples* a latent each step, ``mean + std * randn``, exactly as
``latent_dist.sample()`` does — plus one text embedding per distinct caption (SDXL: and the pooled
embedding and per-image ``time_ids``). A ``manifest.json`` records the model, resolution, dataset and
split; :func:`check_cache` refuses a cache made for anything else.

A cache is a folder of files read back later, so it is checked when opened (:func:`check_cache`): the
manifest's fields and types, the shards' count, tensor names, dtypes and shapes against the manifest and
the model, caption ids within range, and finite values. Each problem is one :class:`CacheError` naming
the file; a run's own automatic cache is rebuilt instead (:func:`auto_cache`).

Rows are kept in the source order, ties and undecodable rows included (flagged), so a run from the cache
visits the same pairs in the same order, with the same flips and caption dropout, as a run from the
images with the same seed — and gives the same losses (``tests/test_cache.py``).
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import files
from .data import (
    DataError,
    PairTransform,
    SkipRow,
    decode_image,
    drop_caption,
    load_pickapic,
    local_parquet_files,
    winner_first,
    winners_then_losers,
)
from .hub import is_hub_id
from .models import encode_prompts, latent_shape, load_parts

CACHE_VERSION = 2  # 2: the manifest records the latents' shape; the dataset and split are checked


class CacheError(DataError):
    """A latent cache cannot be used: made for something else, incomplete or damaged; the message names the file."""


def _resolved(path_or_id: str | None) -> str | None:
    """A local path resolved (so ``./data`` equals its absolute path); a hub id unchanged."""
    if not path_or_id:
        return path_or_id
    local = Path(path_or_id).expanduser()
    return str(local.resolve()) if local.exists() else path_or_id


def _fingerprint(config) -> dict:
    """What a cache depends on; a run must match it to use the cache."""
    return {"pretrained": _resolved(config.pretrained), "vae": config.vae, "resolution": config.resolution,
            "dataset": _resolved(config.dataset), "split": config.split}


def encode_rows(parts, rows: list[dict], transform: PairTransform, flips: int, vae_batch: int):
    """VAE posterior mean/std ``(n, 2, flips, C, h, w)``, time ids ``(n, 2, flips, 6)`` and ok flags of ``rows``.

    The ``n * 2 * flips`` images go through the VAE encoder ``vae_batch`` at a time (the run's
    ``vae_encode_batch_size``): at 512 px one image's encoder activations take ~0.5 GB in fp32.
    """
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
    batch = torch.stack(pixels)  # (n * 2 * flips, 3, H, W)
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, batch.shape[0], vae_batch):
            chunk = batch[start:start + vae_batch].to(parts.vae.device, parts.vae.dtype)
            dist = parts.vae.encode(chunk).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    shape = (len(rows), 2, flips, *mean.shape[1:])
    return (mean.reshape(shape), std.reshape(shape), torch.tensor(time_ids, dtype=torch.long).reshape(len(rows), 2,
            flips, 6), torch.tensor(ok))


def build_cache(config, out_dir: str | Path, batch_size: int = 64, shard_size: int = 4096, parts=None,
                dataset=None, extra: dict | None = None) -> Path:
    """Encode ``config.dataset`` (split ``config.split``) for ``config.pretrained`` at ``config.resolution``.

    ``parts`` and ``dataset``: already loaded models (on their device) and rows, else loaded here; ``extra``:
    more entries for the manifest (the automatic cache records its source files there). Rows are encoded
    ``batch_size`` at a time, their images ``config.vae_encode_batch_size`` per VAE call.

    Writes ``manifest.json``, ``text.safetensors`` and ``shard-<k>.safetensors`` to ``out_dir``, a new or empty
    folder or an earlier cache (a folder holding anything else is refused). Center crops only (a random crop
    cannot be precomputed); both orientations when ``random_flip``. Every file is written atomically, and
    ``manifest.json`` (what makes the folder a cache) is removed first and written last: a cut build never
    looks finished.
    """
    if config.random_crop:
        raise DataError("a latent cache stores center crops: set random_crop=False to build or use one")
    if config.streaming:
        raise DataError("a latent cache is built from a local or downloaded split, not a stream")
    out = files.claim_folder(out_dir, "cache", legacy=_older_cache)
    (out / "manifest.json").unlink(missing_ok=True)
    for old in out.glob("shard-*.safetensors"):
        old.unlink()
    parts = parts or load_parts(config.pretrained, config.vae, config.prediction_type)
    ds = load_pickapic(config.dataset, config.split) if dataset is None else dataset
    transform, flips = PairTransform(config.resolution), 2 if config.random_flip else 1
    captions = sorted({c or "" for c in ds["caption"]} | {""})
    embeds, pooled = zip(*[encode_prompts(parts, captions[i:i + batch_size])
                           for i in range(0, len(captions), batch_size)])
    text = {"embeds": torch.cat(embeds).float()}
    if parts.is_sdxl:
        text["pooled"] = torch.cat(pooled).float()
    files.save_tensors(text, out / "text.safetensors")
    caption_id = {c: i for i, c in enumerate(captions)}
    for start in tqdm(range(0, len(ds), shard_size), desc="caching latents", unit="shard"):
        rows = ds.select(range(start, min(start + shard_size, len(ds))))
        chunks = [encode_rows(parts, [rows[j] for j in range(i, min(i + batch_size, len(rows)))], transform, flips,
                              config.vae_encode_batch_size) for i in range(0, len(rows), batch_size)]
        mean, std, time_ids, ok = (torch.cat(t) for t in zip(*chunks))
        files.save_tensors({"mean": mean, "std": std, "time_ids": time_ids, "ok": ok,
                            "caption_id": torch.tensor([caption_id[c or ""] for c in rows["caption"]])},
                           out / f"shard-{start // shard_size:05d}.safetensors")
    manifest = {"version": CACHE_VERSION, **_fingerprint(config), "num_rows": len(ds),
                "random_flip": config.random_flip, "is_sdxl": parts.is_sdxl, "shard_size": shard_size,
                "latent_shape": list(latent_shape(parts.vae.config, config.resolution)),
                "scaling_factor": parts.vae.config.scaling_factor, "captions": captions,
                "label_0": [None if x is None else float(x) for x in ds["label_0"]], **(extra or {})}
    files.write_json(out / "manifest.json", manifest, indent=None)
    return out


def _older_cache(folder: Path) -> bool:
    """A cache written before folders were marked: its manifest.json is a JSON object with a cache's own fields."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"version", "num_rows", "shard_size", "captions", "label_0"} <= set(manifest)


# what a manifest must hold, with the type each field must have
_MANIFEST_FIELDS = {"version": int, "num_rows": int, "shard_size": int, "random_flip": bool, "is_sdxl": bool,
                    "latent_shape": list, "scaling_factor": (int, float), "captions": list, "label_0": list}


def read_manifest(path: str | Path) -> dict:
    """``manifest.json`` of the cache at ``path``, its fields and their types checked; else :class:`CacheError`."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise CacheError(f"{path} is not a latent cache (no manifest.json): build one with `dpo-tutorial cache`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{manifest_path} is damaged ({type(err).__name__}): rebuild the cache") from err
    if not isinstance(manifest, dict):
        raise CacheError(f"{manifest_path} is not a JSON object: rebuild the cache")
    bad = [k for k, kind in _MANIFEST_FIELDS.items() if not isinstance(manifest.get(k), kind)
           or (kind is int and isinstance(manifest.get(k), bool))]
    if manifest.get("version") != CACHE_VERSION:
        raise CacheError(f"{manifest_path}: cache version {manifest.get('version')!r}, expected {CACHE_VERSION}: rebuild "
                         "the cache with `dpo-tutorial cache`")
    if bad:
        raise CacheError(f"{manifest_path} lacks or garbles {', '.join(bad)}: rebuild the cache")
    if manifest["num_rows"] < 1 or manifest["shard_size"] < 1 or len(manifest["label_0"]) != manifest["num_rows"]:
        raise CacheError(f"{manifest_path}: {manifest['num_rows']} rows, shard size {manifest['shard_size']} and "
                         f"{len(manifest['label_0'])} labels do not fit together: rebuild the cache")
    if "" not in manifest["captions"] or not all(isinstance(c, str) for c in manifest["captions"]):
        raise CacheError(f"{manifest_path}: its captions are not a list of strings with the empty caption: rebuild "
                         "the cache")
    return manifest


def check_cache(path: str | Path, config, expected_latent_shape: tuple[int, ...] | None = None,
                shards: bool = True) -> dict:
    """The cache's checked manifest, or a :class:`CacheError` saying why it does not fit ``config`` (model, VAE,
    resolution, dataset, split, flips, crops) or is damaged (:func:`read_manifest`, :func:`check_shards`).
    ``expected_latent_shape``: the ``(C, h, w)`` the run's VAE makes at its resolution, when known; ``shards``:
    also read and check every shard (False: the manifest only, a quick check before a run loads anything)."""
    manifest = read_manifest(path)
    wanted = _fingerprint(config)
    diffs = [f"{k}: cache {manifest.get(k)!r} vs run {v!r}" for k, v in wanted.items() if manifest.get(k) != v]
    if config.random_flip and not manifest["random_flip"]:
        diffs.append("random_flip: the cache has no flipped latents")
    if config.random_crop:
        diffs.append("random_crop: a cache stores center crops only")
    if expected_latent_shape is not None and tuple(manifest["latent_shape"]) != tuple(expected_latent_shape):
        diffs.append(f"latent shape: cache {tuple(manifest['latent_shape'])} vs the model's {tuple(expected_latent_shape)}")
    if diffs:
        raise CacheError(f"the latent cache {path} was made for something else ({'; '.join(diffs)}); "
                         "rebuild it with `dpo-tutorial cache` for this model, resolution and data")
    if shards:
        check_shards(path, manifest)
    return manifest


def _shard_expectations(manifest: dict, rows: int) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
    flips = 2 if manifest["random_flip"] else 1
    latent = (rows, 2, flips, *manifest["latent_shape"])
    return {"mean": (latent, (torch.float32,)), "std": (latent, (torch.float32,)),
            "time_ids": ((rows, 2, flips, 6), (torch.int64,)), "ok": ((rows,), (torch.bool,)),
            "caption_id": ((rows,), (torch.int64,))}


def check_shards(path: str | Path, manifest: dict) -> None:
    """Every shard and the text embeddings against the manifest: count, tensor names, dtypes, shapes, caption ids in
    range, finite latents and non-negative stds. Raises :class:`CacheError` naming the first file that fails."""
    root = Path(path)
    n, size = manifest["num_rows"], manifest["shard_size"]
    expected_files = {f"shard-{k:05d}.safetensors" for k in range(math.ceil(n / size))}
    found = {p.name for p in root.glob("shard-*.safetensors")}
    if found != expected_files:
        raise CacheError(f"{root} holds shards {sorted(found)[:3]}... but its manifest ({n} rows, {size} per shard) "
                         f"needs {len(expected_files)}: rebuild the cache")
    text = _read_tensors(root / "text.safetensors")
    embeds = text.get("embeds")
    if embeds is None or embeds.dim() != 3 or embeds.shape[0] != len(manifest["captions"]) or \
            (manifest["is_sdxl"] and text.get("pooled", torch.empty(0)).shape[:1] != embeds.shape[:1]):
        raise CacheError(f"{root / 'text.safetensors'} does not hold one embedding per manifest caption: rebuild the cache")
    for k in range(len(expected_files)):
        shard = root / f"shard-{k:05d}.safetensors"
        tensors = _read_tensors(shard)
        rows = min(size, n - k * size)
        for name, (shape, dtypes) in _shard_expectations(manifest, rows).items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype not in dtypes:
                got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise CacheError(f"{shard}: {name} is {got}, expected {shape} {dtypes[0]}: rebuild the cache")
        if not (torch.isfinite(tensors["mean"]).all() and torch.isfinite(tensors["std"]).all()
                and (tensors["std"] >= 0).all()):
            raise CacheError(f"{shard} holds non-finite latents or negative stds: rebuild the cache")
        ids = tensors["caption_id"]
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(manifest["captions"])):
            raise CacheError(f"{shard}: caption ids outside the manifest's {len(manifest['captions'])} captions")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError as err:
        raise CacheError(f"{path} is missing: rebuild the cache") from err
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CacheError(f"{path} is damaged ({type(err).__name__}: {' '.join(str(err).split())[:100]}): "
                         "rebuild the cache") from err


@dataclass
class CachedPair:
    """One winner-first pair from the cache (the counterpart of ``PairExample``)."""

    caption: str
    caption_id: int
    mean: torch.Tensor  # (2, C, h, w): winner, loser
    std: torch.Tensor
    time_ids: torch.Tensor  # (2, 6)


class LatentCache:
    """Map-style view of a checked cache that :class:`dpo_tutorial.data.PairStream` iterates like a dataset."""

    def __init__(self, path: str | Path, config, expected_latent_shape: tuple[int, ...] | None = None):
        self.path = Path(path)
        self.manifest = check_cache(path, config, expected_latent_shape)
        self.transform = PairTransform(config.resolution, False, config.random_flip)
        self.empty_prompt_prob = config.empty_prompt_prob
        self.text = _read_tensors(self.path / "text.safetensors")
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
        sides = list(winner_first(row["label_0"]))
        cached = self._row(row["index"])
        if not bool(cached["ok"]):
            raise SkipRow("undecodable")
        _, _, flip = self.transform.decide(rng)
        caption_id = int(cached["caption_id"])
        caption = drop_caption(self.manifest["captions"][caption_id], rng, self.empty_prompt_prob)
        return CachedPair(caption, caption_id if caption else self.empty_id, cached["mean"][sides, int(flip)],
                          cached["std"][sides, int(flip)], cached["time_ids"][sides, int(flip)])

    def collate(self, pairs: list[CachedPair]) -> dict:
        """The cached counterpart of ``collate_pairs``: ``(2B, C, h, w)`` winners then losers."""
        ids = torch.tensor([p.caption_id for p in pairs])

        def pair(name: str) -> torch.Tensor:
            return winners_then_losers([getattr(p, name)[0] for p in pairs], [getattr(p, name)[1] for p in pairs])

        batch = {"latent_mean": pair("mean"), "latent_std": pair("std"), "time_ids": pair("time_ids"),
                 "prompt_embeds": self.text["embeds"][ids], "captions": [p.caption for p in pairs]}
        if "pooled" in self.text:
            batch["pooled"] = self.text["pooled"][ids]
        return batch


# ------------------------------------------------------------------ the automatic cache of a training run
AUTO_CACHE_DIR = "latent-cache"  # inside the run's output folder
AUTO_CACHE_MAX_BYTES = 4 * 2**30  # above this the run reads images instead (a user can still build one on purpose)


def source_files(config) -> list[list]:
    """``[path, size, mtime_ns]`` of each local parquet file of the run's split: an edited file invalidates a cache."""
    return [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns]
            for f in local_parquet_files(Path(config.dataset).expanduser(), config.split)]


def settings_skip_reason(config) -> str | None:
    """The part of :func:`auto_cache_skip_reason` the settings alone decide (no rows read): a cache folder is
    given, ``cache_latents`` is off, the dataset is not a local folder or file, or crops are random."""
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
    return 2 * 2 * (2 if config.random_flip else 1) * math.prod(latent_shape(parts.vae.config, config.resolution)) * 4


def auto_cache(config, parts, dataset, world_size: int = 1) -> Path | None:
    """The latent cache ``train`` reads from: ``<output_dir>/latent-cache``, built now from the run's already loaded
    ``dataset`` with its own ``parts`` (or reused when it was built for this model, resolution and unchanged source
    files, and passes its checks; a damaged one is rebuilt), or ``None`` when :func:`auto_cache_skip_reason` says
    images are better. Same losses either way (``tests/test_cache.py``)."""
    if settings_skip_reason(config) or auto_cache_skip_reason(config, len(dataset), latent_bytes_per_row(parts, config),
                                                              world_size):
        return None
    folder = Path(config.output_dir) / AUTO_CACHE_DIR
    stamp = source_files(config)
    try:
        manifest = check_cache(folder, config, latent_shape(parts.vae.config, config.resolution))
        if manifest.get("source_files") == stamp:
            return folder
    except CacheError:
        pass  # missing, for other data, or damaged: (re)build it
    return build_cache(config, folder, parts=parts, dataset=dataset, extra={"source_files": stamp})
