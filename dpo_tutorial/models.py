"""Loading Stable Diffusion (1.x/2.x) and SDXL parts, preparing them for training, the LoRA adapter, the
reference pass, and saving what was trained.

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
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import hf_hub_download
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
from transformers.utils import logging as transformers_logging

from . import files
from .errors import ModelError
from .hub import check_hub_reachable, is_hub_id
from .run_dir import LORA_FILE

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


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


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are stored in under ``mixed_precision`` (``no``: float32); trained ones stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def prepare_for_training(parts: DiffusionParts, config, dtype: torch.dtype):
    """Freeze what is not trained and cast it to ``dtype``, add the LoRA (or unfreeze the UNet for a full
    fine-tune, keeping a frozen reference copy in ``dtype``), apply the speed options; ``(params, ref_unet)``.

    ``ref_unet`` is ``None`` for a LoRA (the reference is the UNet with its adapter off) and for SFT, which
    never runs a reference.
    """
    unet = parts.unet
    frozen = [parts.vae, *parts.text_encoders] + ([] if config.full_finetune else [unet])
    if dtype != torch.float32:  # frozen weights in half precision; trained ones stay fp32
        for module in frozen:
            module.to(dtype=dtype)
    ref_unet = None
    if config.full_finetune:
        if config.loss_type != "sft":  # SFT never runs a reference: no second UNet in memory
            ref_unet = frozen_copy(unet).to(dtype=dtype)
        unet.requires_grad_(True)
        params = list(unet.parameters())
    else:
        params = add_lora(unet, config.rank, config.lora_alpha, init_seed=config.seed)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    apply_speed_options(config, [u for u in (unet, ref_unet) if u is not None])
    unet.train()
    return params, ref_unet


def apply_speed_options(config, unets: list) -> None:
    """Opt-in GPU speed settings (each benchmarked in ``benchmarks/``, none assumed to help)."""
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for unet in unets:
        if config.channels_last:
            unet.to(memory_format=torch.channels_last)
        if config.compile_unet:
            unet.compile()  # in place: parameter names (LoRA export, checkpoints) stay unchanged


def export_lora(unet, output_dir: str | Path, is_sdxl: bool) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` in the diffusers format (``load_lora_weights`` reads it).

    The adapter computes :math:`W + \tfrac{\alpha}{r} B A`; the file stores no α, and a loader then takes
    :math:`\alpha = r`, so the scale :math:`\alpha / r` is folded into each ``lora.up`` (B) matrix: any loader
    reproduces the trained model whatever ``--lora-alpha`` was. It is written in a temporary folder and
    renamed into place, so a cut export never looks finished.
    """
    adapter = unet.peft_config["default"]
    scale = adapter.lora_alpha / adapter.r
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: (v.detach().float() * (scale if ".lora.up." in k else 1.0)).cpu().contiguous()
             for k, v in state.items()}
    cls = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    out = Path(output_dir)
    tmp = files.fresh_folder(out / ".tmp-lora")
    cls.save_lora_weights(save_directory=str(tmp), unet_lora_layers=state, safe_serialization=True)
    files.replace_file(tmp / LORA_FILE, out / LORA_FILE)
    files.remove(tmp)
    return out / LORA_FILE


def export_unet(unet, output_dir: str | Path) -> Path:
    """Save a fully fine-tuned UNet as ``<output_dir>/unet`` (a diffusers model folder), atomically."""
    out = Path(output_dir)
    tmp = files.fresh_folder(out / ".tmp-unet")
    unet.save_pretrained(tmp)
    return files.replace_folder(tmp, out / "unet")


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


def latent_shape(vae_config: dict, resolution: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of one image's latent at ``resolution`` px: ``C`` is the VAE's ``latent_channels`` and
    ``h = w = resolution / f`` with ``f = 2 ** (len(block_out_channels) - 1)`` its downsampling factor.
    ``vae_config``: a VAE's config mapping (``vae.config``, ``AutoencoderKL.load_config(...)``, or a dict of
    those two keys)."""
    side = resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    return int(vae_config["latent_channels"]), side, side


def latent_elements(vae_config: dict, resolution: int) -> int:
    """Elements ``d = C * h * w`` in one image's latent at ``resolution`` px (:func:`latent_shape`).

    This is the ``d`` that :func:`dpo_tutorial.loss.per_sample_mse` divides a squared norm by: 4 * 8 * 8 = 256
    for the toy at 32 px, 4 * 64 * 64 = 16,384 for SD 1.5 at 512 px and 4 * 128 * 128 = 65,536 for SDXL at
    1024 px (their VAEs: 4 latent channels, four blocks, f = 8).
    """
    c, h, w = latent_shape(vae_config, resolution)
    return c * h * w


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    r"""What the UNet must predict: ε, or :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ModelError(f"unsupported prediction_type {kind!r}: expected 'epsilon' or 'v_prediction'")
