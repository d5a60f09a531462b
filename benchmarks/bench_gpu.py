"""GPU benchmark of one LoRA Diffusion-DPO step on SD 1.5- and SDXL-architecture models (random weights).

No download: the UNets, VAE and text encoders are built from their published configs with random
weights (compute and memory do not depend on the weight values). For each architecture:

- ``recipe``: what the diffusers script does each step: fp16 autocast, VAE-encode the 2B images and
  text-encode the captions, then the policy pass (LoRA on) and the reference pass (LoRA off);
- ``cached``: this project's step (``dpo_tutorial.step.dpo_step``) on a latent-cache batch (no VAE / text
  encoder), bf16 autocast;
- ``cached+cl``, ``cached+compile``: plus channels_last, plus ``torch.compile`` of the UNet.

It prints ms/step, pairs/s, peak GPU memory and model FLOPs utilisation (FLOPs of the UNet passes counted
with ``torch.utils.flop_counter`` ÷ step time ÷ the card's dense bf16 peak).

    python benchmarks/bench_gpu.py                # SD 1.5 @ 512 px batch 8 pairs, SDXL @ 1024 px batch 4
    python benchmarks/bench_gpu.py --tiny         # a seconds-long CPU smoke run of the same code
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dpo_tutorial.step import dpo_step

PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
                    "L4": 121.0, "T4": 65.0}


def unet_config(arch: str, tiny: bool) -> dict:
    """The UNet2DConditionModel config of SD 1.5 or SDXL base (or a tiny stand-in)."""
    if tiny:
        cfg = dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
                   down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=8)
        return cfg if arch == "sd15" else {**cfg, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                                           "projection_class_embeddings_input_dim": 6 * 8 + 32}
    if arch == "sd15":
        return dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                    cross_attention_dim=768, attention_head_dim=8)
    return dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)


def build(arch: str, tiny: bool, device):
    """UNet with a rank-8 LoRA, VAE, text encoder(s) and the sizes of one batch."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dpo_tutorial.models import add_lora

    unet = UNet2DConditionModel(**unet_config(arch, tiny)).to(device)
    unet.requires_grad_(False)
    params = add_lora(unet, rank=8, init_seed=0)
    blocks = [32, 32] if tiny else [128, 256, 512, 512]
    vae = AutoencoderKL(block_out_channels=blocks, layers_per_block=1 if tiny else 2, latent_channels=4,
                        norm_num_groups=8 if tiny else 32, down_block_types=["DownEncoderBlock2D"] * len(blocks),
                        up_block_types=["UpDecoderBlock2D"] * len(blocks)).to(device).requires_grad_(False)
    hidden = unet.config.cross_attention_dim
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=hidden if tiny else 768,
                                        num_hidden_layers=2 if tiny else 12, num_attention_heads=2 if tiny else 12,
                                        intermediate_size=4 * (hidden if tiny else 768), max_position_embeddings=77))
    text = text.to(device).requires_grad_(False)
    return unet, params, vae, text


def _parts(unet, vae, text, is_sdxl: bool):
    """The package's ``DiffusionParts`` around the benchmark's models (SD 1.5's DDPM schedule)."""
    from diffusers import DDPMScheduler

    from dpo_tutorial.models import DiffusionParts

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    vae.register_to_config(scaling_factor=0.18215)
    return DiffusionParts([], [text], vae, unet, scheduler, is_sdxl)


def make_step(kind: str, unet, vae, text, pairs: int, device):
    """A closure running one optimizer step of variant ``kind``."""
    latent = unet.config.sample_size
    pixels = latent * 2 ** (len(vae.config.block_out_channels) - 1)
    dtype = torch.float16 if kind == "recipe" else torch.bfloat16
    cross = unet.config.cross_attention_dim
    embeds = torch.randn(2 * pairs, 77, cross, device=device)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2 * pairs, pooled_dim, device=device),
                 "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * 2 * pairs, device=device).float()}
    images = torch.randn(2 * pairs, 3, pixels, pixels, device=device)
    ids = torch.randint(0, 49408, (pairs, 77), device=device)
    mean = torch.randn(2 * pairs, 4, latent, latent, device=device)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5)

    parts = _parts(unet, vae, text, is_sdxl=added is not None)
    cached = {"latent_mean": mean, "latent_std": torch.full_like(mean, 0.1),  # what a latent-cache batch holds
              "prompt_embeds": embeds[:pairs], "captions": [""] * pairs,
              "time_ids": added["time_ids"] if added else torch.zeros(2 * pairs, 6, device=device)}
    if added:
        cached["pooled"] = added["text_embeds"][:pairs]
    if "cl" in kind:
        unet.to(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" or dtype == torch.bfloat16):
            if kind == "recipe":  # the diffusers script's step, written out: it re-encodes every step
                with torch.no_grad():
                    latents = vae.encode(images).latent_dist.sample() * 0.18215
                    text(ids)  # the caption embeddings (SDXL also runs a second encoder: not counted here)
                noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
                t = torch.randint(0, 1000, (pairs,), device=device).repeat(2)
                noisy = parts.noise_scheduler.add_noise(latents, noise, t)
                pred = unet(noisy, t, embeds, added_cond_kwargs=added).sample
                with torch.no_grad():
                    unet.disable_adapters()
                    ref = unet(noisy, t, embeds, added_cond_kwargs=added).sample
                    unet.enable_adapters()
                mse = lambda p: (p.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))  # noqa: E731
                mw, ml = mse(pred).chunk(2)
                rw, rl = mse(ref).chunk(2)
                loss = -F.logsigmoid(-0.5 * 5000 * ((mw - ml) - (rw - rl))).mean()
            else:  # the package's own step on a latent-cache batch: a regression in it shows up here
                loss = dpo_step(parts, unet, cached, beta=5000.0).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def unet_flops(step) -> float:
    """FLOPs of one step as counted by torch's flop counter (UNet passes dominate)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def measure(step, device, iters: int, warmup: int) -> tuple[float, float]:
    """(seconds per step, peak memory in GiB) after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return (time.perf_counter() - t0) / iters, peak


def main() -> None:
    """Run every (architecture, variant) and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU: checks the script, measures nothing")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--arch", nargs="+", default=["sd15", "sdxl"])
    p.add_argument("--variants", nargs="+", default=["recipe", "cached", "cached+cl", "cached+compile"])
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card (default: from its name)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"device: {name}; peak bf16 {peak} TFLOPS; torch {torch.__version__}")
    print(f"{'arch':5s} {'variant':15s} {'pairs':>5s} {'ms/step':>9s} {'pairs/s':>8s} {'peak GiB':>9s} {'MFU':>6s}")
    for arch in args.arch:
        pairs = 8 if arch == "sd15" else 4
        unet, _, vae, text = build(arch, args.tiny, device)
        base = None
        for kind in args.variants:
            if "compile" in kind:
                unet = torch.compile(unet)
            step = make_step(kind, unet, vae, text, pairs, device)
            flops = unet_flops(step)
            seconds, mem = measure(step, device, args.iters, args.warmup)
            base = base or seconds
            mfu = flops / seconds / (peak * 1e12) if peak == peak else float("nan")
            print(f"{arch:5s} {kind:15s} {pairs:5d} {seconds * 1e3:9.1f} {pairs / seconds:8.2f} {mem:9.2f} "
                  f"{mfu:6.1%}  ({base / seconds:.2f}x recipe)")
        del unet, vae, text
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
