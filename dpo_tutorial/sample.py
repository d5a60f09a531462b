"""Images with and without the DPO LoRA, for the same captions and seeds; the grids that show them."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageDraw, ImageFont
from transformers.utils import logging as transformers_logging

from . import files
from .hub import check_hub_reachable, is_hub_id
from .models import DiffusionParts, ModelError, check_source, reference_mode


def make_pipeline(parts: DiffusionParts, unet: torch.nn.Module | None = None):
    """A diffusers text-to-image pipeline assembled from already-loaded parts (no reload)."""
    unet = unet if unet is not None else parts.unet
    if parts.is_sdxl:
        pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoders[0],
                                         text_encoder_2=parts.text_encoders[1], tokenizer=parts.tokenizers[0],
                                         tokenizer_2=parts.tokenizers[1], unet=unet, scheduler=parts.noise_scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoders[0],
                                       tokenizer=parts.tokenizers[0], unet=unet, scheduler=parts.noise_scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(pretrained: str | Path, device: str | torch.device | None = None):
    """A ``StableDiffusionPipeline`` with no safety checker and no progress bar, on ``device`` (default CPU).

    float32 on CPU (the toy ships fp16 weights), float16 on a GPU, where the VAE also decodes one image at
    a time (8 decoded 512-px images at once would take ~8 GB of a 16 GB card).
    """
    device = torch.device(device or "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(pretrained), **dtype_kwarg(dtype), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        pipe.vae.enable_slicing()
    return pipe.to(device)


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``{"dtype": dtype}`` for diffusers >= 0.40, which deprecates ``torch_dtype``; ``{"torch_dtype": ...}`` before."""
    major, minor = (int(part) for part in version("diffusers").split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 40) else {"torch_dtype": dtype}


@torch.no_grad()
def generate(pipe, captions: list[str], seeds: list[int], steps: int = 25, guidance_scale: float = 7.5,
             resolution: int | None = None, batch_size: int = 400) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 images, image ``i`` from ``captions[i]`` with ``torch.Generator`` seed ``seeds[i]``.

    Each image has its own generator, so it depends only on its caption and seed (not on the batch).
    """
    if len(captions) != len(seeds):
        raise ValueError(f"need one seed per caption, got {len(captions)} captions and {len(seeds)} seeds")
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in range(0, len(captions), batch_size):
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        images = pipe(list(captions[i:i + batch_size]), num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generators, height=size, width=size, output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def generate_with_and_without_lora(pipe, captions: list[str], seeds: list[int], **kw) -> tuple[np.ndarray, np.ndarray]:
    """(base images, DPO images): the same captions and seeds with the LoRA adapter off, then on."""
    with reference_mode(pipe.unet):
        base = generate(pipe, captions, seeds, **kw)
    return base, generate(pipe, captions, seeds, **kw)


def image_grid(rows: list[np.ndarray], scale: int = 1, pad: int = 2) -> Image.Image:
    """Stack equal-length rows of ``(N, H, W, 3)`` uint8 images into one PIL grid (white padding)."""
    n, h, w = rows[0].shape[:3]
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = img
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(rows: list[np.ndarray], row_labels: list[str], captions: list[str], scale: int = 1,
                  pad: int = 2, font_size: int | None = None) -> Image.Image:
    """:func:`image_grid` with each row's label at its left and each column's caption above it (text height:
    ``font_size`` pixels, by default 1/12 of an image and at least 12)."""
    if len(row_labels) != len(rows) or len(captions) != rows[0].shape[0]:
        raise ValueError(f"labelled_grid: {len(row_labels)} row labels and {len(captions)} captions for a grid of "
                         f"{len(rows)} rows x {rows[0].shape[0]} columns; expected one per row and per column")
    grid = image_grid(rows, scale=scale, pad=pad)
    font_size = font_size or max(12, rows[0].shape[1] * scale // 12)
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(grid)
    w, h = rows[0].shape[2] * scale, rows[0].shape[1] * scale
    step_x, step_y = (rows[0].shape[2] + pad) * scale, (rows[0].shape[1] + pad) * scale
    wrapped = [_wrap(c, measure, font, w) for c in captions]
    line_h = font_size + 3
    left = int(max(measure.textlength(t, font=font) for t in row_labels)) + 10
    top = line_h * max(len(lines) for lines in wrapped) + 6
    canvas = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(wrapped):
        centre = left + pad * scale + c * step_x + w / 2
        for i, line in enumerate(lines):
            draw.text((centre, 3 + i * line_h), line, fill="black", font=font, anchor="ma")
    for r, label in enumerate(row_labels):
        draw.text((left - 6, top + pad * scale + r * step_y + h / 2), label, fill="black", font=font, anchor="rm")
    return canvas


def write_sample_grid(parts: DiffusionParts, unet, captions: list[str], path: str | Path, steps: int,
                      guidance_scale: float, resolution: int) -> Path:
    """A run's closing picture: up to 4 distinct ``captions`` (seeds 0, 1, ...) drawn by the base model (top row,
    LoRA off) and by the trained LoRA (bottom row), saved as a labelled PNG at ``path``."""
    unet.eval()
    caps = list(dict.fromkeys(captions))[:4]
    base, dpo = generate_with_and_without_lora(make_pipeline(parts, unet), caps, list(range(len(caps))),
                                               steps=steps, guidance_scale=guidance_scale, resolution=resolution)
    grid = labelled_grid([base, dpo], ["base", "DPO"], caps, scale=max(1, 128 // resolution))
    with files.atomic(path) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)


def load_text2image_pipeline(pretrained: str | Path, device: str | torch.device | None = None,
                             dtype: torch.dtype | None = None, vae: str | Path | None = None):
    """A Stable Diffusion 1.x/2.x or SDXL pipeline (SDXL recognised by its ``text_encoder_2``), folder or hub id.

    No safety checker, no progress bar; ``dtype`` defaults to float16 on a GPU and float32 on a CPU (as
    :func:`load_pipeline`); ``vae`` replaces the pipeline's VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``, which
    SDXL needs in float16). Raises ``ModelError`` with one line when the pipeline cannot be loaded.
    """

    diffusers_logging.disable_progress_bar()  # per-file loading bars would drown the evaluation's own
    transformers_logging.disable_progress_bar()
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    local = check_source(str(pretrained))
    try:
        if local is None:
            check_hub_reachable(f"model {str(pretrained)!r}")
        index = DiffusionPipeline.load_config(str(pretrained))
        extra = {"vae": AutoencoderKL.from_pretrained(str(vae), **dtype_kwarg(dtype))} if vae else {}
        if "text_encoder_2" in index:
            pipe = StableDiffusionXLPipeline.from_pretrained(str(pretrained), **dtype_kwarg(dtype), **extra)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(pretrained), **dtype_kwarg(dtype), safety_checker=None,
                                                           requires_safety_checker=False, **extra)
    except (OSError, ValueError, ConnectionError) as err:
        raise ModelError(f"could not load the pipeline {str(pretrained)!r}"
                         f"{f' with the VAE {str(vae)!r}' if vae else ''} ({' '.join(str(err).split())[:200]}): "
                         "expected a diffusers SD/SDXL pipeline folder or hub id") from err
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        pipe.vae.enable_slicing()
    return pipe.to(device)


def load_unet(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """A full ``UNet2DConditionModel`` (e.g. a DPO-tuned UNet such as ``mhdang/dpo-sd1.5-text2image-v1``).

    ``source``: a folder or hub id holding the UNet's ``config.json`` and weights, or a pipeline-style
    ``unet/`` subfolder of one (the released DPO models keep theirs there). Raises ``ModelError`` otherwise.
    """

    path = Path(str(source)).expanduser()
    if path.is_dir():
        candidates = [sub for sub in (None, "unet") if (path / (sub or "") / "config.json").is_file()][:1]
        if not candidates:
            raise ModelError(f"{source} holds no UNet: expected config.json and weights in it or in its unet/ "
                             "subfolder")
    elif is_hub_id(str(source)):
        try:
            check_hub_reachable(f"model {str(source)!r}")
        except ConnectionError as err:
            raise ModelError(f"could not reach the UNet {str(source)!r}: {err}") from err
        candidates = ["unet", None]  # the released DPO repositories keep the UNet in unet/
    else:
        raise ModelError(f"UNet {str(source)!r} does not exist: expected a folder or a hub id such as "
                         "'mhdang/dpo-sd1.5-text2image-v1'")
    errors = []
    for subfolder in candidates:
        try:
            unet = UNet2DConditionModel.from_pretrained(str(source), subfolder=subfolder, **dtype_kwarg(dtype))
            return unet.to(device or "cpu").eval().requires_grad_(False)
        except (OSError, ValueError) as err:
            errors.append(" ".join(str(err).split())[:120])
    raise ModelError(f"could not load a UNet from {str(source)!r} ({'; '.join(errors)}): expected a diffusers "
                     "UNet2DConditionModel folder (or one with a unet/ subfolder)")
