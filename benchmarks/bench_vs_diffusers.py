"""Per-step time of ``dpo-tutorial train`` against the real diffusers ``train_diffusion_dpo.py``, whole processes.

The diffusers script is not part of this repository: fetch it yourself, e.g.

    git clone --depth 1 https://github.com/huggingface/diffusers /tmp/diffusers
    python benchmarks/bench_vs_diffusers.py --script /tmp/diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py

Both programs run on the same local pipeline, the same local Pick-a-Pic-format parquet, the same batch,
resolution, learning rate, beta, LoRA rank, seed and thread count, each as its own process, twice: once
for LOW and once for HIGH optimizer steps (``--steps``; defaults per work below). Per-step time =
(wall(HIGH) − wall(LOW)) / (HIGH − LOW), so imports, model loading and the final export cancel; so does the
project's latent-cache build when both runs draw enough pairs to build it (the defaults), which is why the
whole-process walls at HIGH steps are printed as well: there the build is charged in full. Peak RSS is
the process's maximum resident set (``wait4``). ``--compile`` adds a third program, the project with its
opt-in ``--compile-unet``, after one untimed run that fills the Inductor cache (a cold compile, 1.5–2 min
on 2 cores, would otherwise land in whichever run comes first).

Two stand-ins make the script run offline on a CPU-only machine, written to a temporary folder:
``torchvision.transforms`` (the script's one torchvision import: Compose, Resize, CenterCrop, RandomCrop,
RandomHorizontalFlip, ToTensor, Normalize, Lambda — done with PIL and torch; PyPI's torchvision does not
pair with the CPU torch), and an empty ``wandb`` (imported at the top, used only when reporting to W&B).
A launcher beside that folder imports transformers, peft and diffusers first (so their "is torchvision
installed?" checks still say no), then puts the folder on ``sys.path`` and runs the script unchanged as
``__main__``. The script's default tracker (tensorboard) is not installed here; accelerate drops it.

Works (``--work``):
  ``48px``: a random 48-px v-prediction SD pipeline (``dpo_tutorial.testing.fixtures``), 256 clean pairs, batch 16,
           1 thread, lr 1e-5, beta 5000 (the script's beta_dpo 2500), no flips; steps 20 and 180;
  ``toy``:   the shipped toy pipeline and pairs with the toy preset's settings mapped onto the script's flags
           (batch 32, lr 5e-3 cosine with 50 warm-up steps, beta 250, rank 8, flips), 2 threads; steps 200
           and 700 (the preset's whole run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TORCHVISION_STANDIN = '''"""A stand-in for the torchvision.transforms the diffusers DPO script uses, built on PIL and torch."""
import random
from enum import Enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(Enum):
    BILINEAR = Image.BILINEAR
    BICUBIC = Image.BICUBIC
    NEAREST = Image.NEAREST


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class Resize:
    """Shorter side to ``size``, aspect kept (torchvision's rule for an int size)."""
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        w, h = img.size
        if w <= h:
            new = (self.size, int(self.size * h / w))
        else:
            new = (int(self.size * w / h), self.size)
        return img.resize(new, self.interpolation.value)


def _crop(img, top, left, size):
    return img.crop((left, top, left + size, top + size))


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        return _crop(img, int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0)), self.size)


class RandomCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        return _crop(img, random.randint(0, h - self.size), random.randint(0, w - self.size), self.size)


class RandomHorizontalFlip:
    def __call__(self, img):
        return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1).item() < 0.5 else img


class ToTensor:
    def __call__(self, img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean[0], std[0]

    def __call__(self, x):
        return (x - self.mean) / self.std
'''

WORKS = {
    "48px": dict(resolution=48, batch_size=16, threads=1, lr=1e-5, beta=5000.0, rank=8, scheduler="constant",
                 warmup=0, flip=False, pairs=256, steps=(20, 180)),
    "toy": dict(resolution=32, batch_size=32, threads=2, lr=5e-3, beta=250.0, rank=8, scheduler="cosine",
                warmup=50, flip=True, pairs=None, steps=(200, 700)),
}
# default step counts: both above the point where the project's latent cache pays (256 pairs unflipped at
# 48 px: 16 steps; 2,500 toy pairs x 2 flips / 32 a batch: 157 steps), so both of its runs build it, and
# HIGH is the toy preset's whole run; the whole-process walls at HIGH are printed too, cache build included
PROGRAMS = ("script", "project", "compile")


LAUNCHER = '''"""Run the diffusers DPO script (argv[1]) with the stand-ins of this folder (benchmarks/bench_vs_diffusers.py)."""
import runpy
import sys
from pathlib import Path

import diffusers  # noqa: F401  the libraries decide once, at import, whether torchvision is installed:
import peft  # noqa: F401       import them before the stand-in exists, so they keep saying no
import transformers  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent / "standins"))
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def write_standins(folder: Path) -> Path:
    """``folder/torchvision/transforms.py``, ``folder/wandb/__init__.py`` and, beside ``folder``, the launcher
    (see the module doc); returns the launcher's path. ``folder`` must be named ``standins``."""
    (folder / "torchvision").mkdir(parents=True, exist_ok=True)
    (folder / "torchvision" / "__init__.py").write_text('"""Stand-in package (benchmarks/bench_vs_diffusers.py)."""\n')
    (folder / "torchvision" / "transforms.py").write_text(TORCHVISION_STANDIN)
    (folder / "wandb").mkdir(exist_ok=True)
    (folder / "wandb" / "__init__.py").write_text('"""Empty stand-in: the script imports wandb but only uses it '
                                                  'when reporting to W&B."""\n')
    launcher = folder.parent / "run_diffusers_script.py"  # beside the folder: python puts a script's own
    launcher.write_text(LAUNCHER)  # folder first on sys.path, which would show the stand-in too early
    return launcher


def make_work(name: str, folder: Path) -> tuple[str, str]:
    """(pipeline folder, dataset folder holding ``train.parquet``) for a work."""
    import numpy as np

    from dpo_tutorial import toy
    from dpo_tutorial.pickapic import encode_image, pickapic_row, write_pickapic_parquet

    if name == "toy":
        return str(toy.PIPELINE_DIR), str(toy.PAIRS_DIR)
    from dpo_tutorial.testing.fixtures import build_tiny_pipeline

    spec = WORKS[name]
    pipeline = build_tiny_pipeline(folder / "pipeline", prediction_type="v_prediction", resolution=spec["resolution"],
                                   latent_factor=4)  # 12x12 latents, as the toy has 8x8 at 32 px
    rng = np.random.default_rng(0)
    rows = []
    for i in range(spec["pairs"]):  # clean pairs: two random images, a caption, label 1 or 0 (no ties)
        img0, img1 = rng.integers(0, 256, size=(2, spec["resolution"], spec["resolution"], 3), dtype=np.uint8)
        rows.append(pickapic_row(f"a {['red', 'green', 'blue'][i % 3]} square", encode_image(img0),
                                 encode_image(img1), float(i % 2), ranking_id=i))
    write_pickapic_parquet(folder / "data" / "train.parquet", rows)
    return str(pipeline), str(folder / "data")


def script_command(launcher: Path, script: str, pipeline: str, dataset: str, spec: dict, steps: int,
                   out: Path) -> list[str]:
    """The diffusers script's command line for ``spec`` (its flags, its defaults otherwise)."""
    cmd = [sys.executable, str(launcher), script, "--pretrained_model_name_or_path", pipeline, "--dataset_name", dataset,
           "--output_dir", str(out), "--resolution", str(spec["resolution"]), "--train_batch_size",
           str(spec["batch_size"]), "--max_train_steps", str(steps), "--learning_rate", str(spec["lr"]),
           "--beta_dpo", str(int(spec["beta"] / 2)), "--rank", str(spec["rank"]), "--lr_scheduler", spec["scheduler"],
           "--lr_warmup_steps", str(spec["warmup"]), "--seed", "0", "--checkpointing_steps", "1000000",
           "--dataloader_num_workers", "0", "--report_to", "tensorboard", "--dataset_split_name", "train"]
    return cmd + ([] if spec["flip"] else ["--no_hflip"])


def project_command(pipeline: str, dataset: str, spec: dict, steps: int, out: Path, compile_unet: bool = False
                    ) -> list[str]:
    """``dpo-tutorial train`` with its defaults plus the settings both programs share (and ``--compile-unet``,
    the opt-in ``torch.compile`` of the UNet, when ``compile_unet``)."""
    cmd = [sys.executable, "-m", "dpo_tutorial.cli", "train", "--preset", "toy", "--pretrained", pipeline,
           "--dataset", dataset, "--output-dir", str(out), "--resolution", str(spec["resolution"]),
           "--batch-size", str(spec["batch_size"]), "--max-steps", str(steps), "--lr", str(spec["lr"]),
           "--beta", str(spec["beta"]), "--rank", str(spec["rank"]), "--lr-scheduler", spec["scheduler"],
           "--lr-warmup-steps", str(spec["warmup"]), "--seed", "0", "--checkpoint-every", "0",
           "--heldout-split", "", "--no-sample-grid", "--num-threads", str(spec["threads"])]
    return cmd + ([] if spec["flip"] else ["--no-random-flip"]) + (["--compile-unet"] if compile_unet else [])


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one process; its output goes to ``log``; a failure raises with its tail."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(log.parent))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[1]} failed (see {log}):\n{log.read_text()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    """Run both programs at two step counts per work and print per-step seconds, the ratio and peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="", help="path to diffusers' examples/research_projects/"
                                                        "diffusion_dpo/train_diffusion_dpo.py")
    parser.add_argument("--work", nargs="+", default=list(WORKS), choices=list(WORKS))
    parser.add_argument("--steps", nargs=2, type=int, default=None, metavar=("LOW", "HIGH"),
                        help="step counts of the two runs (default per work: 48px 20 180, toy 200 700)")
    parser.add_argument("--compile", action="store_true", help="also run the project with --compile-unet "
                        "(torch.compile; needs a C++ compiler on CPU; its compile time cancels in the difference)")
    parser.add_argument("--repeats", type=int, default=1, help="run each (program, steps) this many times, keep the min")
    parser.add_argument("--out", default=None, help="keep logs and runs here (default: a temporary folder)")
    parser.add_argument("--make-work", nargs=2, metavar=("WORK", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_work:  # the child that builds a work's pipeline and data
        print(json.dumps(make_work(args.make_work[0], Path(args.make_work[1]))))
        return
    if not Path(args.script).is_file():
        raise SystemExit(f"--script {args.script!r} is not a file: fetch diffusers and pass "
                         "examples/research_projects/diffusion_dpo/train_diffusion_dpo.py")
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-vs-diffusers-"))
    launcher = write_standins(root / "standins")
    programs = PROGRAMS if args.compile else PROGRAMS[:2]
    results = []
    for name in args.work:
        spec = WORKS[name]
        low, high = sorted(args.steps or spec["steps"])
        # built in a child process, so this parent stays small: a child's peak RSS starts from its parent's
        made = subprocess.run([sys.executable, __file__, "--make-work", name, str(root / name)], check=True,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        pipeline, dataset = json.loads(made.stdout.strip().splitlines()[-1])
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TQDM_MININTERVAL": "5",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        walls: dict[tuple[str, int], float] = {}
        rss: dict[str, float] = {}
        if "compile" in programs:  # an untimed first run fills the Inductor cache, so no timed run pays the cold compile
            out = root / name / "compile-warmup"
            out.mkdir(parents=True, exist_ok=True)
            wall, _ = timed(project_command(pipeline, dataset, spec, low, out / "run", True), env, out / "log.txt")
            print(f"  {name} compile {low:4d} steps: {wall:7.1f} s (warm-up: fills the compile cache, not counted)",
                  flush=True)
        for rep in range(args.repeats):
            for steps in (low, high):
                for program in programs:  # interleaved, so drift in machine speed hits all
                    out = root / name / f"{program}-{steps}-{rep}"
                    out.mkdir(parents=True, exist_ok=True)
                    cmd = (script_command(launcher, args.script, pipeline, dataset, spec, steps, out / "run") if program == "script"
                           else project_command(pipeline, dataset, spec, steps, out / "run", program == "compile"))
                    wall, peak = timed(cmd, env, out / "log.txt")
                    walls[program, steps] = min(wall, walls.get((program, steps), float("inf")))
                    rss[program] = max(peak, rss.get(program, 0.0))
                    print(f"  {name} {program:7s} {steps:4d} steps: {wall:7.1f} s, peak RSS {peak:6.0f} MiB", flush=True)
        per_step = {p: (walls[p, high] - walls[p, low]) / (high - low) for p in programs}
        stages = root / name / "stages.json"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--pretrained", pipeline,
                        "--dataset", dataset, "--resolution", str(spec["resolution"]), "--batch-size",
                        str(spec["batch_size"]), "--json", str(stages), *(["--random-flip"] if spec["flip"] else [])],
                       env=env, check=True, capture_output=True)
        ms = json.loads(stages.read_text())
        unet_s = (ms["policy forward + backward"] + ms["reference forward"]) / 1000
        results.append(dict(work=name, threads=spec["threads"], low=low, high=high, script_s_per_step=per_step["script"],
                            project_s_per_step=per_step["project"], ratio=per_step["script"] / per_step["project"],
                            script_rss_mib=rss["script"], project_rss_mib=rss["project"], unet_s=unet_s,
                            script_overhead=per_step["script"] / unet_s - 1,
                            project_overhead=per_step["project"] / unet_s - 1, stages_ms=ms,
                            walls_at_high={p: walls[p, high] for p in programs},
                            compile_s_per_step=per_step.get("compile"), compile_rss_mib=rss.get("compile")))
    print_tables(results)
    for r in results:
        print(f"\nstages of one step, {r['work']} (ms, each timed alone):")
        for stage, value in r["stages_ms"].items():
            print(f"  {stage:45s} {value:8.2f}")
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nlogs and results.json in {root}")


def print_tables(results: list[dict]) -> None:
    """The per-step table, the whole-process walls at HIGH steps and, when measured, the compiled UNet's row."""
    print(textwrap.dedent("""
        per-step seconds = (wall at HIGH steps - wall at LOW) / (HIGH - LOW); ratio = script / project (> 1: project faster)
        overhead = per-step time / (policy fwd+bwd + reference fwd, timed alone by profile_step.py) - 1
        | work | threads | steps | diffusers script s/step | dpo-tutorial train s/step | ratio | overhead script / project | peak RSS script / project (MiB) |
        |---|---|---|---|---|---|---|---|"""))
    for r in results:
        print(f"| {r['work']} | {r['threads']} | {r['low']}, {r['high']} | {r['script_s_per_step']:.4f} | "
              f"{r['project_s_per_step']:.4f} | {r['ratio']:.2f}x | {r['script_overhead']:+.0%} / "
              f"{r['project_overhead']:+.0%} | {r['script_rss_mib']:.0f} / {r['project_rss_mib']:.0f} |")
    print("\nwhole processes at HIGH steps (start-up, cache build and export included):")
    for r in results:
        walls = r["walls_at_high"]
        print(f"  {r['work']}, {r['high']} steps: " + ", ".join(
            f"{p} {w:.1f} s ({walls['script'] / w:.2f}x)" for p, w in walls.items()))
    for r in results:
        if r["compile_s_per_step"]:
            print(f"  {r['work']} with --compile-unet: {r['compile_s_per_step']:.4f} s/step, "
                  f"{r['script_s_per_step'] / r['compile_s_per_step']:.2f}x the script, peak RSS {r['compile_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
