"""The fastest one Diffusion-DPO step can run on a GPU, from its operators' FLOPs and bytes (no GPU needed).

Runs the project's step (``dpo_tutorial.step.dpo_step`` on a latent-cache batch: the policy forward and
backward with the LoRA on, the reference forward with it off, the loss) on SD 1.5-shaped models built
on the ``meta`` device (shapes only: seconds on any CPU), records every aten operator it executes with
its FLOPs (``torch.utils.flop_counter``'s formulas, forward and backward as executed) and the bytes it
reads and writes (its tensor inputs and outputs; views move nothing), and bounds each operator by the
roofline, ``max(FLOPs / peak, bytes / bandwidth)``. The sum is a lower bound of the step's time when every
operator runs as its own kernel at the card's limits (what eager PyTorch does); the FLOPs over that sum
and the peak is the highest MFU such a step allows. Real kernels reach neither limit: the bound says
which operators can matter, not what a GPU will measure.

Precisions (``--modes``), as CUDA runs them. The meta device has no autocast, so CUDA's autocast is
emulated at the ``torch.nn.functional`` level: linear, conv2d, matmul and attention in the half type;
``group_norm``, ``layer_norm`` and ``softmax`` in fp32 (CUDA autocast's fp32 list, torch's AMP docs), each
argument cast by a copy as autocast does:

- ``autocast-bf16``: how ``dpo-tutorial train --mixed-precision bf16`` stores and runs a LoRA step today:
  frozen weights in bf16, the LoRA in fp32, autocast; peft casts each adapted layer's input to the LoRA's
  fp32 (``_cast_input_dtype``) and autocast casts it back;
- ``autocast-bf16-nopeftcast``: the same with peft's input cast off (``peft.helpers.disable_input_dtype_casting``);
- ``autocast-bf16-fp32w``: the frozen weights left in fp32 (autocast casts them at every use);
- ``bf16``: every weight in bf16, the LoRA too, no autocast (group norms in bf16).

Attention is traced as the memory-efficient fused kernel (``aten._scaled_dot_product_efficient_attention``),
which reads q, k, v and writes the output and its log-sum-exp, not as the math path's score matrix.

    python benchmarks/step_roofline.py                       # SD 1.5 at 512 px, 8 pairs; H200 limits
    python benchmarks/step_roofline.py --tiny --pairs 2      # the code path, tiny shapes
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

from profile_step import category

MODES = ("autocast-bf16", "autocast-bf16-nopeftcast", "autocast-bf16-fp32w", "bf16")
LIMITS = {  # (dense bf16 TFLOP/s, memory TB/s)
    "H200 datasheet": (989.0, 4.8),
    "H200 measured here (8192^3 bf16 matmul; device copy)": (788.0, 4.3),
}
HALF_OPS = {F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm}
FP32_OPS = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax}
NO_TRAFFIC = {"_unsafe_view", "lift_fresh", "empty", "empty_strided", "empty_like", "detach"}


class EmulatedAutocast(TorchFunctionMode):
    """CUDA autocast's casting rules on any device: half-type matmuls and convolutions, fp32 norms and softmax."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.dtype if func in HALF_OPS else torch.float32 if func in FP32_OPS else None
        if target is not None:
            def cast(x):
                return x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != target else x

            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)


class Traffic(TorchDispatchMode):
    """Records ``(operator, FLOPs, bytes read and written)`` for every aten operator executed inside it."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, float, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        name = str(packet).replace("aten.", "aten::")
        moved = 0 if moves_nothing(func) else tensor_bytes((args, kwargs)) + tensor_bytes(out)
        self.rows.append((name, float(flops), float(moved)))
        return out


def moves_nothing(func) -> bool:
    """True for views and allocations: operators that read and write no tensor data."""
    returns = func._schema.returns
    aliased = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return aliased or func._overloadpacket.__name__ in NO_TRAFFIC


def tensor_bytes(tree) -> float:
    """Bytes of every tensor in a nested structure."""
    leaves, _ = tree_flatten(tree)
    return float(sum(x.numel() * x.element_size() for x in leaves if isinstance(x, torch.Tensor)))


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                    half=None):
    """``F.scaled_dot_product_attention`` as the memory-efficient fused kernel, ``(B, heads, N, d)`` -> same."""
    if half is not None:
        query, key, value = (t.to(half) for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, scale=scale)[0]


def meta_unet(tiny: bool):
    """An SD 1.5-shaped UNet (``bench_gpu.unet_config``) with a rank-8 LoRA, on the meta device."""
    from diffusers import UNet2DConditionModel

    from bench_gpu import unet_config
    from dpo_tutorial.models import add_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd15", tiny))
    unet.requires_grad_(False)
    add_lora(unet, rank=8, init_seed=0)
    return unet


def store(unet, frozen: torch.dtype, lora: torch.dtype) -> None:
    """Frozen weights in ``frozen``, the LoRA's in ``lora``."""
    for p in unet.parameters():
        p.data = p.data.to(lora if p.requires_grad else frozen)


def trace_step(unet, mode: str, pairs: int, recorder=None) -> list[tuple[str, float, float]]:
    """Every operator of one DPO step (policy forward + backward, reference forward, loss) in ``mode``, as
    ``(operator, FLOPs, bytes)``; ``recorder``: another dispatch mode to run the step under instead of
    :class:`Traffic` (its ``rows``, if any, are returned)."""
    from diffusers import DDPMScheduler
    from peft.helpers import disable_input_dtype_casting

    from dpo_tutorial.models import DiffusionParts
    from dpo_tutorial.step import dpo_step

    half = torch.bfloat16
    store(unet, torch.float32 if mode.endswith("fp32w") else half, half if mode == "bf16" else torch.float32)
    autocast = mode.startswith("autocast")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    # what a latent-cache batch needs of the VAE: its device and scaling factor (no VAE pass runs)
    vae = argparse.Namespace(device=torch.device("meta"), config=argparse.Namespace(scaling_factor=0.18215))
    parts = DiffusionParts([], [], vae, unet, scheduler, is_sdxl=False)
    size = unet.config.sample_size
    mean = torch.zeros(2 * pairs, 4, size, size, device="meta")  # (2B, 4, h, w): a latent-cache batch
    batch = {"latent_mean": mean, "latent_std": torch.zeros_like(mean), "captions": [""] * pairs,
             "prompt_embeds": torch.zeros(pairs, 77, unet.config.cross_attention_dim, device="meta"),
             "time_ids": torch.zeros(2 * pairs, 6, device="meta")}
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda *a, **k: fused_attention(*a, **k, half=half if autocast else None)
    traffic = recorder if recorder is not None else Traffic()
    try:
        with disable_input_dtype_casting(unet, mode.endswith("nopeftcast")), traffic:
            if autocast:
                with EmulatedAutocast(half):
                    loss = dpo_step(parts, unet, batch, beta=5000.0).loss
            else:
                loss = dpo_step(parts, unet, batch, beta=5000.0).loss
            loss.backward()
    finally:
        F.scaled_dot_product_attention = original
    return getattr(traffic, "rows", [])


def bound(rows, tflops: float, tbps: float) -> float:
    """Seconds: the sum over operators of ``max(FLOPs / peak, bytes / bandwidth)``."""
    return sum(max(f / (tflops * 1e12), b / (tbps * 1e12)) for _, f, b in rows)


def summarise(mode: str, rows, tiny: bool) -> dict:
    """Totals, the bound under each set of limits, and FLOPs, bytes and bound by kind of operator."""
    flops = sum(f for _, f, _ in rows)
    result = {"mode": mode, "tflop": flops / 1e12, "gb_moved": sum(b for _, _, b in rows) / 1e9,
              "operators": len(rows), "kernel_ops": sum(1 for _, f, b in rows if f or b),
              "bounds_ms": {k: bound(rows, *v) * 1e3 for k, v in LIMITS.items()}, "by_kind": {}}
    peak = LIMITS["H200 datasheet"][0]
    result["mfu_ceiling"] = {k: flops / (ms / 1e3) / (peak * 1e12) if ms else float("nan")
                             for k, ms in result["bounds_ms"].items()}
    for name, f, b in rows:
        kind = result["by_kind"].setdefault(category(name), {"tflop": 0.0, "gb": 0.0, "ms": 0.0})
        kind["tflop"] += f / 1e12
        kind["gb"] += b / 1e9
        kind["ms"] += max(f / (peak * 1e12), b / (LIMITS["H200 datasheet"][1] * 1e12)) * 1e3
    return result


def main(argv: list[str] | None = None) -> None:
    """Trace each mode and print the totals and the per-kind table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet of bench_gpu --tiny (8x8 latents)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    unet = meta_unet(args.tiny)
    results = [summarise(mode, trace_step(unet, mode, args.pairs), args.tiny) for mode in args.modes]
    size = unet.config.sample_size
    print(f"SD 1.5-shaped UNet{' (tiny)' if args.tiny else ''}, {args.pairs} pairs ({2 * args.pairs} latents of "
          f"{size}x{size}), LoRA rank 8; one step = policy forward + backward, reference forward, loss")
    names = list(LIMITS)
    print(f"limits: {'; '.join(f'{k}: {v[0]:g} TFLOP/s, {v[1]:g} TB/s' for k, v in LIMITS.items())}; MFU against "
          f"{LIMITS[names[0]][0]:g}\n")
    print("| mode | TFLOP | GB moved | operators (moving data) | bound ms (datasheet) | bound ms (measured) | MFU "
          "ceiling (datasheet / measured limits) |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['tflop']:.4g} | {r['gb_moved']:.4g} | {r['operators']} ({r['kernel_ops']}) | "
              f"{r['bounds_ms'][names[0]]:.4g} | {r['bounds_ms'][names[1]]:.4g} | "
              f"{r['mfu_ceiling'][names[0]]:.0%} / {r['mfu_ceiling'][names[1]]:.0%} |")
    kinds = sorted({k for r in results for k in r["by_kind"]}, key=lambda k: -results[0]["by_kind"].get(k, {})
                   .get("ms", 0))
    print("\nby kind of operator: GB moved / bound ms at the datasheet limits\n| kind | "
          + " | ".join(r["mode"] for r in results) + " |\n|---|" + "---|" * len(results))
    for k in kinds:
        cells = [r["by_kind"].get(k) for r in results]
        print(f"| {k} | " + " | ".join("-" if c is None else f"{c['gb']:.3g} GB / {c['ms']:.3g} ms" for c in cells)
              + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
