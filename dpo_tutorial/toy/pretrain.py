"""Pretrain the tiny, deliberately flawed Stable Diffusion model of the shapes world, from scratch.

The result is a genuine ``diffusers.StableDiffusionPipeline`` (CLIP tokenizer + CLIPTextModel +
AutoencoderKL + UNet2DConditionModel + DDPMScheduler), only tiny: 32x32 images, 8x8x4 latents.

The flaw: while training the UNet, a fraction ``wrong_colour`` of the captions name a WRONG colour
(the shape word is always right). The model therefore learns p(colour | "a red circle") with only
``1 - wrong_colour`` of the mass on red - it draws clean shapes in the wrong colour a lot of the time.
Preference pairs judged on colour (see ``pairs.py``) let Diffusion-DPO fix this.

Run: ``python -m dpo_tutorial.toy.pretrain [--out DIR] [--seed 0]`` (single CPU thread, ~20 min).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from ..threads import use_threads
from ..tokenizer import build_clip_tokenizer
from . import world

DEFAULT_OUT = Path(__file__).parent / "assets" / "tiny-sd-shapes"


def make_tokenizer():
    """CLIP tokenizer in which every word of the shapes world is a single token."""
    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(world.vocabulary(), tmp, model_max_length=16)


def make_text_encoder(tokenizer, hidden: int = 64, layers: int = 2):
    """A small randomly initialised CLIPTextModel matching ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=hidden)
    return CLIPTextModel(config)


def make_vae():
    """AutoencoderKL mapping 32x32x3 images to 8x8x4 latents (3 blocks, 2 downsamplings)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)


def make_unet(cross_dim: int = 64):
    """UNet2DConditionModel on 8x8x4 latents with cross-attention to the text encoder."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=cross_dim,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)


def make_scheduler():
    """The standard Stable Diffusion DDPM noise schedule (1000 steps, epsilon prediction)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                         clip_sample=False, steps_offset=1)


def lr_schedule(optimizer, total: int, warmup: int = 100):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of the learning rate (the library's
    schedule; the shipped model was made when this script wrote it by hand, with a warm-up one step ahead)."""
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=0.1)


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, gen: torch.Generator,
              lr: float = 2e-3, kl_weight: float = 1e-6, log_every: int = 100) -> None:
    """Train the VAE on images (N, 3, 32, 32) in [-1, 1]: MSE reconstruction + small KL."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = lr_schedule(opt, steps)
    vae.train()
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x = images[idx]  # (B, 3, 32, 32)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)  # (B, 4, 8, 8)
        recon = vae.decode(z).sample  # (B, 3, 32, 32)
        kl = post.kl().mean() / z[0].numel()
        loss = F.mse_loss(recon, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"vae step {step:5d}/{steps} loss {loss.item():.5f} kl/dim {kl.item():.2f} "
                  f"{time.time() - start:6.0f}s", flush=True)
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: (N, 3, 32, 32) -> two (N, 4, 8, 8) tensors."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(images[i:i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def caption_table(tokenizer) -> torch.Tensor:
    """Token ids of every (colour, shape) caption plus the empty caption.

    Returns (len(COLOURS) * len(SHAPES) + 1, 16): row ``c * len(SHAPES) + s``, last row = "".
    """
    caps = [world.caption_for(c, s) for c in world.COLOURS for s in world.SHAPES] + [""]
    return tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids  # (13, 16)


def noisy_caption_rows(colours: torch.Tensor, shapes: torch.Tensor, wrong_colour: float,
                       p_empty: float, gen: torch.Generator) -> torch.Tensor:
    """Caption-table rows for a batch: a wrong colour with prob ``wrong_colour``, "" with ``p_empty``.

    colours, shapes: (B,) true indices -> (B,) row indices into ``caption_table``.
    """
    n_col, n_shape = len(world.COLOURS), len(world.SHAPES)
    b = colours.shape[0]
    wrong = torch.rand(b, generator=gen) < wrong_colour  # (B,)
    shift = torch.randint(1, n_col, (b,), generator=gen)  # (B,) uniform over the other colours
    shown = torch.where(wrong, (colours + shift) % n_col, colours)  # (B,)
    rows = shown * n_shape + shapes  # (B,)
    empty = torch.rand(b, generator=gen) < p_empty  # (B,)
    return torch.where(empty, torch.full_like(rows, n_col * n_shape), rows)


def train_diffusion(unet, text_encoder, scheduler, latents: tuple[torch.Tensor, torch.Tensor],
                    colours: torch.Tensor, shapes: torch.Tensor, table: torch.Tensor, steps: int,
                    batch: int, gen: torch.Generator, wrong_colour: float, p_empty: float = 0.1,
                    lr: float = 1e-3, log_every: int = 250, clean_steps: int = 0) -> None:
    """Jointly train UNet + text encoder with the epsilon-MSE loss on scaled latents (N, 4, 8, 8).

    The first ``clean_steps`` steps use correct captions (the model learns to read the colour word);
    the rest use ``wrong_colour`` noisy captions (it then learns the flawed caption distribution).
    """
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = lr_schedule(opt, steps)
    mean, std = latents
    unet.train()
    text_encoder.train()
    start, running = time.time(), 0.0
    for step in range(steps):
        idx = torch.randint(0, mean.shape[0], (batch,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)  # (B, 4, 8, 8)
        noise = 0.0 if step < clean_steps else wrong_colour
        rows = noisy_caption_rows(colours[idx], shapes[idx], noise, p_empty, gen)
        hidden = text_encoder(table[rows])[0]  # (B, 16, 64)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)  # (B,)
        eps = torch.randn(z0.shape, generator=gen)  # (B, 4, 8, 8)
        zt = scheduler.add_noise(z0, eps, t)  # (B, 4, 8, 8): q(x_t | x_0)
        pred = unet(zt, t, encoder_hidden_states=hidden).sample  # (B, 4, 8, 8)
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step == steps - 1:
            n = (step % log_every) + 1
            print(f"unet step {step + 1:6d}/{steps} loss {running / n:.4f} "
                  f"{time.time() - start:6.0f}s", flush=True)
            running = 0.0
    unet.eval()
    text_encoder.eval()


def count_params(module) -> int:
    """Number of parameters of a torch module."""
    return sum(p.numel() for p in module.parameters())


def pretrain(out_dir: str | Path = DEFAULT_OUT, seed: int = 0, n_images: int = 24000,
             vae_steps: int = 800, vae_batch: int = 32, unet_steps: int = 5000,
             unet_batch: int = 64, wrong_colour: float = 0.4, p_empty: float = 0.1,
             clean_steps: int = 2500) -> Path:
    """Train the flawed tiny SD from scratch and save it (fp16 safetensors) to ``out_dir``.

    ``wrong_colour`` is the fraction of training captions that name a wrong colour (the flaw).
    Deterministic for a given seed on a single CPU thread. Returns ``out_dir``.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    pixels, colours, shapes = world.render_dataset(n_images, rng)  # (N, 32, 32, 3) uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 32, 32)
    colour_idx = torch.tensor([list(world.COLOURS).index(c) for c in colours])  # (N,)
    shape_idx = torch.tensor([world.SHAPES.index(s) for s in shapes])  # (N,)
    print(f"rendered {n_images} images in {time.time() - t0:.0f}s", flush=True)

    tokenizer = make_tokenizer()
    text_encoder, vae, unet = make_text_encoder(tokenizer), make_vae(), make_unet()
    scheduler = make_scheduler()
    print(f"params: text {count_params(text_encoder):,} vae {count_params(vae):,} "
          f"unet {count_params(unet):,}", flush=True)

    train_vae(vae, images, vae_steps, vae_batch, gen)
    mean, std = encode_latents(vae, images)  # (N, 4, 8, 8) each
    scale = 1.0 / mean.std().item()
    vae.register_to_config(scaling_factor=scale)
    print(f"latent std {mean.std().item():.3f} -> scaling_factor {scale:.4f}", flush=True)

    table = caption_table(tokenizer)
    train_diffusion(unet, text_encoder, scheduler, (mean * scale, std * scale), colour_idx,
                    shape_idx, table, unet_steps, unet_batch, gen, wrong_colour, p_empty,
                    clean_steps=clean_steps)

    pipe = StableDiffusionPipeline(
        vae=vae.half(), text_encoder=text_encoder.half(), tokenizer=tokenizer, unet=unet.half(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"saved to {out} after {time.time() - t0:.0f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m dpo_tutorial.toy.pretrain``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--wrong-colour", type=float, default=0.4)
    parser.add_argument("--clean-steps", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    use_threads(args.threads, deterministic=True)
    pretrain(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
             wrong_colour=args.wrong_colour, clean_steps=args.clean_steps)


if __name__ == "__main__":
    main()
