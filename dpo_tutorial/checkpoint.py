"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoint-<step>`` holding the trainable weights (safetensors), the
optimizer and lr-scheduler states, every RNG state and the data stream position. It is written under
a temporary name and renamed into place only when complete, so a run killed at any moment leaves the
latest *complete* checkpoint loadable; half-written ``.tmp-*`` folders are ignored and cleaned up.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in ``output_dir``, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``None`` -> None; ``'latest'`` -> newest complete checkpoint (None if there is none); else the path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"--resume {resume!r} is not a complete checkpoint folder (no state.json)")
    return path


def rng_state(generator: torch.Generator) -> dict:
    """Every random state a step depends on."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "generator": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, *, trainable: dict[str, torch.Tensor], optimizer,
                    lr_scheduler, generator: torch.Generator, data_state: dict, extra: dict, rank: int = 0,
                    world_size: int = 1, barrier=lambda: None, limit: int | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically; every process calls it (``barrier`` syncs them).

    Each process adds its own RNG and data-stream state (``process_<rank>.pt``); the main process
    (rank 0) adds the trainable weights, optimizer and scheduler states and ``state.json``, fsyncs,
    renames the temporary folder into place and prunes to the ``limit`` newest checkpoints.
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
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()},
                   tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world_size, **extra}, indent=1))
        for f in tmp.iterdir():  # make the bytes durable before the folder becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[: -limit if limit else 0]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, module: torch.nn.Module, optimizer, lr_scheduler,
                    generator: torch.Generator, rank: int = 0) -> dict:
    """Load weights (by parameter name), optimizer, scheduler and this process's RNG / data state.

    Returns ``state.json`` with this process's data-stream state under ``"data"``.
    """
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(module.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise KeyError(f"checkpoint {path} has weights this model lacks, e.g. {missing[:3]}: "
                       "was it made with another model, rank or fine-tuning mode?")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    training_state = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(training_state["optimizer"])
    lr_scheduler.load_state_dict(training_state["lr_scheduler"])
    process = torch.load(path / f"process_{rank}.pt", weights_only=False)
    set_rng_state(process["rng"], generator)
    return {**json.loads((path / "state.json").read_text()), "data": process["data"]}


def clean_partial(output_dir: str | Path) -> None:
    """Remove half-written temporary checkpoint folders left by a killed run."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-checkpoint-*"):  # only the main process calls this, before training
            shutil.rmtree(p, ignore_errors=True)
