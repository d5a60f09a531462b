"""What a finished run reports: numbers a person can trust, not the last noisy batch.

One optimizer step sees ``batch_size`` pairs, one noise draw and one timestep each, so a single step's
loss or implicit accuracy is a noisy estimate (on the toy, the last batch alone read 0.47 accuracy in a
run whose held-out accuracy was 0.73). The closing report therefore gives

- the **mean over the last 10% of steps** of the loss, the implicit accuracy and the reward margin, and
- the **held-out implicit-reward accuracy**: on pairs the run never trained on (the toy's
  ``validation`` split; for other datasets opt in with ``heldout_split``), the share whose implicit
  reward :math:`-\\tfrac{\\beta}{2}(\\text{model\\_diff} - \\text{ref\\_diff})`, averaged over several
  shared (noise, timestep) draws, prefers the labelled winner (measured by
  :func:`dpo_tutorial.evaluate.heldout_accuracy`). At initialisation it is 0.5 exactly.
"""
from __future__ import annotations

import math

TAIL_METRICS = ("loss", "implicit_acc", "reward_margin")  # of loss.STEP_METRICS, what the report quotes


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
    if "heldout_skipped" in summary:
        lines.append(f"no held-out score: {summary['heldout_skipped']}")
    return lines
