"""What ``dpo-tutorial train`` does when its output folder already holds a run (e.g. ``make train`` twice).

:func:`plan_rerun` looks at ``<output_dir>``, then ``<output_dir>-2``, ``-3``, ... and picks the first
folder that either holds no checkpoints (train there) or holds a run with the same settings: finished
(report it, train nothing) or interrupted (resume it from its latest checkpoint). A run with other
settings is never touched. "The same settings" means what a resume accepts
(:func:`dpo_tutorial.run_dir.config_differences`) with the same ``max_steps`` (:data:`SAME_RUN_MAY_CHANGE`).
``--resume`` given explicitly skips all this: the user chose (and may extend a run with ``--max-steps``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import list_checkpoints
from .config import TrainConfig
from .run_dir import RESUME_MAY_CHANGE, config_differences

# what may differ for a folder to hold "this run": what a resume accepts, except max_steps, which also
# shapes the lr schedule (a finished 30-step cosine run is not the first 30 steps of a 700-step one)
SAME_RUN_MAY_CHANGE = tuple(f for f in RESUME_MAY_CHANGE if f != "max_steps")


@dataclass
class RerunPlan:
    """``action`` is ``train`` (a fresh run), ``resume`` or ``finished``; ``config`` is what to run."""

    action: str
    config: TrainConfig
    message: str = ""


def _saved_settings(folder: Path) -> dict:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _finished_step(folder: Path, max_steps: int) -> bool:
    """True when ``folder`` holds the final checkpoint and the exported weights of a ``max_steps`` run."""
    final = [p for p in list_checkpoints(folder) if p.name == f"checkpoint-{max_steps}"]
    exported = (folder / "pytorch_lora_weights.safetensors").exists() or (folder / "unet").is_dir()
    return bool(final) and exported


def plan_rerun(config: TrainConfig) -> RerunPlan:
    """Decide where and how to run ``config`` given what its output folder already holds (see the module doc)."""
    if config.resume:
        return RerunPlan("train", config)
    base = Path(config.output_dir)
    skipped: list[str] = []
    for n in range(1, 1000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not list_checkpoints(folder):
            return RerunPlan("train", config.replace(output_dir=str(folder)), _moved(base, folder, skipped))
        diffs = config_differences(_saved_settings(folder), config, SAME_RUN_MAY_CHANGE)
        if diffs:
            skipped.append(f"{folder} holds a run with other settings ({'; '.join(diffs[:4])}"
                           f"{'; ...' if len(diffs) > 4 else ''})")
            continue
        same = config.replace(output_dir=str(folder))
        if _finished_step(folder, config.max_steps):
            return RerunPlan("finished", same, _moved(base, folder, skipped))
        latest = list_checkpoints(folder)[-1].name
        return RerunPlan("resume", same.replace(resume="latest"),
                         _moved(base, folder, skipped) + f"resuming the interrupted run in {folder} from {latest}")
    raise FileExistsError(f"output dir {base} and {base}-2 ... {base}-999 all hold runs with other settings: "
                          "pass a new --output-dir")


def _moved(base: Path, folder: Path, skipped: list[str]) -> str:
    """One line per folder passed over, ending with where this run goes instead (empty when it stays)."""
    if folder == base:
        return ""
    return "".join(f"{line}\n" for line in skipped) + f"this run goes to {folder}\n"


def train_or_reuse(config: TrainConfig):
    """``(history, config)`` of ``config``'s run: trained now, or reused when a finished run of the same
    settings already sits in ``output_dir`` (or a numbered sibling, see :func:`plan_rerun`).

    The notebooks share one toy run this way: the first that needs it trains it (~2 minutes on a CPU),
    the others load its history, summary and LoRA in a second. The returned config's ``output_dir`` is
    where the run lives.
    """
    from .train import History, train

    plan = plan_rerun(config)
    if plan.action != "finished":
        return train(plan.config), plan.config
    history = History.load(plan.config.output_dir)
    print(f"reusing the finished run in {plan.config.output_dir} ({len(history)} steps, same settings)")
    return history, plan.config
