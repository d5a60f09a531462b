"""How much of a training step waits for data, with the batches prepared in the loop or ahead of it.

Trains a tiny random-weight SD pipeline built for 512-px images (``fixtures.build_tiny_pipeline(...,
resolution=512, latent_factor=8)``: 64x64 latents as in SD 1.5, a UNet with 16-32 channels, so the JPEG decoding is a large share) on a
Pick-a-Pic-format parquet of 512-px JPEGs, once with ``prefetch=0`` (decode in the loop) and once with
``prefetch=N`` (a background thread), and reads ``data_seconds`` and the step times back from
``history.jsonl``. The first step (model warm-up, first batch) is left out of the means.

    python benchmarks/bench_data_wait.py                       # 15 steps, batch 2 pairs, prefetch 0 vs 2
    python benchmarks/bench_data_wait.py --steps 20 --prefetch 4 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """An ``(size, size, 3)`` uint8 image with smooth shapes and grain: JPEG sizes like real photos (~60 kB)."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)) + np.cos(y * rng.uniform(2, 9)),
                    np.sin((x + y) * rng.uniform(2, 9)), np.cos(x * y * rng.uniform(3, 12))], axis=-1)
    img = (img - img.min()) / (np.ptp(img) + 1e-9) * 255 + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pairs(path: Path, n_pairs: int, size: int, seed: int = 0) -> Path:
    """A Pick-a-Pic-format parquet of ``n_pairs`` pairs of ``size``-px JPEGs (no ties)."""
    from dpo_tutorial.pickapic import encode_image, pickapic_row, write_pickapic_parquet

    rng = np.random.default_rng(seed)
    rows = [pickapic_row(f"a photo number {i}", encode_image(photo_like(rng, size)),
                         encode_image(photo_like(rng, size)), float(i % 2), ranking_id=i) for i in range(n_pairs)]
    return write_pickapic_parquet(path, rows)


def run(pipeline: Path, data: Path, out: Path, steps: int, batch: int, prefetch: int) -> dict:
    """Train ``steps`` steps; return the mean step time, mean data wait and its share (step 1 left out)."""
    from dpo_tutorial import get_preset, train

    cfg = get_preset("toy", pretrained=str(pipeline), dataset=str(data), resolution=512, batch_size=batch,
                     max_steps=steps, prefetch=prefetch, output_dir=str(out), checkpoint_every=0,
                     checkpoints_total_limit=None, sample_grid=False, heldout_split=None, random_flip=True)
    train(cfg)
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    ends = np.array([r["seconds"] for r in records])
    step_s = np.diff(ends)  # steps 2..n
    wait_s = np.array([r["data_seconds"] for r in records[1:]])
    return {"prefetch": prefetch, "steps": len(step_s), "step_ms": 1000 * step_s.mean(),
            "wait_ms": 1000 * wait_s.mean(), "wait_share": float(wait_s.sum() / step_s.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--prefetch", type=int, default=2, help="depth of the background queue to compare with 0")
    parser.add_argument("--repeats", type=int, default=1, help="alternate 0 / N this many times")
    parser.add_argument("--size", type=int, default=512, help="JPEG size in pixels")
    args = parser.parse_args()

    from dpo_tutorial.testing.fixtures import build_tiny_pipeline

    root = Path(tempfile.mkdtemp(prefix="bench-data-wait-"))
    pipeline = build_tiny_pipeline(root / "pipe", resolution=512, latent_factor=8)
    data = write_pairs(root / "pairs" / "train.parquet", n_pairs=args.batch * (args.steps + 2), size=args.size)
    kb = os.path.getsize(data) / 1024 / (2 * args.batch * (args.steps + 2))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{__import__('torch').get_num_threads()} torch threads; {args.size}-px JPEGs ~{kb:.0f} kB each; "
          f"batch {args.batch} pairs; {args.steps} steps")
    print("| prefetch | steps timed | ms/step | data wait ms/step | data-wait share |")
    print("|---|---|---|---|---|")
    for rep in range(args.repeats):
        for depth in (0, args.prefetch):
            t0 = time.perf_counter()
            r = run(pipeline, data.parent, root / f"run-{rep}-{depth}", args.steps, args.batch, depth)
            print(f"| {r['prefetch']} | {r['steps']} | {r['step_ms']:.0f} | {r['wait_ms']:.1f} | "
                  f"{100 * r['wait_share']:.1f}% |  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
