"""Where one Diffusion-DPO step's time goes, stage by stage, for the diffusers script's work and the project's.

Times each stage of a step alone, in this process, on a pipeline and a Pick-a-Pic parquet, at the
given batch and resolution (threads: set ``OMP_NUM_THREADS`` before starting; this script never calls
``torch.set_num_threads``, which costs MKL its dynamic threading — issue 17):

- data from images: decode both JPEGs of each pair, resize/crop/flip, collate (the script, every step);
- data from the latent cache: look the pair up, collate (the project when it caches);
- VAE encode of the 2B images in chunks of 8 and a posterior sample (the script, every step);
- text encoder on the B captions (the script, every step);
- policy forward + backward with the LoRA on, reference forward with it off (both programs: the work
  neither can skip, "the UNet passes");
- gradient clipping and AdamW (the script: torch's default; the project: fused).

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --pretrained DIR --dataset DIR --resolution 48 --batch-size 16

Prints milliseconds per stage (median of ``--repeats``) and writes them as JSON with ``--json``;
``benchmarks/bench_vs_diffusers.py`` runs it to report each program's overhead beyond the UNet passes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile(pretrained: str, dataset: str, resolution: int, batch_size: int, repeats: int,
            random_flip: bool, prediction_type: str | None = None) -> dict[str, float]:
    """Milliseconds per stage (see the module doc) at this work's shapes."""
    import tempfile

    from dpo_tutorial.cache import LatentCache, build_cache
    from dpo_tutorial.config import get_preset
    from dpo_tutorial.data import PairStream, PairTransform, load_pickapic
    from dpo_tutorial.models import add_lora, encode_prompts, load_parts, reference_mode
    from dpo_tutorial.step import draw_noise, encode_batch, noisy_prediction
    from dpo_tutorial.train import make_optimizer

    config = get_preset("toy", pretrained=pretrained, dataset=dataset, resolution=resolution, batch_size=batch_size,
                        random_flip=random_flip, heldout_split=None)
    parts = load_parts(pretrained, prediction_type=prediction_type)
    params = add_lora(parts.unet, rank=8, init_seed=0)
    images = iter(PairStream(load_pickapic(dataset, "train"), PairTransform(resolution, False, random_flip),
                             batch_size, seed=0))
    batch = next(images)
    ms: dict[str, float] = {"data from images": median_ms(lambda: next(images), repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        cache = LatentCache(build_cache(config, tmp, parts=parts), config)
        cached = iter(PairStream(cache, cache.transform, batch_size, seed=0, make=cache.make, collate=cache.collate))
        ms["data from the latent cache"] = median_ms(lambda: next(cached), repeats)
    pixels = batch["pixel_values"]  # (2B, 3, H, W)

    def vae():
        with torch.no_grad():
            torch.cat([parts.vae.encode(pixels[i:i + 8]).latent_dist.sample() for i in range(0, len(pixels), 8)])

    ms["VAE encode (chunks of 8) + sample"] = median_ms(vae, repeats)
    ms["text encoder"] = median_ms(lambda: encode_prompts(parts, batch["captions"]), repeats)
    encoded = encode_batch(parts, batch)
    noise, timesteps = draw_noise(parts, encoded)

    def policy():
        pred, target = noisy_prediction(parts, parts.unet, encoded, noise, timesteps)
        (pred.float() - target.float()).pow(2).mean().backward()

    def reference():
        with torch.no_grad(), reference_mode(parts.unet):  # the LoRA off: the reference model
            noisy_prediction(parts, parts.unet, encoded, noise, timesteps)

    ms["policy forward + backward"] = median_ms(policy, repeats)
    ms["reference forward"] = median_ms(reference, repeats)
    for name, opt in (("clip + AdamW (torch default, the script)", torch.optim.AdamW(params, lr=1e-5)),
                      ("clip + AdamW (fused, the project)", make_optimizer(params, config))):
        def update(opt=opt):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        ms[name] = median_ms(update, repeats)
    return ms


def main(argv: list[str] | None = None) -> None:
    """Profile the stages and print (and optionally save) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--random-flip", action="store_true")
    parser.add_argument("--json", default=None, help="write {stage: ms} here")
    args = parser.parse_args(argv)
    ms = profile(args.pretrained, args.dataset, args.resolution, args.batch_size, args.repeats, args.random_flip)
    print(f"threads: {torch.get_num_threads()}; batch {args.batch_size} pairs at {args.resolution} px; "
          f"median of {args.repeats}")
    for stage, value in ms.items():
        print(f"{stage:45s} {value:9.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ms, f, indent=1)


if __name__ == "__main__":
    main()
