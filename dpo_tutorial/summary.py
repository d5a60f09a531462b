"""What a finished run reports: numbers a person can trust, not the last noisy batch.

One optimizer step sees ``batch_size`` pairs, one noise draw and one timestep each, so a single step's
loss or implicit accuracy is a noisy estimate (on the toy, the last batch alone read 0.47 accuracy in a
run whose held-out accuracy was 0.73). The closing report therefore gives

- the **mean over the last 10% of steps** of the loss, the implicit accuracy and the reward margin, and
- the **held-out implicit-reward accuracy**: on pairs the run never trained on (the toy's
  ``validation`` split; for other datasets opt in with ``heldout_split``), the share whose implicit
  reward :math:`-\\tfrac{\\beta}{2}(\\text{model\\_diff} - \\text{ref\\_diff})`, averaged over several
  shared (noise, timestep) draws, prefers the labelled winner. At initialisation it is 0.5 exactly.
"""
from __future__ import annotations

import math

TAIL_METRICS = ("loss", "implicit_acc", "reward_margin")


def tail_means(records: list[dict], fraction: float = 0.1) -> dict:
    """Mean of each of :data:`TAIL_METRICS` over the last ``fraction`` of ``records`` (at least one step).

    Returns ``{"tail_steps": n, "loss": ..., "implicit_acc": ..., "reward_margin": ...}``; empty when
    there are no records.
    """
    if not records:
        return {}
    n = max(1, math.ceil(len(records) * fraction))
    tail = records[-n:]
    return {"tail_steps": n, **{k: sum(r[k] for r in tail) / n for k in TAIL_METRICS if all(k in r for r in tail)}}


def heldout_accuracy(parts, unet, config, num_draws: int = 4) -> dict:
    """Implicit-reward accuracy of ``unet`` (LoRA on vs off) on ``config.heldout_split``, capped at ``heldout_pairs``."""
    from .data import load_pickapic
    from .evaluate import implicit_reward_accuracy

    pairs = load_pickapic(config.dataset, config.heldout_split, streaming=config.streaming)
    acc, n = implicit_reward_accuracy(parts, unet, pairs, config.resolution, num_draws=num_draws,
                                      max_pairs=config.heldout_pairs, return_count=True)
    return {"heldout_split": config.heldout_split, "heldout_pairs": n, "heldout_implicit_acc": acc}


def format_summary(summary: dict) -> list[str]:
    """The closing lines ``dpo-tutorial train`` prints for a run's summary."""
    lines = []
    if "tail_steps" in summary and math.isnan(summary.get("implicit_acc", math.nan)):  # SFT: winners only
        lines.append(f"last {summary['tail_steps']} steps (mean): loss {summary['loss']:.4f} (the winners' MSE: "
                     "an SFT run has no reference, so no implicit reward)")
    elif "tail_steps" in summary:
        lines.append(f"last {summary['tail_steps']} steps (mean): loss {summary['loss']:.4f} "
                     f"(log 2 = {math.log(2):.4f} at the start), implicit accuracy {summary['implicit_acc']:.3f}, "
                     f"reward margin {summary['reward_margin']:+.3f}")
    if "heldout_implicit_acc" in summary:
        lines.append(f"held-out implicit-reward accuracy: {summary['heldout_implicit_acc']:.3f} on "
                     f"{summary['heldout_pairs']} '{summary['heldout_split']}' pairs (0.5 before training)")
    return lines
