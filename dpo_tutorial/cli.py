"""The ``dpo-tutorial`` command. ``dpo-tutorial train --help`` lists every flag.

Also runs as ``python -m dpo_tutorial.cli`` and ``accelerate launch -m dpo_tutorial.cli train ...``.
The train flags are generated from :class:`dpo_tutorial.config.TrainConfig`, so the dataclass is the
one place a setting is defined; explicitly given flags override the chosen ``--preset``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path

from .cache import build_cache
from .config import (
    PRESET_NAMES,
    TOY_PAIRS_DIR,
    TOY_PIPELINE_DIR,
    TrainConfig,
    get_preset,
)
from .errors import ConfigError, UserError
from .figures import make_figures
from .paper_eval import PaperEvalSettings, report_lines, run_paper_eval
from .run_dir import LORA_FILE, History, plan_rerun
from .summary import format_summary
from .toy import pairs, pretrain
from .toy.evaluation import check_toy_counts, evaluate_toy
from .toy.pairs import UNSEEN_CAPTIONS
from .train import train


def _flag_type(hint):
    """``int | None`` -> int, ``bool`` -> bool, ..."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _shown(value, none_text: str) -> str:
    """A default as ``--help`` shows it (``%`` escaped for argparse); ``None`` as the field's ``none`` text."""
    text = none_text if value is None else repr(value)
    return text.replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, preset: str = "toy") -> None:
    """One ``--kebab-case`` flag per :class:`TrainConfig` field, defaulting to 'not given'.

    The help shows the value that runs when the flag is left out: the field's value in ``preset``.
    """
    hints = typing.get_type_hints(TrainConfig)
    values = get_preset(preset).to_dict()
    for f in dataclasses.fields(TrainConfig):
        kind = _flag_type(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        shown = _shown(values[f.name], f.metadata.get("none", "not set"))
        help_text = f"{f.metadata.get('help', '')} ({preset} preset: {shown})"
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(name, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset named by ``--preset`` with every explicitly given flag applied, validated."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return get_preset(args.preset, **overrides)


def chosen_preset(argv: list[str]) -> str:
    """The ``--preset`` named in ``argv`` (``toy`` when absent or not a preset name), read before the full parse
    so that ``--help`` can show that preset's values."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="toy")
    found = pre.parse_known_args(argv)[0].preset
    return found if found in PRESET_NAMES else "toy"


def build_parser(preset: str = "toy") -> argparse.ArgumentParser:
    """The full ``dpo-tutorial`` argument parser; the train/cache flags' help shows ``preset``'s values."""
    shown = (f"Each flag's help shows the value --preset {preset} runs when the flag is left out; "
             "`dpo-tutorial train --preset sd15 --help` shows another preset's.")
    parser = argparse.ArgumentParser(prog="dpo-tutorial", description="Diffusion-DPO, taught and run for real.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a LoRA with Diffusion-DPO",
                           description="Fine-tune a LoRA (or the UNet) with Diffusion-DPO. With no flags: the "
                                       "offline toy preset. " + shown)
    train.add_argument("--preset", default="toy", choices=PRESET_NAMES,
                       help="named recipe the other flags override (default: toy, offline)")
    train.add_argument("--evaluate", action="store_true",
                       help="toy world: after training, measure base vs DPO on held-out prompts (win-rate, "
                            "judge accuracy; ~30 s), as `dpo-tutorial evaluate` does (make train passes it)")
    add_config_flags(train, preset)
    cache = sub.add_parser("cache", help="encode a dataset once (VAE latents + text embeddings) for fast training",
                           description="Encode --dataset/--split for --pretrained at --resolution into a latent "
                                       "cache; then train with --cache DIR and the same model and resolution. "
                                       + shown)
    cache.add_argument("--out", required=True, help="folder to write the cache to")
    cache.add_argument("--preset", default="toy", choices=PRESET_NAMES, help="named recipe the flags override")
    add_config_flags(cache, preset)
    ev = sub.add_parser("evaluate", help="base vs DPO: the toy world, or a real SD 1.5 / SDXL model as the paper "
                                         "measures",
                        description="Toy world (--lora only): sample base and DPO images for the same held-out "
                                    "captions and seeds, score them with the toy judge, and measure implicit-reward "
                                    "accuracy on held-out pairs; each reported for the captions the training pairs "
                                    "show (new seeds) and for those they never show. Real models (--pretrained with "
                                    "--lora or --unet, and --out): implicit-reward accuracy on Pick-a-Pic pairs and "
                                    "PickScore of base vs tuned images on a caption set, saved as they are made so "
                                    "that a rerun continues an interrupted evaluation (docs/REPRODUCE.md gives one "
                                    "command per number of the paper).")
    ev.add_argument("--lora", help="folder holding pytorch_lora_weights.safetensors (a train output)")
    ev.add_argument("--per-caption", type=int, help="toy: images per caption and model (12 captions; default 40)")
    ev.add_argument("--num-draws", type=int, help="noise/timestep draws per held-out pair (default 8)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    real = ev.add_argument_group("real models (the paper's measurements; needs --pretrained and --out)")
    real.add_argument("--pretrained", help="base pipeline: SD 1.x or SDXL folder or hub id (the reference model)")
    real.add_argument("--unet", help="tuned full UNet instead of --lora: folder or hub id, e.g. "
                                     "mhdang/dpo-sd1.5-text2image-v1 (a unet/ subfolder is found)")
    real.add_argument("--vae", help="replacement VAE, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in float16")
    real.add_argument("--out", help="folder for images, per-prompt logs and report.json; rerun to continue")
    real.add_argument("--captions", help="captions for PickScore: a Pick-a-Pic-format dataset (hub id, folder, "
                                         ".parquet) or a .txt/.tsv/.csv/.json prompt file (PartiPrompts.tsv, HPSv2)")
    real.add_argument("--captions-split", help="split of a --captions dataset (default validation_unique)")
    real.add_argument("--num-prompts", type=int, help="first N distinct captions (default 500, at most 10,000)")
    real.add_argument("--pairs", help="Pick-a-Pic-format pairs for the implicit-reward accuracy (hub id, folder, "
                                      ".parquet)")
    real.add_argument("--pairs-split", help="split of --pairs (default validation)")
    real.add_argument("--max-pairs", type=int, help="score at most N non-tie pairs (default and bound 50,000)")
    real.add_argument("--pair-batch", type=int, help="rows read, scored and logged at a time (default 64)")
    real.add_argument("--steps", type=int, help="sampling steps (default 50)")
    real.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default 7.5)")
    real.add_argument("--resolution", type=int, help="pixels (default: the model's own, 512 SD 1.5, 1024 SDXL)")
    real.add_argument("--seed", type=int, help="prompt i is sampled with seed + i for both models (default 0)")
    real.add_argument("--pickscore-model", help="PickScore weights (default yuvalkirstain/PickScore_v1)")
    real.add_argument("--pickscore-processor", help="its processor (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    real.add_argument("--streaming", action="store_true", default=None,
                      help="stream captions and pairs (only the rows used are downloaded)")
    real.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"],
                      help="model weights (default auto: float16 on a GPU, float32 on a CPU)")
    real.add_argument("--device", help="torch device (default cuda when available, else cpu)")
    real.add_argument("--sample-batch", type=int, default=4, help="prompts sampled at once (memory only; default 4)")
    fig = sub.add_parser("figures", help="regenerate every PNG in figures/ (trains one short toy run)")
    fig.add_argument("--out", default="figures", help="output folder (default: figures)")
    toy = sub.add_parser("toy", help="rebuild the shipped toy assets (tiny-sd-shapes, pickapic-shapes)")
    toy.add_argument("step", choices=["pretrain", "pairs"], help="pretrain the tiny SD, or sample + judge the pairs")
    toy.add_argument("args", nargs=argparse.REMAINDER, help="passed on (see `dpo-tutorial toy pretrain --help`)")
    return parser


def is_first_process() -> bool:
    """Whether this is process 0 of a run launched by ``torchrun`` / ``accelerate launch`` (or a plain run): the
    one that speaks for the run (the others hold no history or artefacts to report)."""
    return int(os.environ.get("RANK", "0")) == 0


def run_train(args: argparse.Namespace) -> int:
    """``dpo-tutorial train``: print where the artefacts went and the last metrics (process 0 only)."""
    plan = plan_rerun(config_from_args(args))
    if not is_first_process():  # the others train beside process 0 and leave the report (and --evaluate) to it
        if plan.action != "finished":
            train(plan.config)
        return 0
    if plan.message:
        print(plan.message.rstrip("\n"))
    config = plan.config
    if plan.action == "finished":
        report_finished(config)
    else:
        history = train(config)
        print(f"done: {len(history)} steps")
        for line in format_summary(history.summary):
            print(line)
        print(f"artefacts in {config.output_dir}" + (f"; LoRA: {history.lora_path}" if history.lora_path else ""))
    if getattr(args, "evaluate", False):
        evaluate_after_training(config)
    return 0


def report_finished(config: TrainConfig) -> None:
    """Say that ``config.output_dir`` already holds this very run, finished, with its closing report."""
    summary = History.load(config.output_dir).summary
    print(f"{config.output_dir} already holds this run, finished ({config.max_steps} steps): nothing to train.")
    for line in format_summary(summary):
        print(line)
    print(f"Evaluate it: dpo-tutorial evaluate --lora {config.output_dir}\nTrain it again from scratch: "
          f"delete {config.output_dir} or pass another --output-dir")


def is_toy_run(config: TrainConfig) -> bool:
    """Whether ``config`` trains the shipped toy model on the shipped toy pairs (the toy judge can score it)."""
    def same(a: str, b: Path) -> bool:
        return Path(a).expanduser().resolve() == b.resolve()

    return same(config.pretrained, TOY_PIPELINE_DIR) and same(config.dataset, TOY_PAIRS_DIR)


def evaluate_after_training(config: TrainConfig) -> None:
    """``train --evaluate``: the toy evaluation of the run just trained (or found finished)."""
    if config.full_finetune or not is_toy_run(config):
        print("--evaluate scores the toy world only; for SD 1.5 use notebook 07 (PickScore on validation_unique)")
        return
    print(f"measuring the effect on held-out prompts (dpo-tutorial evaluate --lora {config.output_dir}) ...",
          flush=True)
    print_toy_evaluation(config.output_dir, progress=True)


def run_cache(args: argparse.Namespace) -> int:
    """``dpo-tutorial cache``: build the latent cache and say how to use it."""
    config = config_from_args(args)
    out = build_cache(config, args.out)
    print(f"cache written to {out}; train from it with: dpo-tutorial train --cache {out} (same model/resolution)")
    return 0


PAPER_ONLY_FLAGS = ("unet", "vae", "out", "captions", "captions_split", "num_prompts", "pairs", "pairs_split",
                    "max_pairs", "pair_batch", "steps", "guidance_scale", "resolution", "seed", "pickscore_model",
                    "pickscore_processor", "streaming", "dtype", "device")


def run_evaluate(args: argparse.Namespace) -> int:
    """``dpo-tutorial evaluate``: the toy evaluation, or a real model's (``--pretrained``); a table or JSON."""

    if args.pretrained:
        return run_paper_evaluation(args)
    given = [f"--{name.replace('_', '-')}" for name in PAPER_ONLY_FLAGS if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} evaluate a real model: pass --pretrained (the base pipeline) too")
    if not args.lora:
        raise ConfigError("pass --lora DIR (a toy train output), or --pretrained with --lora or --unet for a real "
                          "model")
    per_caption = 40 if args.per_caption is None else args.per_caption
    num_draws = 8 if args.num_draws is None else args.num_draws
    check_toy_counts(per_caption, num_draws, ("--per-caption", "--num-draws"))
    if not (Path(args.lora) / LORA_FILE).exists():
        raise ConfigError(f"--lora {args.lora!r} holds no pytorch_lora_weights.safetensors: pass a train output dir")
    print_toy_evaluation(args.lora, per_caption, num_draws, args.json, progress=True)
    return 0


def run_paper_evaluation(args: argparse.Namespace) -> int:
    """``dpo-tutorial evaluate --pretrained ...``: :func:`dpo_tutorial.paper_eval.run_paper_eval`, then its report."""

    if args.per_caption is not None:
        raise ConfigError("--per-caption is the toy's; for a real model pass --num-prompts")
    if not args.out:
        raise ConfigError("--pretrained needs --out DIR: the folder for images, logs and report.json")
    names = {f.name for f in dataclasses.fields(PaperEvalSettings)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    settings = PaperEvalSettings(**given)
    report = run_paper_eval(settings, args.out, device=args.device, sample_batch=args.sample_batch)
    if args.json:
        print(json.dumps(report))
    else:
        for line in report_lines(report, args.out):
            print(line)
    return 0


def print_toy_evaluation(lora_dir: str, per_caption: int = 40, num_draws: int = 8, as_json: bool = False,
                         progress: bool = False) -> None:
    """Evaluate a toy LoRA (:func:`dpo_tutorial.toy.evaluation.evaluate_toy`) and print a table or one JSON line.

    The JSON object holds the numbers over all captions, and the same numbers for the captions the
    training pairs show (``"seen"``) and for those they never show (``"unseen"``). ``progress``: progress
    bars on stderr while it samples and scores.
    """

    result, _ = evaluate_toy(lora_dir, per_caption=per_caption, num_draws=num_draws, progress=progress)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    for line in toy_evaluation_table(result):
        print(line)


def toy_evaluation_table(result) -> list[str]:
    """The lines of ``dpo-tutorial evaluate``'s table: one column per caption group, then all captions."""

    columns = {"seen captions,": result.seen, "unseen captions": result.unseen, "all captions": result}

    def row(name: str, cell) -> str:
        return f"{name:<26}" + "".join(f"{cell(r):<20}" for r in columns.values()).rstrip()

    return [f"{'':<26}" + "".join(f"{head:<20}" for head in columns).rstrip(), f"{'':<26}new seeds",
            row("images per model", lambda r: str(r.n)),
            row("judge accuracy  base", lambda r: f"{r.base_accuracy:.3f}"),
            row("judge accuracy  DPO",
                lambda r: f"{r.dpo_accuracy:.3f} ({100 * (r.dpo_accuracy - r.base_accuracy):+.1f})"),
            row("win-rate DPO over base", lambda r: f"{r.win_rate:.3f}"),
            row("  95% CI (ties count 1/2)", lambda r: f"[{r.win_rate_ci_low:.3f}, {r.win_rate_ci_high:.3f}]"),
            row("implicit-reward acc.", lambda r: f"{r.implicit_acc:.3f}"),
            row("  held-out test pairs", lambda r: str(r.implicit_pairs)),
            f"unseen captions (no training or validation pair shows them): {', '.join(UNSEEN_CAPTIONS)}"]


def run_toy(args: argparse.Namespace) -> int:
    """``dpo-tutorial toy pretrain|pairs ...``: the scripts that made the shipped assets."""
    {"pretrain": pretrain.main, "pairs": pairs.main}[args.step](args.args)
    return 0


def run_figures(args: argparse.Namespace) -> int:
    """``dpo-tutorial figures``: write the figures and list them."""
    for name in make_figures(args.out):
        print(f"wrote {args.out}/{name}")
    return 0


COMMANDS = {"train": run_train, "cache": run_cache, "evaluate": run_evaluate, "toy": run_toy, "figures": run_figures}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dpo-tutorial`` console script; user errors print one line and exit 2.

    A run stopped by repeated non-finite steps (``FloatingPointError``) also ends in one line, exit 1; under
    several processes every process stops, and only the first one prints it.
    """
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(chosen_preset(argv)).parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UserError, FileNotFoundError) as err:
        print(f"dpo-tutorial {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        if is_first_process():
            print(f"dpo-tutorial {args.command}: stopped: {one_line(err)}", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    """An error's message on one line (a message from a library may span several)."""
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
