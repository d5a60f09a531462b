"""Seed sweep of the toy default: train + evaluate for several seeds, print the per-seed table.

    python benchmarks/toy_seeds.py                      # seeds 0-4, the toy preset's defaults
    python benchmarks/toy_seeds.py --seeds 0 1 2 3 4 5 6 7 --workers 2 -- --lr 3e-3 --lr-scheduler cosine

Each seed is one ``dpo-tutorial train --seed S`` and one ``dpo-tutorial evaluate --json`` in its own
process (flags after ``--`` go to ``train``). With ``--workers 2`` two seeds run at once, one CPU thread
each (the same total work as one seed on two threads, ~1.4x the throughput). The seed moves the data
order, the noise, the timesteps and the LoRA initialisation, so the spread over seeds stands in for the
drift between machines (other CPUs take other floating-point paths through the same run).

Prints a Markdown table, the mean ± sd, the worst seed, and whether every seed passes the thresholds:
win-rate ≥ 0.65 with CI low > 0.55, judge accuracy gain ≥ 20 points, implicit-reward accuracy ≥ 0.70,
and a mean win-rate ≥ 0.70, all on the *seen* captions (the ones the training pairs show, new seeds).
The *unseen* captions (colour x shape combinations no training pair shows) get their own columns: whether
the effect carries over to them is reported, not required. Results also go to ``<out>/seeds.json``.

The README's table is this script's output: ``--write-readme README.md`` replaces the block between
``<!-- toy-seeds:start -->`` and ``<!-- toy-seeds:end -->``; ``--from-json <out>/seeds.json`` rewrites it
from a finished sweep without training again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dpo_tutorial.files import replace_block
from dpo_tutorial.threads import cpu_model

THRESHOLDS = {"win_rate": 0.65, "win_rate_ci_low": 0.55, "gain": 0.20, "implicit_acc": 0.70, "mean_win_rate": 0.70}


def run_seed(seed: int, out: Path, train_args: list[str], threads: int) -> dict:
    """Train and evaluate one seed in fresh processes; return the evaluation plus timings."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    run_dir = out / f"seed{seed}"
    cli = [sys.executable, "-m", "dpo_tutorial.cli"]
    t0 = time.perf_counter()
    subprocess.run(cli + ["train", "--seed", str(seed), "--output-dir", str(run_dir), "--no-sample-grid",
                          "--num-threads", str(threads), *train_args],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_train = time.perf_counter() - t0
    done = subprocess.run(cli + ["evaluate", "--lora", str(run_dir), "--json"], env=env, check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (run_dir / "eval.json").write_text(json.dumps(result))
    return {"seed": seed, **result, "train_seconds": round(t_train, 1)}


def group(row: dict, name: str) -> dict:
    """One caption group's numbers of a seed's row, with ``gain`` (DPO minus base judge accuracy).

    A sweep from before the held-out captions existed has no groups: every caption was seen in training,
    so its whole-set numbers are the seen ones (and there are no unseen ones).
    """
    numbers = row.get(name, row if name == "seen" else None)
    if numbers is None:
        return {}
    return {**numbers, "gain": numbers["dpo_accuracy"] - numbers["base_accuracy"]}


def passes(row: dict) -> bool:
    """Whether one seed meets every per-seed threshold on the seen captions."""
    seen = group(row, "seen")
    return (seen["win_rate"] >= THRESHOLDS["win_rate"] and seen["win_rate_ci_low"] > THRESHOLDS["win_rate_ci_low"]
            and seen["gain"] >= THRESHOLDS["gain"] and seen["implicit_acc"] >= THRESHOLDS["implicit_acc"])


def cells(numbers: dict) -> str:
    """``win-rate [CI] | judge accuracy base → DPO | implicit acc.`` of one group (dashes when absent)."""
    if not numbers:
        return "– | – | –"
    return (f"{numbers['win_rate']:.3f} [{numbers['win_rate_ci_low']:.3f}, {numbers['win_rate_ci_high']:.3f}] | "
            f"{numbers['base_accuracy']:.3f} → {numbers['dpo_accuracy']:.3f} | {numbers['implicit_acc']:.3f}")


def table(rows: list[dict]) -> str:
    """The per-seed Markdown table (seen and unseen captions side by side) with mean ± sd and the worst seed."""
    lines = ["| seed | seen: win-rate [95% CI] | seen: judge acc. base → DPO | seen: implicit acc. "
             "| unseen: win-rate [95% CI] | unseen: judge acc. base → DPO | unseen: implicit acc. | passes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {cells(group(r, 'seen'))} | {cells(group(r, 'unseen'))} "
                     f"| {'yes' if passes(r) else 'NO'} |")

    def ms(name, key):
        vals = [group(r, name)[key] for r in rows if group(r, name)]
        if not vals:
            return "–"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

    means = [f"{ms(g, 'win_rate')} | {ms(g, 'dpo_accuracy')} (gain {ms(g, 'gain')}) | {ms(g, 'implicit_acc')}"
             for g in ("seen", "unseen")]
    lines.append(f"| mean ± sd | {means[0]} | {means[1]} | |")
    worst = min(rows, key=lambda r: group(r, "seen")["win_rate"])
    lowest = min(group(r, "seen")["implicit_acc"] for r in rows)
    lines.append(f"| worst seen (seed {worst['seed']}) | {group(worst, 'seen')['win_rate']:.3f} | gain "
                 f"{group(worst, 'seen')['gain']:+.3f} | {lowest:.3f} (lowest) | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and print the table; exit 1 when a threshold is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=2, help="seeds run at once (default 2)")
    parser.add_argument("--out", default="runs/seeds", help="where the runs and seeds.json go")
    parser.add_argument("--from-json", help="print (and --write-readme) a finished sweep's seeds.json; train nothing")
    parser.add_argument("--write-readme", help="replace the toy-seeds block of this Markdown file with the table")
    parser.add_argument("train_args", nargs="*", help="extra `dpo-tutorial train` flags, after --")
    args = parser.parse_args(argv)
    if args.from_json:
        sweep = json.loads(Path(args.from_json).read_text())
    else:
        sweep = run_sweep(args)
    ok = all(passes(r) for r in sweep["rows"]) and statistics.mean(
        group(r, "seen")["win_rate"] for r in sweep["rows"]) >= THRESHOLDS["mean_win_rate"]
    threads = (f", {sweep['threads']} CPU thread{'s' * (sweep['threads'] > 1)} per run (the rounding, and so the "
               "numbers, differ a little from a run on another thread count)") if "threads" in sweep else ""
    report = (f"{len(sweep['rows'])} seeds on {sweep['cpu']}{threads}, `dpo-tutorial train` flags: "
              f"{' '.join(sweep['train_args']) or 'none (the toy preset)'}\n\n{table(sweep['rows'])}\n\n"
              f"A seed passes with win-rate >= {THRESHOLDS['win_rate']} and CI low > {THRESHOLDS['win_rate_ci_low']}, "
              f"a judge-accuracy gain >= {THRESHOLDS['gain']:.2f} and implicit-reward accuracy >= "
              f"{THRESHOLDS['implicit_acc']}, all on the seen captions (the unseen ones are reported, not "
              f"required). Every seed passes and the mean seen win-rate is >= {THRESHOLDS['mean_win_rate']}: "
              f"{'yes' if ok else 'NO'}.")
    print(report)
    if args.write_readme:
        replace_block(args.write_readme, "toy-seeds", report)
    return 0 if ok else 1


def run_sweep(args) -> dict:
    """Train and evaluate every seed (``args.workers`` at a time); save and return ``seeds.json``'s content."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        rows = list(pool.map(lambda s: run_seed(s, out, args.train_args, threads), args.seeds))
    sweep = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "train_args": args.train_args,
             "rows": rows, "seconds": round(time.perf_counter() - t0)}
    (out / "seeds.json").write_text(json.dumps(sweep, indent=1))
    return sweep


if __name__ == "__main__":
    sys.exit(main())
