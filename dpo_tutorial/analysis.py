"""Measurements the notebooks show: the spread of ``model_diff`` estimates, per-pair errors, 2-D views."""
from __future__ import annotations

import numpy as np
import torch

from .loss import per_sample_mse, split_pairs
from .models import DiffusionParts, reference_mode
from .step import draw_noise, encode_batch, noisy_prediction


@torch.no_grad()
def model_diff_draws(parts: DiffusionParts, unet, batch: dict, num_draws: int, shared: bool = True,
                     seed: int = 0) -> torch.Tensor:
    """``(num_draws, B)`` one-draw estimates of each pair's ``model_diff``.

    ``shared=True``: winner and loser get the same noise and timestep (the recipe); ``False``: each
    image draws its own, as a naive implementation would. The latents are encoded once. The target is
    the model's own (ε or v), as in training.
    """
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    encoded = encode_batch(parts, batch, g)  # latents (2B, C, h, w), embeddings (2B, L, D)
    steps = parts.noise_scheduler.config.num_train_timesteps
    latents = encoded.latents
    out = []
    for _ in range(num_draws):
        if shared:
            noise, t = draw_noise(parts, encoded, g)
        else:
            noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
            t = torch.randint(0, steps, (latents.shape[0],), generator=g, device=latents.device)
        pred, target = noisy_prediction(parts, unet, encoded, noise, t)
        mse_w, mse_l = split_pairs(per_sample_mse(pred, target))
        out.append(mse_w - mse_l)
    return torch.stack(out)  # (num_draws, B)


@torch.no_grad()
def pair_errors(parts: DiffusionParts, unet, batch: dict, num_draws: int = 8, seed: int = 0) -> dict:
    """Mean MSE of winners and losers under the policy (LoRA on) and the reference (LoRA off).

    The same shared noise/timestep draws are used for both, so the numbers are directly comparable.
    """
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    encoded = encode_batch(parts, batch, g)
    sums = {k: 0.0 for k in ("policy_w", "policy_l", "ref_w", "ref_l")}
    for _ in range(num_draws):
        noise, t = draw_noise(parts, encoded, g)
        pred, target = noisy_prediction(parts, unet, encoded, noise, t)
        w, l = split_pairs(per_sample_mse(pred, target))
        with reference_mode(unet):
            ref_pred, _ = noisy_prediction(parts, unet, encoded, noise, t)
        rw, rl = split_pairs(per_sample_mse(ref_pred, target))
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
