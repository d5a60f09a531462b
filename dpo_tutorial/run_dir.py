"""A run's output folder: its history file, atomic writes, the one-writer lock, and what a resume may change.

``history.jsonl`` holds one JSON record per optimizer step, appended and flushed as the run goes
(:func:`append_record`); a resume truncates it to the checkpoint's step (:func:`truncate_history`,
rewritten atomically by :func:`write_atomic`), and a reader drops a torn last line with a warning
(:func:`read_history`). One process at a time may write into a folder (:func:`lock_output_dir`). A resumed
run must match the settings of the run it continues except :data:`RESUME_MAY_CHANGE`
(:func:`config_differences`); :mod:`dpo_tutorial.rerun` uses the same rule to recognise a rerun.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig


def read_history(path: Path) -> list[dict]:
    """The records of a ``history.jsonl``; a torn (cut or NUL-filled) last line is dropped with a warning.

    A damaged line anywhere else raises :class:`ConfigError` naming it: that is not a crash's trace.
    """
    if not path.exists():
        return []
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if number < len(lines):
                raise ConfigError(f"{path} line {number} is not a JSON record ({err}): fix or delete the file") from err
            warnings.warn(f"{path}: dropped a torn last line (a run was cut while writing it): {line[:60]!r}")
            break
        records.append(record)
    return records


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: readers never see half of it."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line to ``path`` and flush it (a crash loses nothing already logged)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def truncate_history(path: Path, last_step: int) -> list[dict]:
    """Keep the records up to ``last_step`` (a resumed run rewrites the steps after its checkpoint).

    The file is rewritten atomically; a torn last line is dropped (:func:`read_history`).
    """
    if not path.exists():
        return []
    records = [r for r in read_history(path) if r.get("step", 0) <= last_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def check_output_dir(config: TrainConfig) -> None:
    """Refuse an output dir that is a file, or that holds checkpoints when no ``--resume`` was given."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output dir {config.output_dir!r} is a file: expected a folder (new or of this run)")
    if ckpt.list_checkpoints(config.output_dir) and not config.resume:
        raise ConfigError(f"output dir {config.output_dir!r} already holds checkpoints (of a run started "
                          "earlier): pass --resume latest to continue it, or choose a new --output-dir")


_LOCKS: dict[str, object] = {}  # output folder -> the open lock file this process holds


def lock_output_dir(output_dir: str | Path) -> None:
    """Create ``output_dir`` and hold an exclusive lock on its ``.lock`` file: one writer per folder.

    A second run into the folder fails at once with :class:`ConfigError`; the lock goes when this
    process ends or calls :func:`release_output_dir`. Taking it again in the same process is a no-op.
    """
    import fcntl

    out = Path(output_dir)
    key = str(out.resolve())
    if key in _LOCKS:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / ".lock", "a+")
    except OSError as err:
        raise ConfigError(f"output dir {str(output_dir)!r} is not writable ({type(err).__name__}: "
                          f"{err.strerror or err}): expected a folder this user can write to") from err
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise ConfigError(f"output dir {str(output_dir)!r} is in use by another run (pid {holder}): wait for it "
                          "to finish or choose another --output-dir") from err
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _LOCKS[key] = fh


def release_output_dir(output_dir: str | Path) -> None:
    """Release the lock :func:`lock_output_dir` took (no-op when this process holds none)."""
    fh = _LOCKS.pop(str(Path(output_dir).resolve()), None)
    if fh is not None:
        fh.close()


# What a resumed run may set differently from the run it continues; every other field must match.
RESUME_MAY_CHANGE = ("max_steps", "checkpoint_every", "checkpoints_total_limit", "resume", "report_to",
                     "num_threads", "num_processes", "max_nonfinite_steps", "sample_grid", "sample_steps",
                     "guidance_scale", "output_dir", "gradient_checkpointing", "compile_unet", "channels_last",
                     "allow_tf32", "heldout_split", "heldout_pairs", "prefetch", "vae_encode_batch_size")
PATH_FIELDS = ("pretrained", "vae", "dataset", "cache", "output_dir")


def _comparable(name: str, value):
    """A local path resolved (``./fx/sd`` equals its absolute path); anything else unchanged."""
    if name in PATH_FIELDS and isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def config_differences(saved: dict, config: TrainConfig, allowed: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[str]:
    """``"field: checkpoint X vs now Y"`` for each field of ``config`` that differs from the ``saved`` dict.

    Fields named in ``allowed`` and fields ``saved`` lacks (older versions) are not compared; local paths
    are compared resolved.
    """
    now = config.to_dict()
    return [f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in now
            if k in saved and k not in allowed and _comparable(k, saved[k]) != _comparable(k, now[k])]
