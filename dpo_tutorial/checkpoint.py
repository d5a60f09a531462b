"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoint-<step>`` holding the trainable weights (safetensors), the
optimizer and lr-scheduler states, every RNG state and the data stream position. It is written under
a temporary name and renamed into place only when complete, so a run killed at any moment leaves the
latest *complete* checkpoint loadable; half-written ``.tmp-*`` folders are ignored and cleaned up.
Deleting works the same way backwards (:func:`remove_folder`): a folder is renamed out of sight first,
then deleted, so a kill during pruning never leaves a half-deleted ``checkpoint-<step>`` that looks whole.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError

_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint folder is incomplete, corrupt, unsafe or made for another model; the message names it."""


def remove_folder(path: str | Path) -> None:
    """Delete ``path`` so that no half-deleted folder is ever visible under its name.

    The folder is first renamed (one atomic step) to ``.trash-<name>-<pid>`` beside it, then deleted; a
    run killed during the delete leaves only that hidden name, which :func:`clean_partial` removes later.
    ``shutil.rmtree`` alone deletes file by file, so a kill midway left e.g. ``checkpoint-2/state.json``
    without its weights: a folder :func:`list_checkpoints` would report as complete.
    """
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in ``output_dir``, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``None`` -> None; ``'latest'`` -> newest complete checkpoint (None if there is none); else the path.

    For ``'latest'`` see :func:`resume_candidates`, which also lists the older fallbacks.
    """
    found = resume_candidates(resume, output_dir)
    return found[0] if found else None


def resume_candidates(resume: str | None, output_dir: str | Path) -> list[Path]:
    """Checkpoints to try, in order: ``'latest'`` -> every complete one, newest first; a path -> just it."""
    if not resume:
        return []
    if resume == "latest":
        return list_checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"--resume {resume!r} is not a complete checkpoint folder (no state.json)")
    return [path]


def rng_state(generator: torch.Generator) -> dict:
    """Every random state a step depends on, as tensors and plain numbers (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_load(path: Path):
    """``torch.load`` that never unpickles code: tensors, numbers, strings and containers only.

    A missing, truncated or unsafe file (one holding a pickled callable) raises :class:`CheckpointError`.
    """
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is incomplete") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        lines = [x.strip() for x in str(err).splitlines() if x.strip()]
        reason = next((x for x in lines if x.startswith("Unsupported")), lines[0] if lines else type(err).__name__)
        reason = reason.split(". ")[0][:160]
        raise CheckpointError(f"refusing checkpoint file {path}: not a plain tensor/number file, or corrupt "
                              f"({reason})") from err


def save_checkpoint(output_dir: str | Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer,
                    lr_scheduler, generator: torch.Generator, data_state: dict, extra: dict, rank: int = 0,
                    world_size: int = 1, barrier=lambda: None, limit: int | None = None, scaler=None) -> Path:
    """Write ``checkpoint-<step>`` atomically; every process calls it (``barrier`` syncs them).

    Each process adds its own RNG and data-stream state (``process_<rank>.pt``); the main process
    (rank 0) adds the trainable weights, optimizer and scheduler states and ``state.json``, fsyncs,
    renames the temporary folder into place and prunes to the ``limit`` newest checkpoints. ``scaler``
    (fp16's GradScaler, when there is one) is saved with the optimizer so fp16 resumes are exact.
    """
    root = Path(output_dir)
    final, tmp = root / f"checkpoint-{step}", root / f".tmp-checkpoint-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save({"rng": rng_state(generator), "data": data_state}, tmp / f"process_{rank}.pt")
    barrier()
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world_size, **extra}, indent=1))
        for f in tmp.iterdir():  # make the bytes durable before the folder becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        remove_folder(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[: -limit if limit else 0]:
            remove_folder(old)
    barrier()
    return final


def read_checkpoint(path: str | Path, trainable_names: set[str], rank: int = 0) -> dict:
    """Read and check every file of a checkpoint without changing anything; raise :class:`CheckpointError`.

    The weights must hold exactly ``trainable_names`` (an empty or half-filled file is refused) with finite
    shapes; ``training_state.pt`` and ``process_<rank>.pt`` are loaded with :func:`safe_load`.
    """
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} is incomplete: {Path(err.filename or '').name} is missing") from err
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(err).__name__}: {str(err)[:160]})") from err
    missing, extra = sorted(trainable_names - set(weights)), sorted(set(weights) - trainable_names)
    if missing or extra:
        raise CheckpointError(f"checkpoint {path} does not hold this model's trainable weights ({len(missing)} "
                              f"missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}): "
                              "made with another model, rank or fine-tuning mode, or half-written?")
    training_state = safe_load(path / "training_state.pt")
    process = safe_load(path / f"process_{rank}.pt")
    return {"state": state, "weights": weights, "training": training_state, "process": process}


def load_checkpoint(path: str | Path, module: torch.nn.Module, optimizer, lr_scheduler,
                    generator: torch.Generator, rank: int = 0, scaler=None) -> dict:
    """Load weights (by parameter name), optimizer, scheduler, GradScaler and this process's RNG / data state.

    Every file is read and checked first (:func:`read_checkpoint`), so a bad checkpoint raises
    :class:`CheckpointError` and changes nothing. Returns ``state.json`` with this process's data-stream
    state under ``"data"``.
    """
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    found = read_checkpoint(path, set(params), rank)
    with torch.no_grad():
        for name, value in found["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(found["training"]["optimizer"])
    lr_scheduler.load_state_dict(found["training"]["lr_scheduler"])
    if scaler is not None and found["training"].get("scaler"):
        scaler.load_state_dict(found["training"]["scaler"])
    set_rng_state(found["process"]["rng"], generator)
    return {**found["state"], "data": found["process"]["data"]}


def load_first_good(paths: list[Path], load) -> tuple[Path, dict] | tuple[None, None]:
    """``load(path)`` on each path in turn; a :class:`CheckpointError` warns and falls back to the next.

    Returns the path that loaded and what ``load`` returned, ``(None, None)`` when ``paths`` is empty, and
    raises the first path's error when none loads.
    """
    first = None
    for i, path in enumerate(paths):
        try:
            return path, load(path)
        except CheckpointError as err:
            first = first or err
            if i + 1 < len(paths):
                warnings.warn(f"skipping unusable checkpoint {path}, trying {paths[i + 1].name}: {err}")
    if first is not None:
        raise first
    return None, None


def remove_after(output_dir: str | Path, step: int) -> list[Path]:
    """Delete the checkpoints newer than ``step`` (an abandoned timeline); return what was removed."""
    newer = [p for p in list_checkpoints(output_dir) if int(_NAME.match(p.name).group(1)) > step]
    for p in newer:
        remove_folder(p)
    return newer


def clean_partial(output_dir: str | Path) -> None:
    """Remove the half-written (``.tmp-checkpoint-*``) and half-deleted (``.trash-*``) folders a killed run left."""
    root = Path(output_dir)
    if root.is_dir():
        for pattern in (".tmp-checkpoint-*", ".trash-*"):  # only the main process calls this, before training
            for p in root.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)
