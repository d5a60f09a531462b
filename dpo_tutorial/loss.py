r"""The Diffusion-DPO loss (Wallace et al., arXiv 2311.12908, Eq. 14) and its variants.

Layout: every tensor passed in holds ``2B`` rows, the ``B`` winners ``x_w`` first, then the ``B``
losers ``x_l``; row ``i`` and row ``i + B`` are one preference pair that shares caption, noise and
timestep.

For each image the per-sample squared error is :math:`\|\epsilon - \epsilon_\theta(x_t, t)\|^2`
averaged over all non-batch dimensions. Per pair,

.. math::
    \text{model\_diff} = \text{mse}_\theta(x_w) - \text{mse}_\theta(x_l), \qquad
    \text{ref\_diff} = \text{mse}_{ref}(x_w) - \text{mse}_{ref}(x_l)

and the paper's loss is

.. math::
    L = -\,\mathbb{E}_{\text{pairs}} \log\sigma\!\left(-\tfrac{\beta}{2}\,
        (\text{model\_diff} - \text{ref\_diff})\right)

(the paper writes :math:`-\beta T \omega(\lambda_t)`; :math:`T` and the weighting are folded into
:math:`\beta`, and the ``1/2`` is kept as in the official code and the diffusers SDXL script).

**β convention.** ``beta`` here is the paper's β: the paper reports 2000 for SD 1.5 and 5000 for SDXL (and
that β in [2000, 5000] works), while the official code's launchers pass 5000 for both. The diffusers SD 1.5
script writes ``-logsigmoid(beta_dpo * (ref_diff - model_diff))``: its ``beta_dpo`` equals **half** of this β
(its default 2500 is β = 5000 here). The diffusers SDXL script and the official code use this file's
convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sft", "legacy_mean_inside")
# what a training step logs (each the mean over the step's pairs or images; history.jsonl, summary, plots)
STEP_METRICS = ("loss", "implicit_acc", "raw_model_loss", "raw_ref_loss", "reward_margin", "model_mse_w",
                "model_mse_l", "ref_mse_w", "ref_mse_l")


@dataclass
class DPOLossOutput:
    """What one call of :func:`diffusion_dpo_loss` returns (scalars are 0-d tensors)."""

    loss: torch.Tensor  # () the value to backpropagate
    implicit_acc: torch.Tensor  # () share of pairs with logits > 0; logits == 0 count 1/2
    model_diff: torch.Tensor  # (B,) mse_w - mse_l under the policy
    ref_diff: torch.Tensor  # (B,) mse_w - mse_l under the reference
    raw_model_loss: torch.Tensor  # () mean policy MSE over all 2B images
    raw_ref_loss: torch.Tensor  # () mean reference MSE over all 2B images
    logits: torch.Tensor  # (B,) -beta/2 * (model_diff - ref_diff): the implicit reward margin
    model_mse_w: torch.Tensor  # (B,) policy MSE of each winner
    model_mse_l: torch.Tensor  # (B,) policy MSE of each loser
    ref_mse_w: torch.Tensor  # (B,) reference MSE of each winner
    ref_mse_l: torch.Tensor  # (B,) reference MSE of each loser

    @property
    def reward_margin(self) -> torch.Tensor:
        """Mean implicit reward margin over pairs: positive when the policy prefers the winners."""
        return self.logits.mean()

    def step_metrics(self) -> torch.Tensor:
        """``(len(STEP_METRICS),)`` float32: each of :data:`STEP_METRICS` averaged over its pairs or images."""
        return torch.stack([getattr(self, name).detach().float().mean() for name in STEP_METRICS])


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every non-batch dimension: ``(N, ...) -> (N,)``."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(dim=1)


def split_pairs(per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``(2B,)`` winners-then-losers vector into ``(B,)`` winners and ``(B,)`` losers."""
    if per_sample.shape[0] % 2:
        raise ValueError(f"expected 2B rows (B winners then B losers), got {per_sample.shape[0]} rows")
    return per_sample.chunk(2)


def pair_mse(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ``(B,)`` per-image errors :math:`\|\epsilon - \epsilon_\theta(x_t, t)\|^2 / d` of the winners and of the
    losers of a ``(2B, ...)`` winners-then-losers prediction and target."""
    return split_pairs(per_sample_mse(pred, target))


def implicit_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose implicit reward prefers the winner (``logits > 0``); a tie counts 1/2."""
    return ((logits > 0).float() + 0.5 * (logits == 0).float()).mean()


def loss_from_logits(logits: torch.Tensor, loss_type: str = "sigmoid") -> torch.Tensor:
    r"""The scalar loss from the ``(B,)`` logits :math:`z = -\tfrac{\beta}{2}(\text{model\_diff}-\text{ref\_diff})`.

    β is already inside :math:`z`; each variant is a function of the logits alone.

    - ``sigmoid`` (the paper): :math:`\text{mean}_i[-\log\sigma(z_i)]`.
    - ``legacy_mean_inside`` (the first diffusers version, kept for teaching):
      :math:`-\log\sigma(\text{mean}_i z_i)`: one pair's large margin can hide another's error.
    - ``hinge`` (SLiC-style): :math:`\text{mean}_i\,\max(0, 1 - z_i)`.
    - ``ipo`` (Azar et al. with τ = β): :math:`\text{mean}_i (z_i - \tfrac12)^2`, which is
      :math:`\beta^2 (h_i - \tfrac{1}{2\beta})^2` with :math:`h_i = z_i/\beta`, rescaled by β² so the
      gradient has a usable size.
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(logits).mean()
    if loss_type == "legacy_mean_inside":
        return -F.logsigmoid(logits.mean())
    if loss_type == "hinge":
        return torch.relu(1.0 - logits).mean()
    if loss_type == "ipo":
        return (logits - 0.5).pow(2).mean()
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def diffusion_dpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None,
    target: torch.Tensor,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
) -> DPOLossOutput:
    r"""Diffusion-DPO loss and its metrics for a winners-then-losers batch.

    Args:
        model_pred: ``(2B, C, H, W)`` policy prediction (ε or v), winners first.
        ref_pred: ``(2B, C, H, W)`` reference prediction (LoRA off / frozen copy); may be ``None``
            only for ``loss_type="sft"``.
        target: ``(2B, C, H, W)`` what the model should predict (the shared noise, or v).
        beta: the paper's β (see the module docstring for the diffusers mapping).
        loss_type: one of ``sigmoid`` (paper), ``hinge``, ``ipo``, ``sft`` (plain MSE on the winners,
            the paper's supervised baseline) or ``legacy_mean_inside``.

    Returns a :class:`DPOLossOutput`. With policy == reference every logit is 0, so the sigmoid loss is
    exactly :math:`\log 2` and the implicit accuracy 0.5.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    model_mse_w, model_mse_l = pair_mse(model_pred, target)  # (B,), (B,)
    model_diff = model_mse_w - model_mse_l  # (B,)
    if ref_pred is None:
        if loss_type != "sft":
            raise ValueError(f"loss_type {loss_type!r} needs ref_pred; only 'sft' works without it")
        ref_mse_w, ref_mse_l = model_mse_w.detach(), model_mse_l.detach()
    else:
        with torch.no_grad():
            ref_mse_w, ref_mse_l = pair_mse(ref_pred, target)  # (B,), (B,)
    ref_diff = ref_mse_w - ref_mse_l  # (B,)
    logits = -0.5 * beta * (model_diff - ref_diff)  # (B,)
    loss = model_mse_w.mean() if loss_type == "sft" else loss_from_logits(logits, loss_type)
    return DPOLossOutput(
        loss=loss,
        implicit_acc=implicit_accuracy(logits.detach()),
        model_diff=model_diff.detach(),
        ref_diff=ref_diff.detach(),
        raw_model_loss=torch.cat([model_mse_w, model_mse_l]).detach().mean(),
        raw_ref_loss=torch.cat([ref_mse_w, ref_mse_l]).mean(),
        logits=logits.detach(),
        model_mse_w=model_mse_w.detach(),
        model_mse_l=model_mse_l.detach(),
        ref_mse_w=ref_mse_w.detach(),
        ref_mse_l=ref_mse_l.detach(),
    )


def sft_loss(model_pred_w: torch.Tensor, target_w: torch.Tensor) -> DPOLossOutput:
    r"""The paper's supervised baseline from the winners alone: :math:`\text{mean}_i \|\epsilon_\theta(x_{w,t}^i, t_i)
    - \epsilon^i\|^2` over the ``(B, C, H, W)`` winner predictions and targets.

    Equal to ``diffusion_dpo_loss(model_pred, None, target, loss_type="sft").loss`` on the full
    winners-then-losers batch, without predicting the losers at all. Metrics that need the losers or a
    reference (``model_diff``, ``ref_diff``, ``logits``, ``implicit_acc``, ``model_mse_l``, ``ref_mse_w``,
    ``ref_mse_l``, ``raw_ref_loss``) are NaN: this loss never computes them; ``raw_model_loss`` is the winners' mean.
    """
    model_mse_w = per_sample_mse(model_pred_w, target_w)  # (B,)
    unknown = torch.full_like(model_mse_w.detach(), float("nan"))  # (B,)
    return DPOLossOutput(loss=model_mse_w.mean(), implicit_acc=unknown.mean(), model_diff=unknown,
                         ref_diff=unknown, raw_model_loss=model_mse_w.detach().mean(), raw_ref_loss=unknown.mean(),
                         logits=unknown, model_mse_w=model_mse_w.detach(), model_mse_l=unknown, ref_mse_w=unknown,
                         ref_mse_l=unknown)


def per_pair_weights(logits: torch.Tensor, loss_type: str = "sigmoid") -> torch.Tensor:
    r"""How hard each pair pulls: :math:`-\partial L / \partial z_i` for the ``(B,)`` logits.

    For the paper's loss this is :math:`\sigma(-z_i)/B`: pairs the policy already ranks right (large
    :math:`z_i`) stop pulling. For ``legacy_mean_inside`` every pair gets the same weight
    :math:`\sigma(-\bar z)/B`, so a badly ranked pair can hide behind well-ranked ones.
    """
    z = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_from_logits(z, loss_type), z)
    return -grad


def calibrated_log_loss(accuracy: float) -> float:
    r"""The sigmoid loss of a classifier that ranks a fraction ``accuracy`` of the pairs right and is *calibrated*
    (its confidence :math:`\sigma(z)` equals ``accuracy`` on every pair): the binary entropy
    :math:`-a\log a - (1-a)\log(1-a)`. At ``accuracy`` 0.5 it is :math:`\log 2`; at 0.72 it is only 0.59,
    which is why a DPO loss curve falls little while the ranking improves a lot."""
    if not 0.0 < accuracy < 1.0:
        raise ValueError(f"accuracy must lie strictly between 0 and 1, got {accuracy}")
    return -(accuracy * math.log(accuracy) + (1 - accuracy) * math.log(1 - accuracy))
