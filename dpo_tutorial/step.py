"""One Diffusion-DPO step, shared by training, evaluation, analysis, notebooks and benchmarks.

For a batch of ``B`` pairs laid out as ``2B`` images (the ``B`` winners ``x_w`` first, then the ``B``
losers ``x_l``):

1. :func:`encode_batch`: the frozen VAE turns images into latents ``x_0`` and the text encoder(s) turn
   the ``B`` captions into embeddings (or a latent-cache batch supplies both);
2. :func:`~dpo_tutorial.noise.shared_noise` / :func:`~dpo_tutorial.noise.shared_timesteps`: one ε and
   one t per pair, the same for its winner and loser;
3. :func:`noisy_prediction`: :math:`x_t = \\sqrt{\\bar\\alpha_t} x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon`,
   the UNet's prediction at :math:`(x_t, t)` and what it should have predicted (ε, or
   :math:`v = \\sqrt{\\bar\\alpha_t}\\epsilon - \\sqrt{1-\\bar\\alpha_t}x_0` for v-prediction models);
4. the same for the reference (the UNet with its LoRA off, or a frozen copy), without gradients;
5. :func:`~dpo_tutorial.loss.diffusion_dpo_loss` (Wallace et al., arXiv 2311.12908, Eq. 14).

The paper's supervised baseline (``loss_type="sft"``) reads only the winners: one policy pass over the
``B`` winner rows and no reference pass (:func:`~dpo_tutorial.loss.sft_loss`).

:func:`dpo_step` does all five; the notebooks and :mod:`dpo_tutorial.analysis` call the pieces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss import DPOLossOutput, diffusion_dpo_loss, sft_loss
from .models import (
    DiffusionParts,
    diffusion_target,
    encode_images,
    encode_prompts,
    reference_mode,
    sdxl_time_ids,
)
from .noise import shared_noise, shared_timesteps


@dataclass
class EncodedBatch:
    """A batch after the frozen encoders: what every UNet pass of a step conditions on."""

    latents: torch.Tensor  # (2B, C, h, w) scaled VAE latents x_0, winners then losers
    prompt_embeds: torch.Tensor  # (2B, L, D): rows i and i + B share caption i
    added_cond: dict | None  # SDXL: {"text_embeds": (2B, P), "time_ids": (2B, 6)}; SD: None

    @property
    def num_pairs(self) -> int:
        """``B``: the number of preference pairs (half the rows)."""
        return self.latents.shape[0] // 2

    def winners(self) -> "EncodedBatch":
        """The first ``B`` rows of everything: the winners ``x_w`` and their captions."""
        b = self.num_pairs
        added = None if self.added_cond is None else {k: v[:b] for k, v in self.added_cond.items()}
        return EncodedBatch(self.latents[:b], self.prompt_embeds[:b], added)

    def to(self, dtype: torch.dtype) -> "EncodedBatch":
        """Everything cast to ``dtype`` (a model's weights' dtype: a frozen copy kept in bf16, say)."""
        added = None if self.added_cond is None else {k: v.to(dtype) for k, v in self.added_cond.items()}
        return EncodedBatch(self.latents.to(dtype), self.prompt_embeds.to(dtype), added)


def unet_forward(unet, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                 added_cond: dict | None) -> torch.Tensor:
    """One UNet pass: ``(2B, C, h, w)`` noisy latents -> ``(2B, C, h, w)`` prediction."""
    return unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added_cond, return_dict=False)[0]


def encode_batch(parts: DiffusionParts, batch: dict, generator: torch.Generator | None = None,
                 resolution: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> EncodedBatch:
    """Latents and conditioning of a collated batch, cast to the UNet's ``dtype`` and ``device``.

    From images (VAE + text encoders, as the public recipe does every step) or, for a batch from the
    latent cache, by sampling ``mean + std * randn`` — the same draw ``latent_dist.sample`` makes.
    The ``B`` caption embeddings are repeated to ``2B`` rows (winner and loser share a caption).
    """
    if "latent_mean" in batch:
        mean = batch["latent_mean"].to(parts.vae.device)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        latents = (mean + batch["latent_std"].to(mean.device) * noise) * parts.vae.config.scaling_factor
        prompt_embeds, pooled, time_ids = batch["prompt_embeds"], batch.get("pooled"), batch["time_ids"]
    else:
        latents = encode_images(parts.vae, batch["pixel_values"], generator,
                                parts.vae_encode_batch_size)  # (2B, C, h, w)
        prompt_embeds, pooled = encode_prompts(parts, batch["captions"])  # (B, L, D), (B, P) or None
        time_ids = None
        if parts.is_sdxl:
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"],
                                     resolution or batch["pixel_values"].shape[-1])
    dtype = dtype or latents.dtype
    device = device or latents.device
    latents = latents.to(device, dtype)
    prompt_embeds = prompt_embeds.repeat(2, 1, 1).to(device, dtype)  # (2B, L, D)
    added_cond = None
    if parts.is_sdxl:
        added_cond = {"text_embeds": pooled.repeat(2, 1).to(device, dtype),  # (2B, P)
                      "time_ids": time_ids.to(device, dtype)}  # (2B, 6)
    return EncodedBatch(latents, prompt_embeds, added_cond)


def noisy_prediction(parts: DiffusionParts, unet, encoded: EncodedBatch, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(prediction, target)``, both ``(2B, C, h, w)``, for any prediction type.

    Noises the latents with the DDPM forward process, runs ``unet`` at ``(x_t, t)`` and returns what it
    should have predicted: ε for ε-prediction, :math:`v` for v-prediction (SD 2.x 768-px models).
    """
    noisy = parts.noise_scheduler.add_noise(encoded.latents, noise, timesteps)  # (2B, C, h, w)
    target = diffusion_target(parts.noise_scheduler, encoded.latents, noise, timesteps)
    return unet_forward(unet, noisy, timesteps, encoded.prompt_embeds, encoded.added_cond), target


def draw_noise(parts: DiffusionParts, encoded: EncodedBatch, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One shared ``(2B, C, h, w)`` noise and ``(2B,)`` timesteps: the same ε and t for a pair's two images."""
    noise = shared_noise(encoded.latents, generator)
    timesteps = shared_timesteps(encoded.num_pairs, parts.noise_scheduler.config.num_train_timesteps,
                                 encoded.latents.device, generator)
    return noise, timesteps


def dpo_step(parts: DiffusionParts, unet, batch: dict, beta: float, loss_type: str = "sigmoid",
             generator: torch.Generator | None = None, ref_unet=None, noise: torch.Tensor | None = None,
             timesteps: torch.Tensor | None = None, resolution: int | None = None) -> DPOLossOutput:
    """The Diffusion-DPO loss of one winners-then-losers batch (forward only; the caller backprops).

    ``unet`` is the policy (possibly wrapped by accelerate/DDP). The reference is ``ref_unet`` when
    given (full fine-tune), else the same UNet with its LoRA switched off. ``noise``/``timesteps``
    override the random draw (tests hold them fixed). ``loss_type="sft"`` runs the policy on the ``B``
    winners only (the losers' rows would get no gradient) and no reference: half a DPO step's policy work.
    """
    base = getattr(unet, "module", unet)
    param = next(p for p in base.parameters())
    encoded = encode_batch(parts, batch, generator, resolution, dtype=param.dtype, device=param.device)
    if noise is None or timesteps is None:
        drawn_noise, drawn_t = draw_noise(parts, encoded, generator)
        noise = drawn_noise if noise is None else noise
        timesteps = drawn_t if timesteps is None else timesteps
    if loss_type == "sft":
        b = encoded.num_pairs
        model_pred_w, target_w = noisy_prediction(parts, unet, encoded.winners(), noise[:b], timesteps[:b])
        return sft_loss(model_pred_w, target_w)  # (B, C, h, w) each: the winners' rows only
    model_pred, target = noisy_prediction(parts, unet, encoded, noise, timesteps)
    with torch.no_grad():
        if ref_unet is not None:  # a frozen copy in its own dtype (bf16 under mixed precision), run without autocast
            ref_dtype = next(ref_unet.parameters()).dtype
            ref_pred, _ = noisy_prediction(parts, ref_unet, encoded.to(ref_dtype), noise.to(ref_dtype), timesteps)
        else:
            with reference_mode(base):
                ref_pred, _ = noisy_prediction(parts, base, encoded, noise, timesteps)
    return diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta, loss_type=loss_type)
