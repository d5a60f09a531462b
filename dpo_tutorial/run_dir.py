"""A run's output folder and its rules, in one place: what it holds, who may write it, and when a run may continue it.

What a run folder holds (``<output_dir>``):

- ``.dpo-tutorial``: the marker that makes it a run folder (:func:`claim_run_folder`); a folder holding
  files the package did not write is refused, never written into;
- ``.lock``: one writer at a time (:func:`lock_output_dir`);
- ``history.jsonl``: one JSON record per optimizer step, appended and flushed as the run goes
  (:func:`append_record`); a reader drops a torn last line with a warning (:func:`read_history`);
- ``config.json``, ``data_summary.json``, ``summary.json``: written atomically (:mod:`dpo_tutorial.files`);
- ``checkpoint-<step>/`` (:mod:`dpo_tutorial.checkpoint`) and the exported weights.

When a run may continue a folder's run — one rule, :func:`resume_differences`, used both to resume a
checkpoint and to recognise "the same run" when ``dpo-tutorial train`` is run again (:func:`plan_rerun`):
every setting must match the checkpoint's except :data:`RESUME_MAY_CHANGE`, and ``max_steps`` may change
only under an lr schedule that does not depend on it. The settings are read from the checkpoint's own
``state.json``, never from ``config.json`` (a report for people, which may be edited or deleted).
"""
from __future__ import annotations

import fcntl
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint as ckpt
from . import files
from .config import ConfigError, TrainConfig
from .summary import tail_means

LORA_FILE = "pytorch_lora_weights.safetensors"  # the exported LoRA, in the diffusers format


# ------------------------------------------------------------------------------------ the history file
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


def append_record(path: Path, record: dict, sync: bool = False) -> None:
    """Append one JSON line to ``path`` and flush it (a crash of the process loses nothing already logged);
    ``sync``: also force it to disk (a power cut keeps it too; for records that stand for hours of work)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        if sync:
            os.fsync(fh.fileno())


def truncate_history(path: Path, last_step: int) -> list[dict]:
    """Keep the records up to ``last_step`` (a resumed run rewrites the steps after its checkpoint).

    The file is rewritten atomically; a torn last line is dropped (:func:`read_history`).
    """
    if not path.exists():
        return []
    records = [r for r in read_history(path) if r.get("step", 0) <= last_step]
    files.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def read_json_report(path: Path) -> dict | None:
    """A JSON report the run wrote (``summary.json``, ``data_summary.json``), or ``None`` when it is missing or
    damaged (with a warning naming it): reports are rebuilt from the history, never trusted blindly."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
        if isinstance(value, dict):
            return value
    except (OSError, ValueError):
        pass
    warnings.warn(f"{path} is damaged (not a JSON object): ignored")
    return None


@dataclass
class History:
    """What a run logged: one dict per optimizer step, plus where its artefacts are."""

    records: list[dict] = field(default_factory=list)
    output_dir: str = ""
    lora_path: str | None = None
    data_summary: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)  # the closing report (dpo_tutorial.summary), also summary.json

    def __getitem__(self, key: str) -> list:
        """All logged values of ``key``, in step order (e.g. ``history["loss"]``)."""
        return [r[key] for r in self.records if key in r]

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def load(cls, output_dir: str | Path) -> "History":
        """Read a finished or interrupted run: ``history.jsonl`` (a torn last line is dropped, with a warning),
        ``summary.json`` (else, or when damaged, the last-10% means of the records) and the LoRA's path."""
        out = Path(output_dir)
        records = read_history(out / "history.jsonl")
        lora = out / LORA_FILE
        return cls(records=records, output_dir=str(output_dir), lora_path=str(lora) if lora.exists() else None,
                   data_summary=read_json_report(out / "data_summary.json") or {},
                   summary=read_json_report(out / "summary.json") or tail_means(records))


# ------------------------------------------------------------------------------------ the folder itself
def _older_run_folder(folder: Path) -> bool:
    """A run folder written before folders were marked: it holds the lock file and a checkpoint."""
    return (folder / files.LOCK_FILE).is_file() and bool(ckpt.list_checkpoints(folder))


def claim_run_folder(config: TrainConfig) -> Path:
    """Make ``config.output_dir`` this run's folder, or refuse in one line (:class:`~dpo_tutorial.files.FolderError`):
    a file, a folder holding files the package did not write, or one holding checkpoints of an earlier run
    when no ``--resume`` was given."""
    folder = files.claim_folder(config.output_dir, "run", legacy=_older_run_folder)
    if ckpt.list_checkpoints(folder) and not config.resume:
        raise ConfigError(f"output dir {config.output_dir!r} already holds checkpoints (of a run started "
                          "earlier): pass --resume latest to continue it, or choose a new --output-dir")
    return folder


_LOCKS: dict[str, object] = {}  # output folder -> the open lock file this process holds


def lock_output_dir(output_dir: str | Path, flag: str = "--output-dir") -> None:
    """Hold an exclusive lock on ``output_dir/.lock``: one writer per folder (``flag``: the option that named it).

    A second run into the folder fails at once with :class:`ConfigError`; the lock goes when this
    process ends or calls :func:`release_output_dir`. Taking it again in the same process is a no-op.
    """
    out = Path(output_dir)
    key = str(out.resolve())
    if key in _LOCKS:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / files.LOCK_FILE, "a+")
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
                          f"to finish or choose another {flag}") from err
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


def write_run_config(out: Path, config: TrainConfig, world_size: int) -> None:
    """``config.json``: every setting, the effective batch (pairs per optimizer step) and the process count."""
    effective = config.batch_size * config.grad_accum * world_size
    files.write_json(out / "config.json", {**config.to_dict(), "effective_batch_pairs": effective,
                                           "world_size": world_size})


# ------------------------------------------------------------------------------------ continuing a run
# What a resumed run may set differently from the run it continues; every other field must match.
RESUME_MAY_CHANGE = ("max_steps", "checkpoint_every", "checkpoints_total_limit", "resume", "report_to",
                     "num_threads", "num_processes", "max_nonfinite_steps", "sample_grid", "sample_steps",
                     "guidance_scale", "output_dir", "gradient_checkpointing", "compile_unet", "channels_last",
                     "allow_tf32", "heldout_split", "heldout_pairs", "prefetch", "vae_encode_batch_size")
# lr schedules whose value at a step does not depend on max_steps: only under these may a resume change it
SCHEDULES_WITHOUT_TOTAL = ("constant", "constant_with_warmup")
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


def resume_differences(state: dict, config: TrainConfig, world_size: int | None = None) -> list[str]:
    """Why ``config`` cannot continue the run a checkpoint's ``state`` (its ``state.json``) belongs to; empty when
    it can. The one rule for resuming and for recognising the same run (see the module doc)."""
    saved = state.get("config", {})
    diffs = config_differences(saved, config)
    if ("max_steps" in saved and saved["max_steps"] != config.max_steps
            and config.lr_scheduler not in SCHEDULES_WITHOUT_TOTAL):
        diffs.append(f"max_steps: checkpoint {saved['max_steps']} vs now {config.max_steps} (its "
                     f"{config.lr_scheduler} lr schedule was laid out for {saved['max_steps']} steps)")
    if state["step"] > config.max_steps:
        diffs.append(f"step: checkpoint at step {state['step']} is past max_steps {config.max_steps}")
    if world_size is not None and state.get("world_size", world_size) != world_size:
        diffs.append(f"processes: checkpoint {state['world_size']} vs now {world_size}")
    return diffs


class ResumeMismatch(ckpt.CheckpointError):
    """A checkpoint belongs to a run with other settings (another may fit: the caller falls back)."""


def check_resume(path: Path, config: TrainConfig, world_size: int) -> dict:
    """The checked ``state.json`` of checkpoint ``path``, or :class:`ResumeMismatch` naming what differs and how to
    proceed. The allowed settings that changed are applied (the new config drives the run), with a warning."""
    state = ckpt.read_state(path)
    diffs = resume_differences(state, config, world_size)
    if diffs:
        raise ResumeMismatch(f"cannot resume from {path}: it was made with other settings ({'; '.join(diffs)}); "
                             "pass the same values or start a new --output-dir")
    changed = config_differences(state.get("config", {}), config, allowed=("resume", "output_dir"))
    if changed:
        warnings.warn(f"resuming from {path} with changed settings, applied: {'; '.join(changed)}")
    return state


@dataclass
class RerunPlan:
    """``action`` is ``train`` (a fresh run), ``resume`` or ``finished``; ``config`` is what to run."""

    action: str
    config: TrainConfig
    message: str = ""


def _newest_state(folder: Path) -> dict | None:
    """The checked ``state.json`` of the newest readable checkpoint in ``folder``, or ``None``."""
    for path in ckpt.list_checkpoints(folder)[::-1]:
        try:
            return ckpt.read_state(path)
        except ckpt.CheckpointError:
            continue
    return None


def _finished(folder: Path, state: dict, max_steps: int) -> bool:
    """True when ``folder``'s newest checkpoint is the final one of a ``max_steps`` run and the weights are exported."""
    exported = (folder / LORA_FILE).exists() or (folder / "unet").is_dir()
    return state["step"] == max_steps and exported


def plan_rerun(config: TrainConfig) -> RerunPlan:
    """Where and how to run ``config`` given what its output folder already holds (``make train`` twice).

    Looks at ``<output_dir>``, then ``<output_dir>-2``, ``-3``, ... and takes the first folder that holds no
    checkpoints (train there) or holds a run that ``config`` may continue (:func:`resume_differences`): finished
    (report it, train nothing) or not (resume it from its latest checkpoint). A run with other settings, and a
    folder that is not a run folder, are never touched. ``--resume`` given explicitly skips all this.
    """
    if config.resume:
        return RerunPlan("train", config)
    base = Path(config.output_dir)
    skipped: list[str] = []
    for n in range(1, 1000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if folder.exists() and not folder.is_dir():
            if n == 1:
                raise files.FolderError(f"output folder {str(folder)!r} is a file: expected a new folder or one "
                                        "dpo-tutorial made")
            skipped.append(f"{folder} is a file")
            continue
        if not ckpt.list_checkpoints(folder):
            return RerunPlan("train", config.replace(output_dir=str(folder)), _moved(base, folder, skipped))
        state = _newest_state(folder)
        diffs = ["no readable checkpoint state"] if state is None else resume_differences(state, config)
        if diffs:
            skipped.append(f"{folder} holds a run with other settings ({'; '.join(diffs[:4])}"
                           f"{'; ...' if len(diffs) > 4 else ''})")
            continue
        same = config.replace(output_dir=str(folder))
        if _finished(folder, state, config.max_steps):
            return RerunPlan("finished", same, _moved(base, folder, skipped))
        return RerunPlan("resume", same.replace(resume="latest"), _moved(base, folder, skipped)
                         + f"resuming the interrupted run in {folder} from checkpoint-{state['step']}")
    raise ConfigError(f"output dir {base} and {base}-2 ... {base}-999 all hold runs with other settings: "
                      "pass a new --output-dir")


def _moved(base: Path, folder: Path, skipped: list[str]) -> str:
    """One line per folder passed over, ending with where this run goes instead (empty when it stays)."""
    if folder == base:
        return ""
    return "".join(f"{line}\n" for line in skipped) + f"this run goes to {folder}\n"

