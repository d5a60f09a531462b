"""What CPU oversubscription costs: one DPO step's policy pass (forward + backward) on the toy UNet, timed
alone and while other torch processes run the same work on the same cores.

Each torch process starts as many intra-op threads as there are cores. Two such processes on a 2-core
machine (pytest-xdist workers, a notebook kernel beside a training run, two ranks of a CPU launch) then
fight over the cores and every small kernel waits for a descheduled thread. ``train`` therefore gives each
process ``cores // processes`` threads unless ``OMP_NUM_THREADS`` or ``num_threads`` says otherwise.

    python benchmarks/bench_threads.py               # alone; 2 processes x all cores; 2 processes x cores/2
    python benchmarks/bench_threads.py --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(threads: int, steps: int, batch_size: int) -> float:
    """Mean ms of a policy forward + backward over ``steps`` (after 3 warm-up) with ``threads`` threads."""
    import torch

    from dpo_tutorial.config import get_preset
    from dpo_tutorial.models import add_lora, load_parts
    from dpo_tutorial.step import unet_forward

    torch.set_num_threads(threads)
    parts = load_parts(get_preset("toy").pretrained)
    add_lora(parts.unet, rank=8, init_seed=0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * batch_size, 4, 8, 8, generator=g)  # (2B, C, h, w)
    embeds = torch.randn(batch_size, 16, 64, generator=g).repeat(2, 1, 1)  # (2B, L, D)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=g).repeat(2)  # (2B,)
    for i in range(3 + steps):
        if i == 3:
            t0 = time.perf_counter()
        unet_forward(parts.unet, latents, timesteps, embeds, None).pow(2).mean().backward()
    return (time.perf_counter() - t0) / steps * 1000


def run(processes: int, threads: int, args) -> list[float]:
    """Start ``processes`` workers at once, each with ``threads`` threads; their ms/step."""
    cmd = [sys.executable, __file__, "--worker", str(threads), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    """Time the three layouts and print ms/step and the slow-down against the process running alone."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch_size)))
        return
    cores = os.cpu_count() or 1
    alone = run(1, cores, args)[0]
    print(f"toy UNet policy forward + backward, batch {args.batch_size} pairs, {cores} cores")
    print(f"{'layout':34s} {'ms/step (each process)':>24s} {'slow-down':>10s}")
    for name, procs, threads in (("1 process x all cores", 1, cores),
                                 ("2 processes x all cores each", 2, cores),
                                 ("2 processes x cores/2 each", 2, max(1, cores // 2))):
        times = [alone] if procs == 1 else run(procs, threads, args)
        shown = " / ".join(f"{t:.0f}" for t in times)
        print(f"{name:34s} {shown:>24s} {max(times) / alone:9.1f}x")


if __name__ == "__main__":
    main()
