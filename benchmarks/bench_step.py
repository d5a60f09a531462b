"""Pairs/s and peak memory of one Diffusion-DPO step: the public recipe's work vs this project's cached step.

(a) baseline: what the diffusers Diffusion-DPO script does at *every* step, written here from its
    description: decode both JPEGs of each pair, resize/crop/flip, VAE-encode the 2B images (in chunks of
    8, its default), text-encode the captions, then the policy pass (LoRA on) and the reference pass (LoRA
    off), loss, backward, clip, AdamW step (torch's default per-tensor loop).
(b) project: the same step from the latent cache (``dpo-tutorial cache``): sample latents from the cached
    posterior, look up the caption embeddings, the two UNet passes, loss, backward, clip, the package's
    fused AdamW.
(c) project+compile (unless ``--no-compile``): (b) with ``compile_unet`` on (``torch.compile``; on CPU it
    needs a C++ compiler). Its compile time is reported apart, as the warm-up.

All run on the same pipeline, data, batch size, resolution and seeds, each in a fresh process (so the
peak memory of one does not hide another's); the script prints each one's pairs/s and its ratio to the
baseline, and compares every step's loss with the baseline's (equal up to float noise: neither the cache
nor compilation changes the maths).

    python benchmarks/bench_step.py                        # toy pipeline, batch 16 pairs, CPU
    python benchmarks/bench_step.py --pretrained DIR --dataset PARQUET --resolution 512 --batch-size 4
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


VARIANTS = ("baseline", "project", "project+compile")
VAE_ENCODE_BATCH_SIZE = 8  # the diffusers script's default


def _config(args):
    from dpo_tutorial.config import get_preset

    return get_preset("toy", **{k: v for k, v in dict(pretrained=args.pretrained, dataset=args.dataset,
                                                        resolution=args.resolution, batch_size=args.batch_size,
                                                        seed=0, random_flip=True).items() if v is not None})


def recipe_step(parts, unet, batch, beta, generator):
    """The public recipe, inline: every expensive stage it repeats each step, nothing shared with the package."""
    import torch.nn.functional as F

    from dpo_tutorial.models import tokenize

    pixels = batch["pixel_values"]  # decoded + resized by the stream, as the recipe's dataloader does
    with torch.no_grad():  # the recipe encodes in chunks of --vae_encode_batch_size (default 8)
        latents = torch.cat([parts.vae.encode(pixels[i:i + VAE_ENCODE_BATCH_SIZE]).latent_dist.sample(generator)
                             for i in range(0, len(pixels), VAE_ENCODE_BATCH_SIZE)])
        latents = latents * parts.vae.config.scaling_factor
        ids = tokenize(parts.tokenizers[0], batch["captions"])
        embeds = parts.text_encoders[0](ids)[0].repeat(2, 1, 1)
    noise = torch.randn(latents.shape[0] // 2, *latents.shape[1:], generator=generator).repeat(2, 1, 1, 1)
    t = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (latents.shape[0] // 2,),
                      generator=generator).repeat(2)
    noisy = parts.noise_scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, embeds).sample
    with torch.no_grad():
        unet.disable_adapters()
        ref = unet(noisy, t, embeds).sample
        unet.enable_adapters()
    mse = lambda p: (p.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))  # noqa: E731
    model_w, model_l = mse(pred).chunk(2)
    ref_w, ref_l = mse(ref).chunk(2)
    return -F.logsigmoid(-0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))).mean()


def _peak_rss_mb() -> float:
    """This process's peak resident memory. ``ru_maxrss`` would also count the parent's memory at fork time
    (Linux carries it across exec), so read the address space's own high-water mark where there is one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args) -> dict:
    """One variant in this process: warm-up, then timed steps. Returns pairs/s, warm-up s, peak RSS, losses."""
    from dpo_tutorial.data import PairStream, PairTransform, load_pickapic
    from dpo_tutorial.models import add_lora, load_parts
    from dpo_tutorial.step import dpo_step
    from dpo_tutorial.models import apply_speed_options
    from dpo_tutorial.threads import use_threads
    from dpo_tutorial.train import make_optimizer, make_stream

    use_threads(args.threads)  # only when the count changes (a same-count call costs MKL its dynamic threading)
    project = args.variant.startswith("project")
    config = _config(args).replace(cache=args.cache if project else None, lr=1e-4,
                                   compile_unet=args.variant == "project+compile")
    parts = load_parts(config.pretrained)
    params = add_lora(parts.unet, rank=8, init_seed=0)
    g = torch.Generator().manual_seed(0)
    if project:
        apply_speed_options(config, [parts.unet])
        opt = make_optimizer(params, config)  # the package's optimizer (fused AdamW)
        stream = iter(make_stream(config, 0, 1))
        step = lambda b: dpo_step(parts, parts.unet, b, config.beta, generator=g).loss  # noqa: E731
    else:
        opt = torch.optim.AdamW(params, lr=config.lr)  # the recipe's optimizer
        ds = load_pickapic(config.dataset, config.split)
        stream = iter(PairStream(ds, PairTransform(config.resolution, False, True), config.batch_size, seed=0))
        step = lambda b: recipe_step(parts, parts.unet, b, config.beta, g)  # noqa: E731
    losses, start = [], time.perf_counter()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            t0 = time.perf_counter()
            warmup_s = t0 - start
        loss = step(next(stream))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)  # both clip, as the recipe does
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    return {"variant": args.variant, "pairs_per_s": args.steps * config.batch_size / seconds,
            "warmup_s": warmup_s, "peak_rss_mb": _peak_rss_mb(), "losses": losses}


def main() -> None:
    """Build the cache, run each variant in a fresh process, print the table and the ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained"), p.add_argument("--dataset"), p.add_argument("--resolution", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count())
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile variant (it compiles for ~2 min on 2 CPU cores when not cached)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    from dpo_tutorial.cache import build_cache

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_cache(_config(args), Path(tmp) / "cache")
        cache_s = time.perf_counter() - t0
        results = {}
        for variant in VARIANTS if args.compile else VARIANTS[:2]:
            cmd = [sys.executable, __file__, "--variant", variant, "--cache", str(Path(tmp) / "cache"),
                   *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[variant] = json.loads(out)
    cfg = _config(args)
    print(f"pipeline {cfg.pretrained}\nbatch {cfg.batch_size} pairs, {cfg.resolution} px, {args.threads} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up; cache built once in {cache_s:.1f} s")
    base = results["baseline"]
    print(f"{'variant':16s} {'pairs/s':>9s} {'vs baseline':>12s} {'warm-up s':>10s} {'peak RSS MB':>12s} "
          f"{'max |dloss|':>12s}")
    for r in results.values():
        diff = max(abs(a - b) for a, b in zip(base["losses"], r["losses"]))
        print(f"{r['variant']:16s} {r['pairs_per_s']:9.2f} {r['pairs_per_s'] / base['pairs_per_s']:11.2f}x "
              f"{r['warmup_s']:10.1f} {r['peak_rss_mb']:12.0f} {diff:12.2e}")
    print(f"(warm-up = the {args.warmup} untimed steps, including any compilation; "
          f"max |dloss| over all {len(base['losses'])} steps against the baseline's)")


if __name__ == "__main__":
    main()
