"""Measurements the notebooks show: the spread of ``model_diff`` estimates, per-pair errors, 2-D views."""
from __future__ import annotations

import numpy as np
import torch

from .loss import per_sample_mse, split_pairs
from .models import DiffusionParts, reference_mode
from .noise import shared_noise, shared_timesteps


@torch.no_grad()
def _inputs(parts: DiffusionParts, batch: dict, generator):
    from .train import _encode_batch

    latents, embeds, _, _ = _encode_batch(parts, batch, generator, None)  # (2B, C, h, w), (B, L, D)
    return latents, embeds.repeat(2, 1, 1)  # (2B, L, D)


@torch.no_grad()
def model_diff_draws(parts: DiffusionParts, unet, batch: dict, num_draws: int, shared: bool = True,
                     seed: int = 0) -> torch.Tensor:
    """``(num_draws, B)`` one-draw estimates of each pair's ``model_diff``.

    ``shared=True``: winner and loser get the same noise and timestep (the recipe); ``False``: each
    image draws its own, as a naive implementation would. The latents are encoded once.
    """
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    latents, embeds = _inputs(parts, batch, g)
    num_pairs, steps = latents.shape[0] // 2, parts.noise_scheduler.config.num_train_timesteps
    dev = latents.device
    out = []
    for _ in range(num_draws):
        if shared:
            noise, t = shared_noise(latents, g), shared_timesteps(num_pairs, steps, dev, generator=g)
        else:
            noise = torch.randn(latents.shape, generator=g, device=dev, dtype=latents.dtype)
            t = torch.randint(0, steps, (2 * num_pairs,), generator=g, device=dev)
        pred = unet(parts.noise_scheduler.add_noise(latents, noise, t), t, embeds).sample
        mse_w, mse_l = split_pairs(per_sample_mse(pred, noise))
        out.append(mse_w - mse_l)
    return torch.stack(out)  # (num_draws, B)


@torch.no_grad()
def pair_errors(parts: DiffusionParts, unet, batch: dict, num_draws: int = 8, seed: int = 0) -> dict:
    """Mean MSE of winners and losers under the policy (LoRA on) and the reference (LoRA off).

    The same shared noise/timestep draws are used for both, so the numbers are directly comparable.
    """
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    latents, embeds = _inputs(parts, batch, g)
    num_pairs, steps = latents.shape[0] // 2, parts.noise_scheduler.config.num_train_timesteps
    sums = {k: 0.0 for k in ("policy_w", "policy_l", "ref_w", "ref_l")}
    for _ in range(num_draws):
        noise, t = shared_noise(latents, g), shared_timesteps(num_pairs, steps, latents.device, generator=g)
        noisy = parts.noise_scheduler.add_noise(latents, noise, t)
        w, l = split_pairs(per_sample_mse(unet(noisy, t, embeds).sample, noise))
        with reference_mode(unet):
            rw, rl = split_pairs(per_sample_mse(unet(noisy, t, embeds).sample, noise))
        for k, v in zip(sums, (w, l, rw, rl)):
            sums[k] += v.mean().item() / num_draws
    return sums


def project_2d(origin: np.ndarray, *points: np.ndarray) -> list[np.ndarray]:
    """Project high-dimensional vectors to 2-D around ``origin`` (ε), in the plane of the first two points.

    The first point lands on the x-axis at its true distance from ``origin``; the second keeps its
    true distance and angle. Other points are projected orthogonally onto that plane (distances shrink).
    """
    def flat(x) -> np.ndarray:  # tensors may sit on a GPU
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x
        return np.asarray(x, float).ravel()

    vecs = [flat(p) - flat(origin) for p in points]
    e1 = vecs[0] / np.linalg.norm(vecs[0])
    rest = vecs[1] - (vecs[1] @ e1) * e1
    e2 = rest / (np.linalg.norm(rest) or 1.0)
    return [np.array([v @ e1, v @ e2]) for v in vecs]
