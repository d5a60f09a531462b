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

``--torch-profiler`` instead runs the project's own optimizer step (``train.setup_run`` and
``train.optimizer_step``: accelerate's autocast, the GradScaler, clipping, the fused AdamW, the prefetched
batches, exactly as ``train`` runs them) under ``torch.profiler`` for ``--steps`` steps after ``--warmup``, on
CUDA when there is one, and prints where a step's time goes:

- wall time per step and the device's busy time (the sum of its kernels): a gap means the GPU waited for
  the CPU (launch overhead, syncs, data);
- stages, as ranges that hooks open around the VAE encoder, the text encoder(s) and each UNet forward
  (policy with the LoRA on, reference without gradients), and around the wait for the next batch; what is
  left (loss, backward, clipping, AdamW) by difference;
- device time by kind of operator (convolution, matmul, attention, normalisation, casts and copies,
  optimizer, other element-wise), each kernel counted once, under the operator that launched it;
- device syncs (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``.item()``): calls and CPU time per step;
- the top ``--top`` operators and kernels by self device time (torch's own table), and, with ``--trace FILE``,
  a Chrome trace (open it in ``chrome://tracing`` or Perfetto).

    python benchmarks/profile_step.py --torch-profiler --preset sd15 --pretrained DIR --dataset DIR \\
        --resolution 512 --batch-size 8 --mixed-precision bf16            # on a GPU
    python benchmarks/profile_step.py --torch-profiler --pretrained DIR --dataset DIR --resolution 64 --batch-size 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

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


CATEGORIES = (  # (kind, fragments of an operator's name); the first match wins
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("convolution", ("convolution", "conv2d", "cudnn_conv")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("normalisation", ("group_norm", "layer_norm", "batch_norm")),
    ("cast / copy", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::cat")),
    ("optimizer", ("adam", "_foreach")),
)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")
DATA = "data: wait for the next batch"


def category(name: str) -> str:
    """The kind of operator ``name`` is (:data:`CATEGORIES`); other ``aten::`` operators are element-wise."""
    for kind, fragments in CATEGORIES:
        if any(f in name for f in fragments):
            return kind
    return "element-wise and other aten" if name.startswith("aten::") else "other"


def label_modules(parts, ref_unet=None) -> list:
    """Forward hooks that open a profiler range when the VAE encoder, a text encoder or a UNet starts and close it
    when it returns (the UNet's range names the policy or the reference pass by whether gradients are on);
    returns the hook handles."""
    from torch.autograd.profiler import record_function

    handles = []

    def add(module, name):
        open_ranges = []

        def pre(mod, args):
            label = name() if callable(name) else name
            open_ranges.append(record_function(label))
            open_ranges[-1].__enter__()

        def post(mod, args, output):
            open_ranges.pop().__exit__(None, None, None)

        handles.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

    add(parts.vae.encoder, "VAE encoder")
    for encoder in parts.text_encoders:
        add(encoder, "text encoder")
    add(parts.unet, lambda: "UNet forward: policy (LoRA on)" if torch.is_grad_enabled()
        else "UNet forward: reference (no grad)")
    if ref_unet is not None:
        add(ref_unet, "UNet forward: reference copy (no grad)")
    return handles


class LabelledBatches:
    """An iterator over ``batches`` whose every ``next`` is one profiler range (:data:`DATA`)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return self

    def __next__(self):
        from torch.autograd.profiler import record_function

        with record_function(DATA):
            return next(self.batches)


def profile_config(args, output_dir: str):
    """The run ``--torch-profiler`` profiles: ``--preset`` with the benchmark's batch, precision and source, a fresh
    ``output_dir``, nothing at the end of the run (the profile never reaches it)."""
    from dpo_tutorial.config import get_preset

    config = get_preset(args.preset, pretrained=args.pretrained, dataset=args.dataset, streaming=False,
                        resolution=args.resolution, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                        full_finetune=args.full_finetune, random_flip=args.random_flip,
                        max_steps=args.warmup + args.steps, heldout_split=None, sample_grid=False,
                        output_dir=output_dir, checkpoint_every=0, cache_latents=False)
    if args.source == "cache":  # built with the models on the GPU when there is one, as train's automatic cache
        from dpo_tutorial.cache import build_cache
        from dpo_tutorial.models import load_parts

        parts = load_parts(config.pretrained)
        if torch.cuda.is_available():
            parts.to("cuda", {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision))
        config = config.replace(cache=str(build_cache(config, Path(output_dir).parent / "cache", parts=parts)))
        del parts
    return config


def torch_profile(config, steps: int, warmup: int, top: int, trace: str | None = None) -> str:
    """Profile ``steps`` optimizer steps of ``config``'s run after ``warmup`` untimed ones; return the report (see
    the module doc)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from dpo_tutorial.prefetch import Prefetcher
    from dpo_tutorial.run_dir import release_output_dir
    from dpo_tutorial.train import optimizer_step, prefetch_depth, setup_run

    run = setup_run(config)
    device = run.accelerator.device
    cuda = device.type == "cuda"
    batches = Prefetcher(run.stream, prefetch_depth(config, device, run.cached))
    labelled = LabelledBatches(batches)
    handles = label_modules(run.parts, run.ref_unet)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        for _ in range(warmup):
            optimizer_step(run, labelled)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                with record_function("optimizer step"):
                    optimizer_step(run, labelled)
            if cuda:
                torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    finally:
        for handle in handles:
            handle.remove()
        batches.close()
        release_output_dir(run.out)
    if trace:
        prof.export_chrome_trace(trace)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    head = (f"torch.profiler: {steps} optimizer steps after {warmup} warm-up on {name}; {config.mixed_precision}, "
            f"{'full fine-tune' if config.full_finetune else f'LoRA rank {config.rank}'}, batch {config.batch_size} "
            f"pairs x {config.grad_accum}, {config.resolution} px, gradient checkpointing "
            f"{'on' if config.gradient_checkpointing else 'off'}, reading {'the latent cache' if run.cached else 'images'}")
    return "\n".join([head, *profile_report(prof.key_averages(), steps, wall, cuda, top)])


def profile_report(averages, steps: int, wall: float, cuda: bool, top: int) -> list[str]:
    """The report's lines from ``prof.key_averages()`` (device times on CUDA, CPU times otherwise)."""
    from torch.autograd import DeviceType

    def self_time(e):  # microseconds
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    ops = [e for e in averages if e.device_type == DeviceType.CPU]
    busy = (sum(e.self_device_time_total for e in averages if e.device_type != DeviceType.CPU) if cuda
            else sum(e.self_cpu_time_total for e in ops))
    per_step = lambda us: us / 1000 / steps  # noqa: E731  microseconds in all steps -> ms per step
    kind = "device" if cuda else "CPU"
    lines = [f"wall {wall * 1000:.1f} ms/step; {kind} busy (sum of self times) {per_step(busy):.1f} ms/step"
             + (f" ({per_step(busy) / (wall * 1000):.0%} of the wall: the rest the GPU waited)" if cuda else ""),
             f"\nstages (ranges; {kind} time includes everything launched inside; ms per step):"]
    ranges = {e.key: e for e in ops}
    inside = 0.0  # the rest is busy time minus the ranges: on CUDA the backward runs on autograd's own thread,
    # outside every range of the main thread, so "optimizer step"'s range would miss its kernels
    for label in (DATA, "VAE encoder", "text encoder", "UNet forward: policy (LoRA on)",
                  "UNet forward: reference (no grad)", "UNet forward: reference copy (no grad)"):
        e = ranges.get(label)
        if e is None:
            continue
        spent = e.device_time_total if cuda else e.cpu_time_total
        inside += spent
        lines.append(f"  {label:45s} {kind} {per_step(spent):9.2f}   CPU {per_step(e.cpu_time_total):9.2f}   "
                     f"calls/step {e.count / steps:g}")
    lines.append(f"  {'the rest: loss, backward, clipping, AdamW':45s} {kind} {per_step(busy - inside):9.2f}   "
                 "(by difference)")
    by_kind: dict[str, float] = {}
    for e in ops:
        by_kind[category(e.key)] = by_kind.get(category(e.key), 0.0) + self_time(e)
    lines.append(f"\n{kind} time by kind of operator (self time, each kernel once; ms per step, share of busy):")
    for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        if us > 0:
            lines.append(f"  {k:30s} {per_step(us):9.2f}  {us / busy if busy else float('nan'):6.1%}")
    syncs = [e for e in averages if any(s in e.key for s in SYNCS)]
    lines.append("\nsyncs (calls and CPU ms per step): " + (", ".join(
        f"{e.key} {e.count / steps:g} x, {per_step(e.cpu_time_total):.2f} ms" for e in syncs) or "none recorded"))
    lines.append(f"\ntop {top} by self {kind} time (torch.profiler's table, all {steps} steps):")
    lines.append(averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=top,
                                max_name_column_width=70))
    return lines


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
    prof = parser.add_argument_group("--torch-profiler: the project's own step under torch.profiler (see the doc)")
    prof.add_argument("--torch-profiler", action="store_true")
    prof.add_argument("--preset", default="toy", help="the preset the other flags override (sd15 on a GPU)")
    prof.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    prof.add_argument("--grad-accum", type=int, default=1)
    prof.add_argument("--gradient-checkpointing", action="store_true")
    prof.add_argument("--full-finetune", action="store_true")
    prof.add_argument("--source", default="images", choices=["images", "cache"],
                      help="read and encode images each step, or read a latent cache built first")
    prof.add_argument("--steps", type=int, default=3)
    prof.add_argument("--warmup", type=int, default=2)
    prof.add_argument("--top", type=int, default=25)
    prof.add_argument("--trace", default=None, help="also write a Chrome trace here")
    args = parser.parse_args(argv)
    if args.torch_profiler:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print(torch_profile(profile_config(args, str(Path(tmp) / "run")), args.steps, args.warmup, args.top,
                                args.trace))
        return
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
