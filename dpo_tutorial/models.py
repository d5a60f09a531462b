"""Loading Stable Diffusion (1.x/2.x) and SDXL parts, the LoRA adapter, and the reference pass.

The reference model of Diffusion-DPO is the frozen starting point. With LoRA we do not keep a second
UNet: the reference is the *same* UNet with its adapter switched off (:func:`reference_mode`). For a
full fine-tune (the paper's setting) a frozen copy is kept instead (:func:`frozen_copy`).
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .hub import check_hub_reachable, is_hub_id

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


# (logger, message fragment): third-party notices the package's own calls trigger that say nothing a
# learner can act on. transformers: "`X` requires torchvision (not installed); falling back to `XPil`" (the
# package never uses torchvision, whose PyPI build does not pair with the CPU torch, and wants the PIL
# fallback); diffusers: "No LoRA keys associated to CLIPTextModel" (our LoRAs adapt the UNet only).
KNOWN_NOTICES = (("transformers.utils.import_utils", "requires torchvision (not installed)"),
                 ("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"),
                 ("diffusers.loaders.lora_pipeline", "No LoRA keys associated to CLIPTextModel"),
                 ("diffusers.loaders.peft", "No LoRA keys associated to CLIPTextModel"))


class _DropNotice:
    """A logging filter that drops records containing one message fragment, and nothing else."""

    def __init__(self, fragment: str):
        self.fragment = fragment

    def filter(self, record) -> bool:
        return self.fragment not in record.getMessage()


def quiet_known_notices() -> None:
    """Drop the :data:`KNOWN_NOTICES` (once per logger); ``dpo_tutorial/__init__.py`` calls it on import,
    before any diffusers or transformers import of the package."""
    import logging

    for name, fragment in KNOWN_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropNotice(fragment))


class ModelError(ValueError):
    """A model folder or hub id cannot be used; the message says what to do."""


@dataclass
class DiffusionParts:
    """Everything a training step needs besides the data."""

    tokenizers: list  # one (SD) or two (SDXL) CLIP tokenizers
    text_encoders: list  # matching text encoders; SDXL's second one returns pooled embeddings
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    is_sdxl: bool
    vae_encode_batch_size: int = 8  # images per VAE encoder call (the diffusers script's default)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "DiffusionParts":
        """Move the VAE, text encoders and UNet to ``device`` (and cast them to ``dtype``, e.g. float16 for
        frozen weights on a GPU), in place; return self. Add a LoRA after the cast: its weights stay fp32."""
        for module in (self.vae, self.unet, *self.text_encoders):
            module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
        return self

    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction``: what the UNet is trained to output."""
        return self.noise_scheduler.config.prediction_type


def check_source(pretrained: str) -> Path | None:
    """Local folder -> Path; hub id -> None; a path that does not exist -> clear error."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise ModelError(f"{pretrained} is not a diffusers pipeline folder (no model_index.json or unet/)")
        return path
    if path.exists() or not is_hub_id(pretrained):
        raise ModelError(f"model folder {pretrained!r} does not exist: pass a diffusers pipeline folder "
                         "or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    return None


def _model_index(pretrained: str, local: Path | None) -> dict:
    if local is not None:
        index = local / "model_index.json"
        return json.loads(index.read_text()) if index.exists() else {}
    from huggingface_hub import hf_hub_download

    try:
        check_hub_reachable(f"model {pretrained!r}")  # fails at once offline instead of retrying
        return json.loads(Path(hf_hub_download(pretrained, "model_index.json")).read_text())
    except Exception as err:  # offline, unknown repo, gated repo...
        raise ModelError(f"could not fetch {pretrained!r} from the Hugging Face Hub ({type(err).__name__}). "
                         "Offline? Download it once with `huggingface-cli download` and pass the folder, "
                         "or use --preset toy, which needs no network.") from err


def load_parts(pretrained: str, vae: str | None = None, prediction_type: str | None = None) -> DiffusionParts:
    """Load tokenizer(s), text encoder(s), VAE, UNet and the DDPM noise scheduler.

    ``pretrained`` is a local pipeline folder or a hub id; SDXL is recognised by its second text
    encoder. ``vae`` optionally replaces the pipeline's VAE (e.g. the SDXL fp16-fix VAE).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    local = check_source(pretrained)
    index = _model_index(pretrained, local)
    diffusers_logging.disable_progress_bar()  # per-file loading bars drown the training bar
    transformers_logging.disable_progress_bar()
    is_sdxl = "text_encoder_2" in index or (local is not None and (local / "text_encoder_2").is_dir())
    root = str(local) if local is not None else pretrained
    try:
        tokenizers = [AutoTokenizer.from_pretrained(root, subfolder="tokenizer", use_fast=False)]
        fp32 = {"torch_dtype": torch.float32}  # fp16-stored weights (the toy's) load as fp32; see _prepare_model
        text_encoders = [CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **fp32)]
        if is_sdxl:
            tokenizers.append(AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", use_fast=False))
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2", **fp32))
        vae_model = (AutoencoderKL.from_pretrained(vae, **fp32) if vae else
                     AutoencoderKL.from_pretrained(root, subfolder="vae", **fp32))
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **fp32)
        scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load the pipeline parts from {pretrained!r}: {str(err)[:300]}") from err
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    for module in (*text_encoders, vae_model, unet):
        module.requires_grad_(False)
        module.eval()
    return DiffusionParts(tokenizers, text_encoders, vae_model, unet, scheduler, is_sdxl)


def add_lora(unet: torch.nn.Module, rank: int = 8, alpha: float | None = None,
             target_modules: list[str] | None = None, init_seed: int | None = None) -> list[torch.nn.Parameter]:
    """Add a peft LoRA adapter to the attention projections; return its trainable parameters.

    The adapter's ``B`` matrices start at zero, so at initialisation the policy equals the reference
    exactly (loss = log 2, implicit accuracy = 0.5).
    """
    from peft import LoraConfig

    if init_seed is not None:
        torch.manual_seed(init_seed)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=target_modules or LORA_TARGET_MODULES)
    unet.add_adapter(config)
    params = [p for n, p in unet.named_parameters() if "lora" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
    return params


@contextmanager
def reference_mode(unet: torch.nn.Module):
    """Run the UNet as the reference model: LoRA adapters off inside the block, back on after."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def frozen_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of ``unet``: the reference for a full fine-tune."""
    ref = copy.deepcopy(unet)
    ref.requires_grad_(False)
    return ref.eval()


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """``(B, L)`` input ids, padded / truncated to the tokenizer's maximum length."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(parts: DiffusionParts, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings for ``B`` captions.

    SD: ``(B, L, D)`` last hidden state and ``None``. SDXL: the penultimate hidden states of both
    encoders concatenated, ``(B, L, D1 + D2)``, and the second encoder's pooled projection ``(B, P)``.
    """
    device = parts.text_encoders[0].device
    if not parts.is_sdxl:
        ids = tokenize(parts.tokenizers[0], captions).to(device)
        return parts.text_encoders[0](ids)[0], None
    embeds, pooled = [], None
    for tok, enc in zip(parts.tokenizers, parts.text_encoders):
        out = enc(tokenize(tok, captions).to(enc.device), output_hidden_states=True)
        embeds.append(out.hidden_states[-2])  # (B, L, D_i)
        pooled = out[0]  # text_embeds of the projection model (the last encoder)
    return torch.cat(embeds, dim=-1), pooled


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning ``(N, 6)``: original (h, w), crop (top, left), target (h, w) per image."""
    target = torch.tensor([resolution, resolution], dtype=torch.long).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1)  # (N, 6)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixel_values: torch.Tensor, generator: torch.Generator | None = None,
                  batch_size: int | None = 8) -> torch.Tensor:
    """``(N, 3, H, W)`` pixels in [-1, 1] -> ``(N, C, H/f, W/f)`` scaled latents sampled from the VAE posterior.

    Encodes ``batch_size`` images per call (``None``: all at once): the encoder's activations at 512 px
    take ~0.5 GB per image in fp32, so 128 images in one call would not fit a 16 GB GPU.
    """
    step = batch_size or pixel_values.shape[0]
    chunks = []
    for start in range(0, pixel_values.shape[0], step):
        pixels = pixel_values[start:start + step].to(device=vae.device, dtype=vae.dtype)
        chunks.append(vae.encode(pixels).latent_dist.sample(generator))  # (b, C, h, w)
    return torch.cat(chunks) * vae.config.scaling_factor


def latent_elements(vae_config: dict, resolution: int) -> int:
    """Elements in one image's latent at ``resolution`` px: ``C * (resolution / f) ** 2``, with ``C`` the VAE's
    ``latent_channels`` and ``f = 2 ** (len(block_out_channels) - 1)`` its downsampling factor. ``vae_config``:
    a VAE's config mapping (``vae.config``, ``AutoencoderKL.load_config(...)``, or a dict of those two keys).

    This is the ``d`` that :func:`dpo_tutorial.loss.per_sample_mse` divides a squared norm by: 4 * 8 * 8 = 256
    for the toy at 32 px, 4 * 64 * 64 = 16,384 for SD 1.5 at 512 px and 4 * 128 * 128 = 65,536 for SDXL at
    1024 px (their VAEs: 4 latent channels, four blocks, f = 8).
    """
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return int(vae_config["latent_channels"]) * (resolution // factor) ** 2


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    r"""What the UNet must predict: ε, or :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ModelError(f"unsupported prediction_type {kind!r}: expected 'epsilon' or 'v_prediction'")
