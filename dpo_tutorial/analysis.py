"""Measurements the notebooks show: which sharing of ε and t buys what, errors by noise level, per-pair errors.
(The first optimizer steps of a fresh run are measured by :func:`dpo_tutorial.train.first_steps`.)"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from .loss import pair_mse, per_sample_mse
from .models import DiffusionParts, reference_mode
from .run_dir import LORA_FILE
from .step import EncodedBatch, draw_noise, encode_batch, noisy_prediction


SHARING = {"t and ε": (True, True), "t only": (False, True), "ε only": (True, False), "neither": (False, False)}


def seeded_encoding(parts: DiffusionParts, batch: dict, seed: int) -> tuple[torch.Generator, EncodedBatch]:
    """A generator seeded with ``seed`` on the models' device and the batch encoded with it (latents
    ``(2B, C, h, w)``, embeddings ``(2B, L, D)``): the start of every measurement here, so each is reproducible."""
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    return g, encode_batch(parts, batch, g)


@torch.no_grad()
def model_diff_draws(parts: DiffusionParts, unet, batch: dict, num_draws: int, share_noise: bool = True,
                     share_timesteps: bool = True, seed: int = 0) -> torch.Tensor:
    """``(num_draws, B)`` one-draw estimates of each pair's ``model_diff = mse(x_w) - mse(x_l)``.

    ``share_noise`` / ``share_timesteps``: winner and loser get the same ε / the same t (the recipe
    shares both, :data:`SHARING` names the four combinations); otherwise each image draws its own. The
    latents are encoded once; the target is the model's own (ε or v), as in training.
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    steps = parts.noise_scheduler.config.num_train_timesteps
    latents = encoded.latents
    out = []
    for _ in range(num_draws):
        noise, t = draw_noise(parts, encoded, g)  # (2B, C, h, w), (2B,): halves identical
        if not share_noise:
            noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        if not share_timesteps:
            t = torch.randint(0, steps, (latents.shape[0],), generator=g, device=latents.device)
        mse_w, mse_l = pair_mse(*noisy_prediction(parts, unet, encoded, noise, t))
        out.append(mse_w - mse_l)
    return torch.stack(out)  # (num_draws, B)


# How the one-draw estimate of a pair's logit draws its noise and timesteps. ``pair``: winner and loser share ε and t
# (the repeat trick); ``ref_noise`` / ``ref_t``: the reference pass sees the policy's ε / t (the same x_t).
COUPLINGS = {
    "everything shared": dict(pair=True, ref_noise=True, ref_t=True),
    "winner and loser apart": dict(pair=False, ref_noise=True, ref_t=True),
    "reference: own ε": dict(pair=True, ref_noise=False, ref_t=True),
    "reference: own t": dict(pair=True, ref_noise=True, ref_t=False),
    "reference: own ε and t": dict(pair=True, ref_noise=False, ref_t=False),
}


def _draw(parts: DiffusionParts, encoded: EncodedBatch, g: torch.Generator, pair: bool):
    """One ``(2B, C, h, w)`` noise and ``(2B,)`` timesteps: shared by each pair's two images, or each image its own."""
    if pair:
        return draw_noise(parts, encoded, g)
    latents = encoded.latents
    steps = parts.noise_scheduler.config.num_train_timesteps
    return (torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype),
            torch.randint(0, steps, (latents.shape[0],), generator=g, device=latents.device))


@torch.no_grad()
def logit_draws(parts: DiffusionParts, unet, batch: dict, num_draws: int, beta: float, pair: bool = True,
                ref_noise: bool = True, ref_t: bool = True, seed: int = 0) -> torch.Tensor:
    r"""``(num_draws, B)`` one-draw estimates of each pair's logit :math:`z = -\tfrac{\beta}{2}(\text{model\_diff} -
    \text{ref\_diff})`: the quantity the loss sees (Wallace et al. Eq. 14), ``unet`` carrying a LoRA (the policy) and
    the reference being the same UNet with it off.

    ``pair``: winner and loser share their ε and t (else each image draws its own); ``ref_noise`` / ``ref_t``: the
    reference sees the policy's ε / t (else it draws its own, coupled within the pair in the same way).
    :data:`COUPLINGS` names the ways the notebooks compare. The expectation of :math:`z` is the same for all of them;
    what the coupling changes is how far one draw strays from it.
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    out = []
    for _ in range(num_draws):
        noise, t = _draw(parts, encoded, g, pair)
        own_noise, own_t = _draw(parts, encoded, g, pair)  # drawn every time, so the stream of draws is the same
        policy_w, policy_l = pair_mse(*noisy_prediction(parts, unet, encoded, noise, t))
        with reference_mode(unet):
            ref_w, ref_l = pair_mse(*noisy_prediction(parts, unet, encoded, noise if ref_noise else own_noise,
                                                      t if ref_t else own_t))
        out.append(-0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l)))  # (B,)
    return torch.stack(out)  # (num_draws, B)


def logit_variance_table(parts: DiffusionParts, unet, batch: dict, num_draws: int, beta: float,
                         seed: int = 0) -> dict[str, dict]:
    """For each way of drawing (:data:`COUPLINGS`): the per-pair variance of the one-draw logit estimate relative to
    sharing everything (median over pairs, and pooled over pairs), the mean logit, and the ``(num_draws, B)`` draws."""
    draws = {name: logit_draws(parts, unet, batch, num_draws, beta, seed=seed, **coupling)
             for name, coupling in COUPLINGS.items()}
    base = draws["everything shared"]
    return {name: {"variance_ratio_median": float((d.var(dim=0) / base.var(dim=0)).median()),
                   "variance_ratio_pooled": float((d - d.mean(0)).pow(2).mean() / (base - base.mean(0)).pow(2).mean()),
                   "mean_logit": float(d.mean()), "draws": d}
            for name, d in draws.items()}


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
    g, encoded = seeded_encoding(parts, batch, seed)
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
    g, encoded = seeded_encoding(parts, batch, seed)
    noise, t = draw_noise(parts, encoded, g)  # (2B, C, h, w), (2B,): shared within each pair
    if timestep is not None:
        t = torch.full_like(t, int(timestep))
    return _policy_and_reference(parts, unet, encoded, noise, t)


def _policy_and_reference(parts: DiffusionParts, unet, encoded, noise: torch.Tensor, t: torch.Tensor) -> dict:
    """Policy and reference predictions at one shared (ε, t), and their ``(B,)`` winner / loser MSEs."""
    policy, target = noisy_prediction(parts, unet, encoded, noise, t)
    with reference_mode(unet):
        reference, _ = noisy_prediction(parts, unet, encoded, noise, t)
    policy_w, policy_l = pair_mse(policy, target)
    ref_w, ref_l = pair_mse(reference, target)
    return {"policy_w": policy_w, "policy_l": policy_l, "ref_w": ref_w, "ref_l": ref_l,
            "policy_pred": policy, "ref_pred": reference, "target": target}


@torch.no_grad()
def pair_errors(parts: DiffusionParts, unet, batch: dict, num_draws: int = 8, seed: int = 0) -> dict:
    """Mean MSE of winners and losers under the policy (LoRA on) and the reference (LoRA off).

    The same shared noise/timestep draws are used for both, so the numbers are directly comparable.
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    sums = {k: 0.0 for k in ("policy_w", "policy_l", "ref_w", "ref_l")}
    for _ in range(num_draws):
        errors = _policy_and_reference(parts, unet, encoded, *draw_noise(parts, encoded, g))
        for k in sums:
            sums[k] += errors[k].mean().item() / num_draws
    return sums



def variance_ratio(draws: torch.Tensor, base: torch.Tensor) -> float:
    r"""How much noisier one way of drawing is than another, pair by pair: the median over pairs :math:`i` of
    :math:`\mathrm{Var}(\text{draws}_{\cdot i}) / \mathrm{Var}(\text{base}_{\cdot i})`, each variance over the
    ``num_draws`` one-draw estimates of pair :math:`i` (unbiased, ``N - 1`` in the denominator).

    ``draws``, ``base``: ``(num_draws, B)``, e.g. two entries' ``draws`` of :func:`logit_variance_table` (whose
    ``variance_ratio_median`` is this against ``everything shared``). The median is torch's: the lower of the two
    middle values when ``B`` is even.
    """
    if draws.dim() != 2 or draws.shape[1] != base.shape[1] or min(draws.shape[0], base.shape[0]) < 2:
        raise ValueError(f"expected (num_draws >= 2, B) draws of the same B pairs, got {tuple(draws.shape)} and "
                         f"{tuple(base.shape)}")
    return float((draws.var(dim=0) / base.var(dim=0)).median())


@torch.no_grad()
def policy_reference_draws(parts: DiffusionParts, unet, batch: dict, num_draws: int, seed: int = 0) -> dict:
    r"""Per image, the policy's and the reference's errors at the *same* draws: ``policy`` and ``reference``, each
    ``(num_draws, 2B)`` per-element MSEs :math:`\|\epsilon - \epsilon_\theta(x_t, t)\|^2 / d` (winners then losers),
    and the ``(num_draws, 2B)`` ``timesteps`` each draw used (one shared ε and t per pair, as in training).

    The two errors of an image rise and fall together with the draw (mostly with t); their difference, which is
    what enters the logit, keeps little of the draw's noise: the reference acts as a control variate.
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    rows = {"policy": [], "reference": [], "timesteps": []}
    for _ in range(num_draws):
        noise, t = draw_noise(parts, encoded, g)  # (2B, C, h, w), (2B,)
        errors = _policy_and_reference(parts, unet, encoded, noise, t)
        rows["policy"].append(torch.cat([errors["policy_w"], errors["policy_l"]]).float().cpu())  # (2B,)
        rows["reference"].append(torch.cat([errors["ref_w"], errors["ref_l"]]).float().cpu())
        rows["timesteps"].append(t.cpu())
    return {key: torch.stack(values) for key, values in rows.items()}  # each (num_draws, 2B)


def lora_weight_change(lora_dir) -> float:
    r"""How far a saved LoRA moves the UNet's weights: :math:`\sqrt{\sum_\ell \|\Delta W_\ell\|_F^2}` over the adapted
    layers :math:`\ell`, with :math:`\Delta W_\ell = \tfrac{\alpha}{r}\,B_\ell A_\ell` (``lora.up`` times ``lora.down``
    in the diffusers file ``<lora_dir>/pytorch_lora_weights.safetensors``; :math:`\alpha/r = 1` when the file stores
    no alpha). It is 0 at initialisation (:math:`B = 0`) and contains no β: under AdamW it grows with the learning
    rate and the number of steps.
    """
    weights = load_file(str(Path(lora_dir) / LORA_FILE))
    total = 0.0
    for name, down in weights.items():
        if not name.endswith(("lora.down.weight", "lora_A.weight")):
            continue
        prefix = name.rsplit(".lora", 1)[0]
        up = weights[name.replace("lora.down", "lora.up").replace("lora_A", "lora_B")]
        rank = down.shape[0]
        alpha = weights.get(f"{prefix}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / rank
        delta = scale * up.float().reshape(up.shape[0], -1) @ down.float().reshape(rank, -1)  # (out, in)
        total += delta.pow(2).sum().item()
    if not total and not any(n.endswith(("lora.down.weight", "lora_A.weight")) for n in weights):
        raise ValueError(f"{Path(lora_dir) / LORA_FILE} holds no LoRA down/up (A/B) matrices")
    return math.sqrt(total)
