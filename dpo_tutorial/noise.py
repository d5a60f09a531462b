"""Shared noise and timesteps: each preference pair is noised *identically*.

The public recipe writes ``noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)``: draw
noise for the first half of the ``2B`` batch (one per pair) and repeat it for the second half, so the
winner ``x_w`` (row i) and the loser ``x_l`` (row i + B) see the same ε and the same t. Then
``model_diff = mse(x_w) - mse(x_l)`` compares the two images under equal conditions, and most of the
variance that comes from *which* ε and t were drawn cancels in the difference (notebook 05 measures it).
"""
from __future__ import annotations

import torch


def shared_noise(latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise shaped like ``latents`` (``(2B, ...)``) whose two halves are identical.

    Equivalent in distribution to ``torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)``, but
    draws only the ``B`` samples it keeps, from ``generator`` when given.
    """
    if latents.shape[0] % 2:
        raise ValueError(f"latents must hold 2B rows (winners then losers), got {latents.shape[0]}")
    half_shape = (latents.shape[0] // 2, *latents.shape[1:])
    noise = torch.randn(half_shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return noise.repeat(2, *([1] * (latents.dim() - 1)))  # (2B, ...): [n_0..n_{B-1}, n_0..n_{B-1}]


def shared_timesteps(
    num_pairs: int,
    num_train_timesteps: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(2B,)`` long tensor of timesteps uniform in ``[0, num_train_timesteps)``, one per pair, repeated."""
    if num_pairs < 1 or num_train_timesteps < 1:
        raise ValueError(f"need num_pairs >= 1 and num_train_timesteps >= 1, got {num_pairs}, {num_train_timesteps}")
    t = torch.randint(0, num_train_timesteps, (num_pairs,), generator=generator, device=device or "cpu")
    return t.long().repeat(2)  # (2B,)
