"""GPU benchmark of one LoRA Diffusion-DPO step on SD 1.5- and SDXL-architecture models (random weights).

No download: the UNets, VAE and text encoders are built from their published configs with random
weights (compute and memory do not depend on the weight values). Variants (``--variants``):

- ``recipe``: what the diffusers script does each step: the whole UNet, VAE and text encoder stored in
  fp16, the LoRA in fp32, fp16 autocast; VAE-encode the 2B images and text-encode the captions, then the
  policy pass (LoRA on) and the reference pass (LoRA off);
- ``cached-bf16``, ``cached-fp16``: this project's step (``dpo_tutorial.step.dpo_step``) on a latent-cache
  batch (no VAE or text encoder), stored as ``dpo-tutorial train`` stores it: frozen UNet weights in
  the half type, LoRA in fp32, autocast to the half type;
- ``cached-bf16-fp32w``: the same step with the frozen weights left in fp32 (autocast casts them on
  every use);
- ``pure-bf16``: every weight in bf16, the LoRA too, and no autocast at all;
- suffixes on any cached variant: ``+cl`` (channels_last), ``+compile`` (``torch.compile``), ``+cudnn-attn``
  / ``+flash-attn`` / ``+efficient-attn`` (only that scaled-dot-product-attention backend; CUDA only),
  ``+cudnnbench`` (``torch.backends.cudnn.benchmark``: cuDNN times its convolution algorithms once per shape
  instead of picking by heuristics), ``+nopeftcast`` (peft's ``disable_input_dtype_casting``: peft otherwise
  casts each LoRA layer's input to the LoRA's fp32 and autocast casts it back, two activation-sized copies per
  adapted layer), ``+pairsN`` (N pairs a step instead of the default).

It prints ms/step, pairs/s, peak GPU memory and model FLOPs utilisation: FLOPs of one step counted
with ``torch.utils.flop_counter.FlopCounterMode`` (the UNet passes, plus the VAE and text encoder for
``recipe``; the same count for every variant of a batch size) ÷ step time ÷ the card's dense bf16 peak
(``--peak-tflops``; from the card's name by default, e.g. 989 TFLOP/s for an H100/H200 SXM).

    python benchmarks/bench_gpu.py                # SD 1.5 @ 512 px batch 8 pairs, SDXL @ 1024 px batch 4
    python benchmarks/bench_gpu.py --arch sd15 --variants recipe cached-bf16 cached-fp16
    python benchmarks/bench_gpu.py --tiny         # a CPU smoke run of the same code (tiny models, 2 pairs)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from dpo_tutorial.step import dpo_step

PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
                    "L4": 121.0, "T4": 65.0}
DEFAULT_VARIANTS = ["recipe", "cached-bf16", "cached-fp16", "cached-bf16-fp32w", "pure-bf16", "cached-bf16+nopeftcast",
                    "cached-bf16+cudnnbench", "cached-bf16+cl", "cached-bf16+cudnn-attn", "cached-bf16+flash-attn",
                    "cached-bf16+pairs16"]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION = {"cudnn-attn": "CUDNN_ATTENTION", "flash-attn": "FLASH_ATTENTION", "efficient-attn": "EFFICIENT_ATTENTION"}


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


def vae_config(tiny: bool) -> dict:
    """SD's AutoencoderKL config (8x downsampling, 4 latent channels), or a tiny one with the same 8x factor."""
    blocks = [16, 16, 32, 32] if tiny else [128, 256, 512, 512]
    return dict(block_out_channels=blocks, layers_per_block=1 if tiny else 2, latent_channels=4,
                norm_num_groups=8 if tiny else 32, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4)


def text_config(hidden: int, tiny: bool) -> dict:
    """CLIP ViT-L/14's text tower (SD 1.5's encoder: 12 layers, width 768) or a 2-layer one of width ``hidden``."""
    width = hidden if tiny else 768
    return dict(vocab_size=49408, hidden_size=width, num_hidden_layers=2 if tiny else 12,
                num_attention_heads=2 if tiny else 12, intermediate_size=4 * width, max_position_embeddings=77)


def build(arch: str, tiny: bool, device):
    """UNet with a rank-8 LoRA, VAE, text encoder and the LoRA's parameters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dpo_tutorial.models import add_lora

    unet = UNet2DConditionModel(**unet_config(arch, tiny)).to(device)
    unet.requires_grad_(False)
    params = add_lora(unet, rank=8, init_seed=0)
    vae = AutoencoderKL(**vae_config(tiny)).to(device).requires_grad_(False)
    text = CLIPTextModel(CLIPTextConfig(**text_config(unet.config.cross_attention_dim, tiny)))
    text = text.to(device).requires_grad_(False)
    return unet, params, vae, text


def parse_variant(kind: str, default_pairs: int) -> dict:
    """``'cached-bf16+cl+pairs16'`` -> its settings: step kind, half type, frozen and LoRA dtypes, autocast,
    options and pairs. Raises ``ValueError`` naming an unknown variant."""
    base, *options = kind.split("+")
    known = {"recipe": ("recipe", "fp16", torch.float16, torch.float32, True),
             "cached-bf16": ("cached", "bf16", torch.bfloat16, torch.float32, True),
             "cached-fp16": ("cached", "fp16", torch.float16, torch.float32, True),
             "cached-bf16-fp32w": ("cached", "bf16", torch.float32, torch.float32, True),
             "pure-bf16": ("cached", "bf16", torch.bfloat16, torch.bfloat16, False)}
    if base not in known:
        raise ValueError(f"unknown variant {kind!r}: expected one of {sorted(known)} with optional "
                         f"+cl, +compile, +cudnnbench, +nopeftcast, +{', +'.join(ATTENTION)}, +pairsN")
    step, half, frozen, lora, autocast = known[base]
    pairs = default_pairs
    for opt in options:
        if opt.startswith("pairs") and opt[5:].isdigit():
            pairs = int(opt[5:])
        elif opt not in ("cl", "compile", "nopeftcast", "cudnnbench", *ATTENTION):
            raise ValueError(f"unknown option +{opt} in variant {kind!r}")
    return dict(step=step, half=HALF[half], frozen=frozen, lora=lora, autocast=autocast, pairs=pairs,
                channels_last="cl" in options, compile="compile" in options, nopeftcast="nopeftcast" in options,
                cudnn_benchmark="cudnnbench" in options,
                attention=next((ATTENTION[o] for o in options if o in ATTENTION), None))


def set_storage(unet, vae, text, frozen: torch.dtype, lora: torch.dtype, channels_last: bool) -> None:
    """Store the frozen weights in ``frozen``, the trained (LoRA) ones in ``lora``, in the chosen memory layout."""
    for module in (unet, vae, text):  # parameter by parameter: diffusers' ModelMixin.to(dtype) warns about it
        for p in module.parameters():
            p.data = p.data.to(lora if p.requires_grad else frozen)
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _parts(unet, vae, text, is_sdxl: bool):
    """The package's ``DiffusionParts`` around the benchmark's models (SD 1.5's DDPM schedule)."""
    from diffusers import DDPMScheduler

    from dpo_tutorial.models import DiffusionParts

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    vae.register_to_config(scaling_factor=0.18215)
    return DiffusionParts([], [text], vae, unet, scheduler, is_sdxl)


def attention_backend(name: str | None, device):
    """A context that allows only the named scaled-dot-product-attention backend (nothing for ``None``)."""
    if name is None:
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise RuntimeError(f"the {name} attention backend needs CUDA")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name)])


def make_step(spec: dict, unet, vae, text, device):
    """A closure running one optimizer step of the variant ``spec`` (:func:`parse_variant`); ``unet`` may be
    compiled."""
    base = getattr(unet, "_orig_mod", unet)
    pairs, dtype = spec["pairs"], spec["half"]
    latent = base.config.sample_size
    pixels = latent * 2 ** (len(vae.config.block_out_channels) - 1)
    cross = base.config.cross_attention_dim
    embeds = torch.randn(2 * pairs, 77, cross, device=device)
    added = None
    if base.config.addition_embed_type == "text_time":
        pooled_dim = base.config.projection_class_embeddings_input_dim - 6 * base.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2 * pairs, pooled_dim, device=device),
                 "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * 2 * pairs, device=device).float()}
    images = torch.randn(2 * pairs, 3, pixels, pixels, device=device)
    ids = torch.randint(0, 49408, (pairs, 77), device=device)
    mean = torch.randn(2 * pairs, 4, latent, latent, device=device)
    opt = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=1e-5)

    parts = _parts(base, vae, text, is_sdxl=added is not None)
    cached = {"latent_mean": mean, "latent_std": torch.full_like(mean, 0.1),  # what a latent-cache batch holds
              "prompt_embeds": embeds[:pairs], "captions": [""] * pairs,
              "time_ids": added["time_ids"] if added else torch.zeros(2 * pairs, 6, device=device)}
    if added:
        cached["pooled"] = added["text_embeds"][:pairs]
    from peft.helpers import disable_input_dtype_casting

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=spec["autocast"]), \
                attention_backend(spec["attention"], device), disable_input_dtype_casting(base, spec["nopeftcast"]):
            if spec["step"] == "recipe":  # the diffusers script's step, written out: it re-encodes every step
                with torch.no_grad():
                    pix = images.to(vae.dtype)
                    latents = torch.cat([vae.encode(pix[i:i + 8]).latent_dist.sample()
                                         for i in range(0, len(pix), 8)]) * 0.18215
                    cond = text(ids)[0].repeat(2, 1, 1)  # (2B, 77, D); SDXL's second encoder: not run here
                noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
                t = torch.randint(0, 1000, (pairs,), device=device).repeat(2)
                noisy = parts.noise_scheduler.add_noise(latents, noise, t)
                cond = cond if added is None else embeds.to(cond.dtype)
                pred = unet(noisy, t, cond, added_cond_kwargs=added).sample
                with torch.no_grad():
                    base.disable_adapters()
                    ref = unet(noisy, t, cond, added_cond_kwargs=added).sample
                    base.enable_adapters()
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


def count_flops(step) -> float:
    """FLOPs of one call of ``step`` as counted by torch's flop counter (matmuls, convolutions, attention;
    forward and backward)."""
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


def run_variant(kind: str, arch: str, models, device, args, flops_cache: dict) -> dict:
    """Measure one variant; return its row (``error`` set instead when it failed)."""
    unet, vae, text = models
    spec = parse_variant(kind, 2 if args.tiny else 8 if arch == "sd15" else 4)
    set_storage(unet, vae, text, spec["frozen"], spec["lora"], spec["channels_last"])
    flops_key = (spec["step"], spec["pairs"])
    if flops_key not in flops_cache:  # the same work for every storage, layout and attention backend
        flops_cache[flops_key] = count_flops(make_step({**spec, "attention": None}, unet, vae, text, device))
    model = torch.compile(unet) if spec["compile"] else unet
    torch.backends.cudnn.benchmark = spec["cudnn_benchmark"]
    try:
        seconds, mem = measure(make_step(spec, model, vae, text, device), device, args.iters, args.warmup)
    finally:
        torch.backends.cudnn.benchmark = False
    return dict(arch=arch, variant=kind, pairs=spec["pairs"], ms=seconds * 1e3, pairs_per_s=spec["pairs"] / seconds,
                peak_gib=mem, tflop_per_step=flops_cache[flops_key] / 1e12,
                mfu=flops_cache[flops_key] / seconds / (args.peak * 1e12))


def main(argv: list[str] | None = None) -> None:
    """Run every (architecture, variant) and print the table (and write it as JSON with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU: checks the script, measures nothing")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card (default: from its name)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    for kind in args.variants:
        parse_variant(kind, 8)  # a typo fails before any model is built
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    args.peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"device: {name}; dense bf16 peak used for MFU: {args.peak} TFLOP/s; torch {torch.__version__}; "
          f"FLOPs: torch.utils.flop_counter.FlopCounterMode over one step")
    print(f"{'arch':5s} {'variant':24s} {'pairs':>5s} {'ms/step':>9s} {'pairs/s':>8s} {'peak GiB':>9s} "
          f"{'TFLOP':>7s} {'MFU':>6s}")
    rows = []
    for arch in args.arch:
        unet, _, vae, text = build(arch, args.tiny, device)
        flops_cache: dict = {}
        first = None
        for kind in args.variants:
            try:
                row = run_variant(kind, arch, (unet, vae, text), device, args, flops_cache)
            except Exception as err:  # noqa: BLE001 - one failing variant (an attention backend, a compile) is a row
                rows.append(dict(arch=arch, variant=kind, error=f"{type(err).__name__}: {str(err)[:200]}"))
                print(f"{arch:5s} {kind:24s} FAILED {rows[-1]['error']}", flush=True)
                continue
            rows.append(row)
            first = first or row
            print(f"{arch:5s} {kind:24s} {row['pairs']:5d} {row['ms']:9.1f} {row['pairs_per_s']:8.2f} "
                  f"{row['peak_gib']:9.2f} {row['tflop_per_step']:7.3g} {row['mfu']:6.1%}  "
                  f"({row['pairs_per_s'] / first['pairs_per_s']:.2f}x {first['variant']}'s pairs/s)", flush=True)
        del unet, vae, text
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
