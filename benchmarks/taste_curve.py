"""How many labels does a taste take? Notebook 08's experiment over seeds, with a scripted labeller.

For each seed: sample ``--pairs`` candidate pairs from the toy base model, label them as a labeller
following the taste's scorer with ``--noise`` mistakes would, then for each count in ``--counts`` train DPO
on the first labels (``dpo_tutorial.toy.your_taste.taste_config``) and compare 240 held-out base and DPO
images under the taste's scorer (win-rate with its 95% interval) and the caption judge.

    python benchmarks/taste_curve.py                       # left, seeds 0 1 2, 25/50/100/200 labels
    python benchmarks/taste_curve.py --taste bigger --seeds 0 --counts 200 --figure figures/taste_bigger.png

Prints a markdown table (and its JSON to ``--out``); ``--write-readme README.md`` also puts it in the README's
``taste-curve`` block; ``--figure`` writes the before/after figure of the first seed at the largest count,
``--curve`` the win-rate-against-labels figure.
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """Run the sweep and print the labels-versus-effect table."""

    from dpo_tutorial.figures import fix_randomness
    from dpo_tutorial.files import replace_block
    from dpo_tutorial.plots import labels_curve_figure, taste_shift_figure
    from dpo_tutorial.sample import load_pipeline
    from dpo_tutorial.threads import cpu_model
    from dpo_tutorial.toy import PIPELINE_DIR
    from dpo_tutorial.toy.labelling import LabelStore, candidate_pairs, label_with_script
    from dpo_tutorial.toy.tastes import TASTES
    from dpo_tutorial.toy.your_taste import labels_curve, measure_shift

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taste", default="left", choices=list(TASTES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--counts", nargs="+", type=int, default=[25, 50, 100, 200])
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--per-caption", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/taste-curve")
    parser.add_argument("--figure", default=None, help="write the before/after figure here (first seed, most labels)")
    parser.add_argument("--curve", default=None, help="write the win-rate-against-labels figure here")
    parser.add_argument("--write-readme", help="replace the taste-curve block of this Markdown file with the table")
    args = parser.parse_args(argv)
    fix_randomness(args.threads)  # seeds everything and pins torch to --threads threads
    out = Path(args.out)
    pipe = load_pipeline(PIPELINE_DIR)
    results: dict[int, list[dict]] = {}
    for seed in args.seeds:
        start = time.perf_counter()
        store = LabelStore(out / f"seed-{seed}" / "labels", candidate_pairs(pipe, max(args.counts), seed))
        label_with_script(store, args.taste, args.noise, seed)
        print(f"seed {seed}: {store.progress()} in {time.perf_counter() - start:.0f} s", flush=True)
        results[seed] = labels_curve(store.folder, sorted(args.counts), out / f"seed-{seed}", args.taste, seed=seed,
                                     per_caption=args.per_caption)
        for r in results[seed]:
            print(f"  {r['labels']:4d} labels: win-rate {r['win_rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}], "
                  f"train {r['train_seconds']:.0f} s", flush=True)
    lines = [f"'{args.taste}' taste, scripted labeller with {args.noise:.0%} noise; {12 * args.per_caption} "
             f"held-out prompts per model; {cpu_model()}, {args.threads} threads, {date.today().isoformat()} "
             "(`python benchmarks/taste_curve.py`)", "",
             f"| labels | seed | win-rate [95% CI] | mean \"{args.taste}\" score base → DPO "
             "| caption judge base → DPO | training s |", "|---|---|---|---|---|---|"]
    for n in sorted(args.counts):
        for seed in args.seeds:
            r = next(r for r in results[seed] if r["labels"] == n)
            lines.append(f"| {n} | {seed} | {r['win_rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] "
                         f"| {r['mean_base']:.3f} → {r['mean_dpo']:.3f} | {r['judge_base']:.3f} → "
                         f"{r['judge_dpo']:.3f} | {r['train_seconds']:.0f} |")
    print("\n" + "\n".join(lines))
    if args.write_readme:
        replace_block(args.write_readme, "taste-curve", "\n".join(lines))
        print(f"wrote the table into {args.write_readme}")
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    if args.figure:
        seed, n = args.seeds[0], max(args.counts)
        shift = measure_shift(out / f"seed-{seed}" / f"run-{n}", args.taste, per_caption=args.per_caption)
        taste_shift_figure(shift).savefig(args.figure, dpi=110)
        print(f"wrote {args.figure}")
    if args.curve:
        labels_curve_figure(results).savefig(args.curve, dpi=110)
        print(f"wrote {args.curve}")


if __name__ == "__main__":
    main()
