"""Tiny random-weight stand-ins of exactly the real formats, for tests and benchmarks (no download).

- :func:`build_tiny_pipeline`: an SD-shaped (or SDXL-shaped) diffusers pipeline folder that
  ``StableDiffusionPipeline.from_pretrained`` / ``StableDiffusionXLPipeline.from_pretrained`` load.
- Pick-a-Pic v2 rows and files: build them with :mod:`dpo_tutorial.pickapic` (production code).
- :func:`build_tiny_pickscore`: a PickScore-format folder (``CLIPModel`` weights + CLIP processor files)
  that :class:`dpo_tutorial.pickscore.PickScore` loads in place of the hub's 4 GB model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..tokenizer import build_clip_tokenizer

WORDS = ["a", "an", "red", "green", "blue", "yellow", "circle", "square", "triangle", "photo", "of", "cat", "dog"]


def _text_config(tokenizer, hidden: int) -> dict:
    """A 2-layer CLIP text tower sized ``hidden`` whose vocabulary and special tokens match ``tokenizer``."""
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _text_encoder(tokenizer, hidden: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(**_text_config(tokenizer, hidden), projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(seed: int, latent_factor: int = 2):
    from diffusers import AutoencoderKL

    blocks = {2: 2, 4: 3, 8: 4}.get(latent_factor)
    if blocks is None:
        raise ValueError(f"latent_factor={latent_factor!r}: expected 2, 4 or 8 (SD's VAE downsamples by 8)")
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * blocks,
                         up_block_types=["UpDecoderBlock2D"] * blocks, block_out_channels=[8, 16, 16, 16][:blocks],
                         latent_channels=4,
                         layers_per_block=1, norm_num_groups=4, sample_size=32)


def _unet(cross_dim: int, sample_size: int, sdxl: bool, seed: int, pooled_dim: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + pooled_dim)
    return UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=[16, 32], norm_num_groups=8, attention_head_dim=4,
                                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                                cross_attention_dim=cross_dim, **extra)


def build_tiny_pipeline(out_dir: str | Path, sdxl: bool = False, prediction_type: str = "epsilon",
                        resolution: int = 32, seed: int = 0, latent_factor: int = 2) -> Path:
    """Write a tiny random-weight SD (or SDXL) pipeline folder; return its path.

    Same folders, classes and config keys as the real checkpoints: CLIP tokenizer(s), CLIP text
    encoder(s) (SDXL: the second with a projection for pooled embeddings), an AutoencoderKL with a
    downsampling factor of ``latent_factor`` (2; 8 as in SD, for 512-px stand-ins whose UNet attends over
    64x64 latents instead of 256x256), a UNet2DConditionModel (SDXL: ``text_time`` micro-conditioning), and a
    DDPM scheduler.
    """
    from diffusers import (
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    out = Path(out_dir)
    tok = build_clip_tokenizer(WORDS, out / "tokenizer")
    enc = _text_encoder(tok, 16, projection=False, seed=seed)
    vae = _vae(seed + 1, latent_factor)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type, clip_sample=False,
                              steps_offset=1)
    sample_size = resolution // latent_factor
    if not sdxl:
        unet = _unet(16, sample_size, False, seed + 2)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        tok2 = build_clip_tokenizer(WORDS, out / "tokenizer_2")
        enc2 = _text_encoder(tok2, 16, projection=True, seed=seed + 3)
        unet = _unet(32, sample_size, True, seed + 2, pooled_dim=16)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc, text_encoder_2=enc2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(out))
    return out


def build_tiny_pickscore(out_dir: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny random-weight PickScore stand-in to ``out_dir``; return its path.

    The same classes and files as ``yuvalkirstain/PickScore_v1`` (a ``CLIPModel``) plus
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s processor (CLIP tokenizer + ``CLIPImageProcessor``:
    resize, centre crop, CLIP mean/std), in one folder, shrunk to ``image_size`` px and 2 layers.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(out_dir)
    tok = build_clip_tokenizer(WORDS, out, model_max_length=77)
    text = _text_config(tok, hidden=32)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                              "width": image_size})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(out))
    model.save_pretrained(str(out))
    return out
