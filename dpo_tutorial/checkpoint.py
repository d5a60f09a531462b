"""Resumable checkpoints, written atomically and checked when read back.

A checkpoint is a folder ``checkpoint-<step>`` holding the trainable weights (``trainable.safetensors``),
the optimizer, lr-scheduler and GradScaler states (``training_state.pt``), each process's RNG and
data-stream position (``process_<rank>.pt``) and ``state.json`` (the step, the process count, the run's
settings). It is written under a temporary name and renamed into place only when complete
(:func:`dpo_tutorial.files.replace_folder`), so a run killed at any moment leaves the latest *complete*
checkpoint loadable; deleting renames first, too (:func:`dpo_tutorial.files.remove_folder`).

Nothing in a checkpoint is trusted when it is read back: ``state.json`` must be a JSON object whose step
is the folder's own number; the weights must be exactly this model's trainable tensors, with their shapes
and finite values; the ``.pt`` files hold tensors and numbers only, never code (:func:`safe_load`). A
checkpoint that fails any check raises :class:`CheckpointError`, and :func:`load_first_good` falls back to
the next older one. Only folders with the complete layout count as checkpoints (:func:`list_checkpoints`),
so pruning never deletes a folder the run did not write.
"""
from __future__ import annotations

import errno
import json
import pickle
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import files
from .config import ConfigError

_NAME = re.compile(r"^checkpoint-(\d+)$")
LAYOUT = ("state.json", "trainable.safetensors", "training_state.pt", "process_0.pt")  # what every checkpoint has


class CheckpointError(ConfigError):
    """A checkpoint folder is incomplete, corrupt, unsafe, made for another run, or cannot be written."""


def checkpoint_step(path: Path) -> int | None:
    """The step in a ``checkpoint-<step>`` folder name, else ``None``."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoints in ``output_dir``, oldest step first: folders named ``checkpoint-<step>`` that hold every
    file of :data:`LAYOUT` (a folder a user happened to name so is not one, and is never pruned)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir()
             if checkpoint_step(p) is not None and p.is_dir() and not p.is_symlink()
             and all((p / name).is_file() for name in LAYOUT)]
    return [p for _, p in sorted(found)]


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


def _write_failed(err: BaseException) -> bool:
    """True for the errors a full or failing disk raises while a checkpoint is written (torch's serializer
    reports it as a RuntimeError from its C++ writer)."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("file write failed" in text or "inline_container" in text)


def save_checkpoint(output_dir: str | Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer,
                    lr_scheduler, generator: torch.Generator, data_state: dict, extra: dict, rank: int = 0,
                    world_size: int = 1, agree=lambda ok: ok, limit: int | None = None, scaler=None) -> Path:
    """Write ``checkpoint-<step>`` atomically; every process calls it.

    Each process adds its own RNG and data-stream state (``process_<rank>.pt``); the main process
    (rank 0) adds the trainable weights, optimizer and scheduler states and ``state.json``, renames the
    temporary folder into place and prunes to the ``limit`` newest checkpoints. ``scaler`` (fp16's
    GradScaler, when there is one) is saved with the optimizer so fp16 resumes are exact.

    ``agree(ok) -> bool`` is a vote over the processes (True only when every process passes True; it also
    synchronises them): after each stage every process votes, so a full disk on any one of them raises
    :class:`CheckpointError` in one line on all of them (none is left waiting) and the previous checkpoint is
    left intact.
    """
    root = Path(output_dir)
    final, tmp = root / f"checkpoint-{step}", root / f".tmp-checkpoint-{step}"

    def own_part():
        torch.save({"rng": rng_state(generator), "data": data_state}, tmp / f"process_{rank}.pt")

    def main_part():
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "training_state.pt")
        files.write_json(tmp / "state.json", {"step": step, "world_size": world_size, **extra})
        files.replace_folder(tmp, final)
        for old in list_checkpoints(root)[: -limit if limit else 0]:
            files.remove_folder(old)

    stages = [(lambda: files.fresh_folder(tmp)) if rank == 0 else None, own_part, main_part if rank == 0 else None]
    for work in stages:  # fresh_folder also replaces a stale temporary folder or a link of that name
        err = None
        try:
            if work is not None:
                work()
        except (OSError, RuntimeError) as caught:
            if not _write_failed(caught):
                raise
            err = caught
        if not agree(err is None):
            if rank == 0:
                files.remove(tmp)
            raise _write_error(final, err)
    return final


def _write_error(final: Path, err: BaseException | None) -> CheckpointError:
    """The one-line error for a checkpoint this process (``err``) or another one could not write."""
    if err is None:
        cause = "another process could not write its part"
    else:
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC or "file write failed" in str(err)
        cause = f"{'the disk is full' if full else type(err).__name__}: {' '.join(str(err).split())[:100]}"
    return CheckpointError(f"could not write checkpoint {final} ({cause}); the previous checkpoint is intact: free "
                           "some space, then resume with --resume latest")


def read_state(path: str | Path) -> dict:
    """``state.json`` of a checkpoint, checked: a JSON object whose ``step`` is the folder's own number (>= 1),
    with a positive ``world_size`` and, when present, a ``config`` object; else :class:`CheckpointError`."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} is incomplete: state.json is missing") from err
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable state.json ({type(err).__name__})") from err
    step, name_step = state.get("step") if isinstance(state, dict) else None, checkpoint_step(path)
    problems = []
    if not isinstance(state, dict):
        problems.append(f"not a JSON object but {type(state).__name__}")
    elif not isinstance(step, int) or isinstance(step, bool) or step < 1:
        problems.append(f"step {step!r} is not a positive integer")
    elif name_step is not None and step != name_step:
        problems.append(f"step {step} in a folder named for step {name_step}")
    elif not isinstance(state.get("world_size", 1), int) or state.get("world_size", 1) < 1:
        problems.append(f"world_size {state.get('world_size')!r} is not a positive integer")
    elif not isinstance(state.get("config", {}), dict):
        problems.append("its config is not a JSON object")
    if problems:
        raise CheckpointError(f"checkpoint {path} has a state.json that does not fit it ({problems[0]})")
    return state


def read_checkpoint(path: str | Path, trainable: dict[str, torch.Tensor], rank: int = 0) -> dict:
    """Read and check every file of a checkpoint without changing anything; raise :class:`CheckpointError`.

    The weights must be exactly the tensors of ``trainable`` (name -> parameter), with the same shapes and
    finite values (an empty, half-filled or other-rank file is refused); ``state.json`` is checked by
    :func:`read_state`; ``training_state.pt`` and ``process_<rank>.pt`` are loaded with :func:`safe_load`.
    """
    path = Path(path)
    state = read_state(path)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} is incomplete: trainable.safetensors is missing") from err
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(err).__name__}: {str(err)[:160]})") from err
    missing, extra = sorted(set(trainable) - set(weights)), sorted(set(weights) - set(trainable))
    if missing or extra:
        raise CheckpointError(f"checkpoint {path} does not hold this model's trainable weights ({len(missing)} "
                              f"missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}): "
                              "made with another model, rank or fine-tuning mode, or half-written?")
    shapes = [f"{n}: {tuple(w.shape)} vs {tuple(trainable[n].shape)}" for n, w in weights.items()
              if w.shape != trainable[n].shape]
    if shapes:
        raise CheckpointError(f"checkpoint {path} holds weights of other shapes than this model's ({len(shapes)}, "
                              f"e.g. {shapes[0]}): made with another LoRA rank or model")
    bad = [n for n, w in weights.items() if w.is_floating_point() and not torch.isfinite(w).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]})")
    training_state = safe_load(path / "training_state.pt")
    process = safe_load(path / f"process_{rank}.pt")
    return {"state": state, "weights": weights, "training": training_state, "process": process}


def load_checkpoint(path: str | Path, module: torch.nn.Module, optimizer, lr_scheduler,
                    generator: torch.Generator, rank: int = 0, scaler=None, agree=lambda ok: ok) -> dict:
    """Load weights (by parameter name), optimizer, scheduler, GradScaler and this process's RNG / data state.

    Every file is read and checked first (:func:`read_checkpoint`), so a bad checkpoint raises
    :class:`CheckpointError` and changes nothing. ``agree(ok) -> bool``, a vote over the processes, makes them
    all refuse a checkpoint that one of them cannot read (its own ``process_<rank>.pt`` damaged), so that they
    fall back to the same older one. Returns ``state.json`` with this process's data-stream state under ``"data"``.
    """
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    try:
        found = read_checkpoint(path, params, rank)
    except CheckpointError:
        agree(False)
        raise
    if not agree(True):
        raise CheckpointError(f"checkpoint {path} is unusable on another process")
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
    newer = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step]
    for p in newer:
        files.remove_folder(p)
    return newer
