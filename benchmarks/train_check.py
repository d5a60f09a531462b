"""The precisions no CPU test trains: one bf16 full fine-tune and one fp16 LoRA run of ``dpo_tutorial.train.train``.

On an SD 1.5-shaped pipeline with random weights and a 512-px Pick-a-Pic-format parquet (the GPU work of
``bench_vs_diffusers.py --work sd15-gpu``, or any pipeline and dataset given), each case is the ``sd15``
preset as a user runs it (2 pairs a micro-batch, 8 micro-batches a step, gradient checkpointing), for
``--steps`` optimizer steps (default 2: the second step runs on weights the first one updated), in its own
process:

- ``bf16-full``: ``full_finetune=True, mixed_precision="bf16"`` (the paper's setting; a frozen bf16 copy of
  the UNet is the reference);
- ``fp16-lora``: the preset itself (LoRA, fp16 with the GradScaler).

For each it reports pass/fail (the exception's last line when it failed), every step's loss and whether it is
finite, which updates were skipped (under fp16 the GradScaler skips overflowing updates while it finds its
scale), seconds and the peak memory (``torch.cuda.max_memory_allocated``; on a CPU the process's peak RSS).

    python benchmarks/train_check.py --pipeline DIR --dataset DIR --out OUT     # on a GPU
    python benchmarks/train_check.py --tiny --out OUT                           # the same code on a CPU, tiny
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

CASES = {
    "bf16-full": dict(full_finetune=True, mixed_precision="bf16"),
    "fp16-lora": dict(full_finetune=False, mixed_precision="fp16"),
}
TINY = dict(resolution=64, batch_size=2, grad_accum=2)  # the preset's shape of a step, shrunk


def run_case(case: str, pipeline: str, dataset: str, out: Path, steps: int, tiny: bool) -> dict:
    """Train one case in this process; return its row (``ok`` False and ``error`` on an exception)."""
    import torch

    from dpo_tutorial.config import get_preset
    from dpo_tutorial.train import train

    config = get_preset("sd15", pretrained=pipeline, dataset=dataset, streaming=False, max_steps=steps,
                        output_dir=str(out), checkpoint_every=0, heldout_split=None, sample_grid=False,
                        **CASES[case], **(TINY if tiny else {}))
    cuda = torch.cuda.is_available()
    row = {"case": case, "device": torch.cuda.get_device_name() if cuda else "cpu", "ok": False,
           "settings": {k: getattr(config, k) for k in ("full_finetune", "mixed_precision", "resolution", "batch_size",
                                                        "grad_accum", "gradient_checkpointing", "max_steps")}}
    start = time.perf_counter()
    try:
        history = train(config)
        row["ok"] = True
        row["losses"] = history["loss"]
        row["skipped_updates"] = [r["step"] for r in history.records if r["skipped_update"]]
        row["losses_finite"] = all(math.isfinite(x) for x in row["losses"])
    except Exception as err:  # noqa: BLE001 - the failure is the result
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
        row["traceback_tail"] = traceback.format_exc()[-1500:]
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["peak_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if cuda
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    row["peak_kind"] = "torch.cuda.max_memory_allocated" if cuda else "peak RSS of the process"
    return row


def format_row(row: dict) -> str:
    """One markdown table row."""
    if not row["ok"]:
        return (f"| {row['case']} | FAILED | - | - | {row['peak_gib']:.2f} | {row['seconds']} | {row['error']} |")
    losses = ", ".join(f"{x:.4f}" for x in row["losses"])
    return (f"| {row['case']} | pass | {losses} ({'finite' if row['losses_finite'] else 'NOT FINITE'}) | "
            f"{row['skipped_updates'] or 'none'} | {row['peak_gib']:.2f} | {row['seconds']} | |")


def tiny_work(folder: Path) -> tuple[str, str]:
    """The tiny pipeline and parquet of ``bench_vs_diffusers.py --work sd15-gpu --tiny`` (built once in ``folder``)."""
    from bench_vs_diffusers import make_log_work

    made = make_log_work("sd15-gpu", folder, tiny=True, pairs=16)
    return made["pipeline"], made["dataset"]


def main(argv: list[str] | None = None) -> None:
    """Run each case in a fresh process and print the table (and write ``train_check.json`` in ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", help="an SD 1.5-shaped pipeline folder (default with --tiny: a tiny one)")
    parser.add_argument("--dataset", help="a folder with train.parquet in the Pick-a-Pic format")
    parser.add_argument("--out", default=None, help="runs, train_check.json (default: a temporary folder)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="64 px, 2 pairs x 2 micro-batches: the code path on a CPU")
    parser.add_argument("--keep-runs", action="store_true", help="keep each case's run folder (a full fine-tune's "
                        "checkpoint and UNet take ~14 GB at SD 1.5's size)")
    parser.add_argument("--one-case", default=None, help=argparse.SUPPRESS)  # the child that trains one case
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="train-check-"))
    if args.one_case:
        row = run_case(args.one_case, args.pipeline, args.dataset, out / args.one_case, args.steps, args.tiny)
        (out / f"{args.one_case}.json").write_text(json.dumps(row, indent=1))
        return
    out.mkdir(parents=True, exist_ok=True)
    pipeline, dataset = args.pipeline, args.dataset
    if not pipeline:
        if not args.tiny:
            raise SystemExit("--pipeline and --dataset are needed without --tiny")
        pipeline, dataset = tiny_work(out / "work")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    print("| case | ran | loss per step | skipped updates | peak GiB | seconds | error |\n|---|---|---|---|---|---|---|",
          flush=True)
    rows = []
    for case in args.cases:
        (out / f"{case}.json").unlink(missing_ok=True)
        done = subprocess.run([sys.executable, __file__, "--one-case", case, "--pipeline", pipeline, "--dataset",
                               dataset, "--out", str(out), "--steps", str(args.steps), *(["--tiny"] if args.tiny else [])],
                              env=env, capture_output=True, text=True)
        result = out / f"{case}.json"
        row = (json.loads(result.read_text()) if result.exists() else
               {"case": case, "ok": False, "seconds": "-", "peak_gib": float("nan"),
                "error": f"the process died (exit {done.returncode}): {done.stderr.strip()[-300:]}"})
        rows.append(row)
        print(format_row(row), flush=True)
        if not args.keep_runs:
            shutil.rmtree(out / case, ignore_errors=True)
    print(f"\npeak memory: {rows[0].get('peak_kind', '-')}; device: {rows[0].get('device', '-')}; settings per case in "
          f"{out / 'train_check.json'}")
    (out / "train_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
