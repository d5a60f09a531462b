"""Measurements the notebooks show: which sharing of ε and t buys what, errors by noise level, per-pair errors,
the first optimizer steps of a fresh run."""
from __future__ import annotations

import torch

from .loss import per_sample_mse, split_pairs
from .models import DiffusionParts, reference_mode
from .step import draw_noise, encode_batch, noisy_prediction


SHARING = {"t and ε": (True, True), "t only": (False, True), "ε only": (True, False), "neither": (False, False)}


@torch.no_grad()
def model_diff_draws(parts: DiffusionParts, unet, batch: dict, num_draws: int, share_noise: bool = True,
                     share_timesteps: bool = True, seed: int = 0) -> torch.Tensor:
    """``(num_draws, B)`` one-draw estimates of each pair's ``model_diff = mse(x_w) - mse(x_l)``.

    ``share_noise`` / ``share_timesteps``: winner and loser get the same ε / the same t (the recipe
    shares both, :data:`SHARING` names the four combinations); otherwise each image draws its own. The
    latents are encoded once; the target is the model's own (ε or v), as in training.
    """
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    encoded = encode_batch(parts, batch, g)  # latents (2B, C, h, w), embeddings (2B, L, D)
    steps = parts.noise_scheduler.config.num_train_timesteps
    latents = encoded.latents
    out = []
    for _ in range(num_draws):
        noise, t = draw_noise(parts, encoded, g)  # (2B, C, h, w), (2B,): halves identical
        if not share_noise:
            noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        if not share_timesteps:
            t = torch.randint(0, steps, (latents.shape[0],), generator=g, device=latents.device)
        pred, target = noisy_prediction(parts, unet, encoded, noise, t)
        mse_w, mse_l = split_pairs(per_sample_mse(pred, target))
        out.append(mse_w - mse_l)
    return torch.stack(out)  # (num_draws, B)


def sharing_table(parts: DiffusionParts, unet, batch: dict, num_draws: int, seed: int = 0) -> dict[str, dict]:
    """For each way of sharing (:data:`SHARING`): the per-pair variance of the one-draw ``model_diff``
    estimate relative to sharing both (median over pairs and pooled), and the mean estimate.

    The mean barely moves (each way estimates the same ``E[model_diff]``); the variance is what sharing buys.
    """
    draws = {name: model_diff_draws(parts, unet, batch, num_draws, noise, t, seed)
             for name, (noise, t) in SHARING.items()}
    base = draws["t and ε"]
    return {name: {"variance_ratio_median": float((d.var(dim=0) / base.var(dim=0)).median()),
                   "variance_ratio_pooled": float((d - d.mean(0)).pow(2).mean() / (base - base.mean(0)).pow(2).mean()),
                   "mean_model_diff": float(d.mean()), "draws": d}
            for name, d in draws.items()}


@torch.no_grad()
def mse_by_timestep(parts: DiffusionParts, unet, batch: dict, timesteps: list[int], num_draws: int = 4,
                    seed: int = 0) -> list[float]:
    """Mean per-element MSE of ``unet``'s prediction over the batch's images, at each fixed ``t``.

    For an ε-prediction model the error is largest at small t (little noise to find in a nearly clean
    image) and smallest at large t (the input is almost all noise, so ε is easy to read off).
    """
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    encoded = encode_batch(parts, batch, g)
    out = []
    for step in timesteps:
        t = torch.full((encoded.latents.shape[0],), int(step), device=encoded.latents.device, dtype=torch.long)
        total = 0.0
        for _ in range(num_draws):
            noise = torch.randn(encoded.latents.shape, generator=g, device=encoded.latents.device,
                                dtype=encoded.latents.dtype)
            pred, target = noisy_prediction(parts, unet, encoded, noise, t)
            total += per_sample_mse(pred, target).mean().item() / num_draws
        out.append(total)
    return out


@torch.no_grad()
def per_pair_errors(parts: DiffusionParts, unet, batch: dict, timestep: int | None = None, seed: int = 0) -> dict:
    """One shared (ε, t) draw per pair; the ``(B,)`` per-element MSEs of winners and losers under the
    policy (LoRA on) and the reference (LoRA off), and the ``(2B, ...)`` predictions and target they
    come from (so a caller can feed the same tensors to :func:`dpo_tutorial.loss.diffusion_dpo_loss`).

    ``timestep``: one fixed t for every pair (e.g. 500), else each pair draws its own.
    """
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    encoded = encode_batch(parts, batch, g)
    noise, t = draw_noise(parts, encoded, g)  # (2B, C, h, w), (2B,): shared within each pair
    if timestep is not None:
        t = torch.full_like(t, int(timestep))
    return _policy_and_reference(parts, unet, encoded, noise, t)


def _policy_and_reference(parts: DiffusionParts, unet, encoded, noise: torch.Tensor, t: torch.Tensor) -> dict:
    """Policy and reference predictions at one shared (ε, t), and their ``(B,)`` winner / loser MSEs."""
    policy, target = noisy_prediction(parts, unet, encoded, noise, t)
    with reference_mode(unet):
        reference, _ = noisy_prediction(parts, unet, encoded, noise, t)
    policy_w, policy_l = split_pairs(per_sample_mse(policy, target))
    ref_w, ref_l = split_pairs(per_sample_mse(reference, target))
    return {"policy_w": policy_w, "policy_l": policy_l, "ref_w": ref_w, "ref_l": ref_l,
            "policy_pred": policy, "ref_pred": reference, "target": target}


@torch.no_grad()
def pair_errors(parts: DiffusionParts, unet, batch: dict, num_draws: int = 8, seed: int = 0) -> dict:
    """Mean MSE of winners and losers under the policy (LoRA on) and the reference (LoRA off).

    The same shared noise/timestep draws are used for both, so the numbers are directly comparable.
    """
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    encoded = encode_batch(parts, batch, g)
    sums = {k: 0.0 for k in ("policy_w", "policy_l", "ref_w", "ref_l")}
    for _ in range(num_draws):
        errors = _policy_and_reference(parts, unet, encoded, *draw_noise(parts, encoded, g))
        for k in sums:
            sums[k] += errors[k].mean().item() / num_draws
    return sums


def first_steps(config, num_steps: int) -> dict:
    """The first ``num_steps`` optimizer steps of a fresh run of ``config`` (the LoRA starts at zero), in a
    temporary folder: nothing is saved.

    Returns ``(num_steps, B)`` tensors ``model_diff``, ``ref_diff`` and ``logits`` of each step's batch
    (all its micro-batches), measured as training measures them, before that step's update, and the
    ``(num_steps,)`` learning rate ``lr`` each update used. Step 1 measures the untrained LoRA (policy =
    reference, so every ``model_diff - ref_diff`` is exactly 0).
    """
    import tempfile

    from .run_dir import release_output_dir
    from .train import optimizer_step, setup_run

    rows = {"model_diff": [], "ref_diff": [], "logits": []}
    lrs = []
    with tempfile.TemporaryDirectory() as folder:
        run = setup_run(config.replace(output_dir=folder, resume=None, max_steps=max(config.max_steps, num_steps),
                                       sample_grid=False, cache_latents=False))  # a few steps: not worth a cache
        try:
            batches = iter(run.stream)
            for _ in range(num_steps):
                lrs.append(run.lr_scheduler.get_last_lr()[0])
                outs, _, _ = optimizer_step(run, batches)
                for key in rows:
                    rows[key].append(torch.cat([getattr(o, key).float().cpu() for o in outs]))
        finally:
            run.accelerator.end_training()
            release_output_dir(folder)
    return {**{key: torch.stack(values) for key, values in rows.items()}, "lr": torch.tensor(lrs)}
