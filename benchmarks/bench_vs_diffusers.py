"""Per-step time of ``dpo-tutorial train`` against the real diffusers ``train_diffusion_dpo.py``, on the same work.

The diffusers script is not part of this repository: fetch it yourself, e.g.

    git clone --depth 1 https://github.com/huggingface/diffusers /tmp/diffusers
    python benchmarks/bench_vs_diffusers.py --script /tmp/diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py

On the CPU works, both programs run on the same local pipeline, the same local Pick-a-Pic-format parquet, the
same batch, resolution, learning rate, beta, LoRA rank, seed and thread count, each as its own process, twice: once
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

Works (``--work``; the default runs the two CPU works):
  ``48px``: a random 48-px v-prediction SD pipeline (``dpo_tutorial.testing.fixtures``), 256 clean pairs, batch 16,
           1 thread, lr 1e-5, beta 5000 (the script's beta_dpo 2500), no flips; steps 20 and 180;
  ``toy``:   the shipped toy pipeline and pairs with the toy preset's settings mapped onto the script's flags
           (batch 32, lr 5e-3 cosine with 50 warm-up steps, beta 250, rank 8, flips), 2 threads; steps 200
           and 700 (the preset's whole run);
  ``sd15-gpu``: the GPU peer (run it where CUDA is). An SD 1.5-shaped pipeline with random weights (UNet 860M,
           ``gpu_check.build_sd15_shaped``) and a parquet of 512-px Pick-a-Pic-format JPEG pairs, batch 8 pairs,
           grad-accum 1, lr 1e-5, beta 5000 (the script's beta_dpo 2500), rank 8, flips, no gradient
           checkpointing, once in fp16 and once in bf16 (``--precisions``); ``dpo-tutorial train --preset sd15``
           with those settings against the script. Each pair is drawn once (``--pairs`` to change), as on
           Pick-a-Pic's million pairs, so both programs read and encode images every step.

The ``sd15-gpu`` work times steps by each program's own step log instead of whole-process differences
(start-up on a GPU machine varies by more than a few dozen steps take): one run per program and
precision of ``--warmup-steps`` + ``--steps`` optimizer steps, then the median of the steps after the
warm-up. The script's log is its "Steps" progress bar: the launcher records the time of each of its
updates (one per optimizer step, after the step's work was queued; the script's ``loss.item()`` right
after makes each interval one full step). The project's log is ``history.jsonl``, whose ``seconds`` is the
time since its loop began, taken after the step's finite-gradient check (a device sync), so consecutive
differences are step times; the same launcher times its "Diffusion-DPO" bar as a cross-check. Each
process records its peak ``torch.cuda.max_memory_allocated()`` at exit. MFU = FLOPs of one step
(``torch.utils.flop_counter.FlopCounterMode`` over one project step on the same pipeline and batch: the
UNet passes, plus the VAE encoder and text encoder when the program encoded images that step) ÷ median
step time ÷ the card's dense bf16 peak (``bench_gpu.PEAK_BF16_TFLOPS``: 989 TFLOP/s for an H100/H200 SXM,
or ``--peak-tflops``). ``--tiny`` shrinks the work to a 64-px pipeline (``gpu_check.build_sd15_shaped(tiny=
True)``), 2 pairs a step and 2 + 4 steps, so the same code runs on a CPU in a few minutes; on a CPU the
script uses the PIL stand-in for torchvision, where CUDA is it uses the real one.

    python benchmarks/bench_vs_diffusers.py --script .../train_diffusion_dpo.py --work sd15-gpu      # on a GPU
    python benchmarks/bench_vs_diffusers.py --script .../train_diffusion_dpo.py --work sd15-gpu --tiny
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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

TIMED_LAUNCHER = '''"""Run a training program, recording its step times and peak GPU memory (bench_vs_diffusers.py).

    python run_timed.py SCRIPT.py ARGS...     # a script, run as __main__ (the diffusers DPO script)
    python run_timed.py -m MODULE ARGS...     # a module, run as __main__ (dpo_tutorial.cli)

Environment: BENCH_STEP_LOG, a JSON-lines file that gets {"bar": n, "t": seconds} each time the progress bar
described BENCH_STEP_BAR advances (tqdm's update() or its iterator), then {"peak_gib": ...} at exit;
BENCH_STANDINS, a folder whose torchvision-pil/ and wandb-empty/ go on the path only when the real package
does not import.
"""
import atexit
import json
import os
import runpy
import sys
import time

LOG = open(os.environ["BENCH_STEP_LOG"], "a", buffering=1)
BAR = os.environ.get("BENCH_STEP_BAR", "Steps")
STANDINS = os.environ.get("BENCH_STANDINS", "")


def note(**record):
    LOG.write(json.dumps(record) + "\\n")


def real_or_standin(module, standin):
    try:
        __import__(module)
        return "real"
    except ImportError:
        return standin


found = {"torchvision": real_or_standin("torchvision.transforms", "torchvision-pil"),
         "wandb": real_or_standin("wandb", "wandb-empty")}
import diffusers  # noqa: E402,F401  the libraries decide once, at import, whether torchvision is installed:
import peft  # noqa: E402,F401       import them before a stand-in is on the path, so they keep saying no
import transformers  # noqa: E402,F401

for where in found.values():
    if where != "real":
        sys.path.insert(0, os.path.join(STANDINS, where))
note(**found)

import tqdm.auto  # noqa: E402


class TimedBar(tqdm.auto.tqdm):
    """The programs' own progress bar, with the time of each step it counts written to the log."""

    def __init__(self, *args, **kwargs):
        self.timed = kwargs.get("desc") == BAR
        self.counted = 0
        super().__init__(*args, **kwargs)

    def update(self, n=1):
        shown = super().update(n)
        if self.timed:
            self.counted += n
            note(bar=self.counted, t=time.perf_counter())
        return shown

    def __iter__(self):
        for item in super().__iter__():
            yield item  # the loop body (one step) runs here
            if self.timed:
                self.counted += 1
                note(bar=self.counted, t=time.perf_counter())


tqdm.auto.tqdm = TimedBar


@atexit.register
def peak():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        note(peak_gib=torch.cuda.max_memory_allocated() / 2**30, device=torch.cuda.get_device_name())
    LOG.close()


if sys.argv[1] == "-m":
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
'''


def write_standin_packages(torchvision_dir: Path, wandb_dir: Path) -> None:
    """``torchvision_dir/torchvision/transforms.py`` (the PIL stand-in) and ``wandb_dir/wandb/__init__.py`` (empty)."""
    (torchvision_dir / "torchvision").mkdir(parents=True, exist_ok=True)
    (torchvision_dir / "torchvision" / "__init__.py").write_text(
        '"""Stand-in package (benchmarks/bench_vs_diffusers.py)."""\n')
    (torchvision_dir / "torchvision" / "transforms.py").write_text(TORCHVISION_STANDIN)
    (wandb_dir / "wandb").mkdir(parents=True, exist_ok=True)
    (wandb_dir / "wandb" / "__init__.py").write_text('"""Empty stand-in: the script imports wandb but only uses it '
                                                     'when reporting to W&B."""\n')


def write_standins(folder: Path) -> Path:
    """``folder/torchvision/transforms.py``, ``folder/wandb/__init__.py`` and, beside ``folder``, the launcher
    (see the module doc); returns the launcher's path. ``folder`` must be named ``standins``."""
    write_standin_packages(folder, folder)
    launcher = folder.parent / "run_diffusers_script.py"  # beside the folder: python puts a script's own
    launcher.write_text(LAUNCHER)  # folder first on sys.path, which would show the stand-in too early
    return launcher


def write_timed_launcher(folder: Path) -> Path:
    """``folder/run_timed.py`` and its stand-ins in ``folder/torchvision-pil`` and ``folder/wandb-empty`` (each
    put on the path only when the real package is missing); returns the launcher's path."""
    write_standin_packages(folder / "torchvision-pil", folder / "wandb-empty")
    launcher = folder / "run_timed.py"
    launcher.write_text(TIMED_LAUNCHER)
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


def timed_run(cmd: list[str], env: dict, log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit code) of one process; its output goes to ``log``."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(log.parent))
        _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one process; its output goes to ``log``; a failure raises with its tail."""
    wall, rss, code = timed_run(cmd, env, log)
    if code != 0:
        raise SystemExit(f"{cmd[1]} failed (see {log}):\n{log.read_text()[-2000:]}")
    return wall, rss


# ------------------------------------------------------------ the GPU peer: steps timed by each program's own log
LOG_WORKS = {
    "sd15-gpu": dict(resolution=512, batch_size=8, lr=1e-5, beta=5000.0, rank=8, warmup_steps=10, timed_steps=30),
}
TINY_WORK = dict(resolution=64, batch_size=2, warmup_steps=2, timed_steps=4)  # --tiny: the same code on a CPU


def log_work_spec(name: str, tiny: bool, warmup_steps: int | None = None, timed_steps: int | None = None) -> dict:
    """A log-timed work's settings (``--tiny`` shrinks them), with the step counts given on the command line."""
    spec = {**LOG_WORKS[name], **(TINY_WORK if tiny else {})}
    if warmup_steps is not None:
        spec["warmup_steps"] = warmup_steps
    if timed_steps is not None:
        spec["timed_steps"] = timed_steps
    spec["max_steps"] = spec["warmup_steps"] + spec["timed_steps"]
    return spec


def step_flops(pipeline: str, dataset: str, resolution: int, batch_size: int) -> dict:
    """FLOPs of one ``dpo-tutorial train`` step on this work, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matmuls, convolutions and attention, forward and backward, as executed): ``unet`` (policy forward and
    backward with the LoRA on, reference forward with it off) and ``encoders`` (the VAE encoder on the ``2B``
    images and the text encoder on the ``B`` captions: work a step does only when it reads images), and the
    ``device`` it was counted on (CUDA in bf16 when there is one; the count does not depend on the type)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dpo_tutorial.data import PairStream, PairTransform, load_pickapic
    from dpo_tutorial.models import add_lora, load_parts
    from dpo_tutorial.step import dpo_step, encode_batch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    parts = load_parts(pipeline).to(device, dtype)
    add_lora(parts.unet, rank=8, init_seed=0)  # fp32, as train adds it
    stream = PairStream(load_pickapic(dataset, "train"), PairTransform(resolution, False, True), batch_size, seed=0)
    batch = next(iter(stream))
    with FlopCounterMode(display=False) as encoders:
        encoded = encode_batch(parts, batch, dtype=dtype, device=device)  # (2B, 4, h, w) latents, (2B, L, D) text
    b = batch_size
    as_cached = {"latent_mean": encoded.latents / parts.vae.config.scaling_factor,  # the same latents, as a
                 "latent_std": torch.zeros_like(encoded.latents),                    # latent-cache batch holds them
                 "prompt_embeds": encoded.prompt_embeds[:b], "time_ids": torch.zeros(2 * b, 6, device=device)}
    with torch.autocast(device.type, dtype=dtype, enabled=cuda), FlopCounterMode(display=False) as unet:
        dpo_step(parts, parts.unet, as_cached, beta=5000.0).loss.backward()
    return {"unet_flops": float(unet.get_total_flops()), "encoder_flops": float(encoders.get_total_flops()),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def make_log_work(name: str, folder: Path, tiny: bool, pairs: int) -> dict:
    """Build (or reuse, when ``folder/work.json`` says it was built with these settings) the pipeline, the parquet of
    ``pairs`` pairs and the FLOP count of a log-timed work; return ``work.json``'s contents."""
    spec = log_work_spec(name, tiny)
    want = {"work": name, "tiny": tiny, "pairs": pairs}
    meta = folder / "work.json"
    if meta.exists():
        made = json.loads(meta.read_text())
        if all(made.get(k) == v for k, v in want.items()):
            return made
    from bench_data_wait import write_pairs
    from gpu_check import build_sd15_shaped

    start = time.perf_counter()
    pipeline = build_sd15_shaped(folder / "pipeline", tiny=tiny)
    write_pairs(folder / "data" / "train.parquet", n_pairs=pairs, size=spec["resolution"], seed=0)
    made = {**want, "pipeline": str(pipeline), "dataset": str(folder / "data"),
            **step_flops(str(pipeline), str(folder / "data"), spec["resolution"], spec["batch_size"])}
    made["build_seconds"] = round(time.perf_counter() - start, 1)
    meta.write_text(json.dumps(made, indent=1))
    return made


def log_script_command(launcher: Path, script: str, work: dict, spec: dict, precision: str, out: Path,
                       workers: int) -> list[str]:
    """The diffusers script on a log-timed work (its defaults otherwise: hflip on, centre crop, no checkpointing)."""
    return [sys.executable, str(launcher), script, "--pretrained_model_name_or_path", work["pipeline"],
            "--dataset_name", work["dataset"], "--dataset_split_name", "train", "--output_dir", str(out),
            "--resolution", str(spec["resolution"]), "--train_batch_size", str(spec["batch_size"]),
            "--gradient_accumulation_steps", "1", "--max_train_steps", str(spec["max_steps"]),
            "--learning_rate", str(spec["lr"]), "--beta_dpo", str(int(spec["beta"] / 2)), "--rank", str(spec["rank"]),
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0", "--checkpointing_steps", "1000000",
            "--dataloader_num_workers", str(workers), "--report_to", "tensorboard", "--mixed_precision", precision]


def log_project_command(launcher: Path, work: dict, spec: dict, precision: str, out: Path) -> list[str]:
    """``dpo-tutorial train --preset sd15`` on a log-timed work: the same batch, steps and objective as the script."""
    return [sys.executable, str(launcher), "-m", "dpo_tutorial.cli", "train", "--preset", "sd15",
            "--pretrained", work["pipeline"], "--dataset", work["dataset"], "--no-streaming", "--split", "train",
            "--output-dir", str(out), "--resolution", str(spec["resolution"]), "--batch-size", str(spec["batch_size"]),
            "--grad-accum", "1", "--max-steps", str(spec["max_steps"]), "--lr", str(spec["lr"]),
            "--beta", str(spec["beta"]), "--rank", str(spec["rank"]), "--lr-scheduler", "constant",
            "--lr-warmup-steps", "0", "--seed", "0", "--checkpoint-every", "0", "--heldout-split", "",
            "--no-sample-grid", "--mixed-precision", precision, "--no-gradient-checkpointing"]


def step_seconds(ends: list[float], warmup_steps: int) -> list[float]:
    """Durations of the steps after the first ``warmup_steps`` from the times their steps ended (step 1's start
    is not logged, so its duration never counts): ``ends[k] - ends[k - 1]`` for steps ``k + 1 > warmup_steps``."""
    first = max(warmup_steps, 1)  # index of the first step counted (0-based), which needs the end before it
    return [ends[k] - ends[k - 1] for k in range(first, len(ends))]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (a torn last line, from a killed process, is dropped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def summarise_steps(seconds: list[float]) -> dict:
    """Median, 10th and 90th percentile and count of per-step seconds (NaN when there are none)."""
    import numpy as np

    if not seconds:
        return {"median_s": float("nan"), "p10_s": float("nan"), "p90_s": float("nan"), "steps_timed": 0}
    return {"median_s": float(np.median(seconds)), "p10_s": float(np.percentile(seconds, 10)),
            "p90_s": float(np.percentile(seconds, 90)), "steps_timed": len(seconds)}


def run_logged(program: str, precision: str, work: dict, spec: dict, args, root: Path, launcher: Path,
               env: dict) -> dict:
    """Run one program once on a log-timed work; return its row: step times from its own log, peak memory, wall."""
    from dpo_tutorial.cache import AUTO_CACHE_DIR

    out = root / f"{program}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out / "steps.jsonl"
    env = {**env, "BENCH_STEP_LOG": str(log), "BENCH_STEP_BAR": "Steps" if program == "script" else "Diffusion-DPO",
           "BENCH_STANDINS": str(launcher.parent)}
    cmd = (log_script_command(launcher, args.script, work, spec, precision, out / "run", args.script_workers)
           if program == "script" else log_project_command(launcher, work, spec, precision, out / "run"))
    wall, rss, code = timed_run(cmd, env, out / "log.txt")
    records = read_jsonl(log)
    bar_ends = [r["t"] for r in records if "bar" in r]
    row = {"program": program, "precision": precision, "exit_code": code, "wall_s": wall, "peak_rss_mib": rss,
           "peak_gpu_gib": next((r["peak_gib"] for r in records if "peak_gib" in r), None),
           "torchvision": next((r["torchvision"] for r in records if "torchvision" in r), None),
           "steps_logged": len(bar_ends), "log": str(out / "log.txt")}
    if program == "script":
        row.update(summarise_steps(step_seconds(bar_ends, spec["warmup_steps"])))
        row["reads"] = "images"
    else:
        history = read_jsonl(out / "run" / "history.jsonl")
        row.update(summarise_steps(step_seconds([r["seconds"] for r in history], spec["warmup_steps"])))
        row["steps_logged"] = len(history)
        row["bar_median_s"] = summarise_steps(step_seconds(bar_ends, spec["warmup_steps"]))["median_s"]
        waits = [r["data_seconds"] for r in history[max(spec["warmup_steps"], 1):]]
        row["data_wait_median_s"] = summarise_steps(waits)["median_s"] if waits else float("nan")
        row["reads"] = "latent cache" if (out / "run" / AUTO_CACHE_DIR).exists() else "images"
    flops = work["unet_flops"] + (work["encoder_flops"] if row["reads"] == "images" else 0.0)
    row["tflop_per_step"] = flops / 1e12
    row["mfu"] = flops / row["median_s"] / (args.peak_tflops * 1e12) if row["steps_timed"] else float("nan")
    if code != 0:
        row["error"] = (out / "log.txt").read_text()[-1500:]
    return row


def run_log_work(name: str, args) -> list[dict]:
    """Build (or reuse) the work, then run script and project once per precision, interleaved, each timed by its own
    step log; print each row as it comes and the table at the end; write ``results.json`` after every run."""
    from bench_gpu import PEAK_BF16_TFLOPS

    root = Path(args.out or tempfile.mkdtemp(prefix="bench-vs-diffusers-")) / name
    root.mkdir(parents=True, exist_ok=True)
    spec = log_work_spec(name, args.tiny, args.warmup_steps, args.timed_steps)
    pairs = args.pairs or spec["max_steps"] * spec["batch_size"]  # each pair drawn once: no latent cache pays
    folder = Path(args.work_dir) if args.work_dir else root / "work"
    made = subprocess.run([sys.executable, __file__, "--make-log-work", name, str(folder), str(pairs),
                           *(["--tiny"] if args.tiny else [])], env=child_env(), capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(f"building the {name} work failed:\n{made.stdout[-1000:]}{made.stderr[-3000:]}")
    work = json.loads(made.stdout.strip().splitlines()[-1])
    if args.peak_tflops is None:
        args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in work["device"]), float("nan"))
    print(f"{name} on {work['device']}: {spec['resolution']} px, batch {spec['batch_size']} pairs, grad-accum 1, no "
          f"gradient checkpointing, {pairs} pairs; {spec['warmup_steps']} warm-up + {spec['timed_steps']} timed steps; "
          f"script dataloader workers {args.script_workers}", flush=True)
    print(f"FLOPs of one step (torch.utils.flop_counter.FlopCounterMode, as executed): UNet passes "
          f"{work['unet_flops'] / 1e12:.4g} TFLOP, VAE encoder + text encoder {work['encoder_flops'] / 1e12:.4g} "
          f"TFLOP; MFU against {args.peak_tflops} TFLOP/s (dense bf16 peak)", flush=True)
    env = {**child_env(), "HF_DATASETS_CACHE": str(root / "hf-datasets-cache"), "TQDM_MININTERVAL": "5"}
    if args.tiny:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    launcher = write_timed_launcher(root / "launcher")
    rows = []
    for precision in args.precisions:
        for program in ("script", "project"):
            row = run_logged(program, precision, work, spec, args, root, launcher, env)
            rows.append(row)
            print("  " + format_log_row(row), flush=True)
            (root / "results.json").write_text(json.dumps({"work": work, "spec": spec, "rows": rows}, indent=1))
    print_log_table(name, rows)
    print(f"\nlogs and results.json in {root}")
    return rows


def format_log_row(row: dict) -> str:
    """One program's result in a line."""
    if row.get("exit_code"):
        return f"{row['precision']} {row['program']}: FAILED (exit {row['exit_code']}, see {row['log']})"
    gpu = "-" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.2f} GiB"
    extra = (f", bar {row['bar_median_s']:.4f} s, data wait {row['data_wait_median_s']:.4f} s"
             if row["program"] == "project" else f", torchvision {row['torchvision']}")
    return (f"{row['precision']} {row['program']}: median {row['median_s']:.4f} s/step over {row['steps_timed']} "
            f"(p10 {row['p10_s']:.4f}, p90 {row['p90_s']:.4f}), peak GPU {gpu}, peak RSS {row['peak_rss_mib']:.0f} "
            f"MiB, MFU {row['mfu']:.1%}, reads {row['reads']}, whole process {row['wall_s']:.1f} s{extra}")


def print_log_table(name: str, rows: list[dict]) -> None:
    """The markdown table of a log-timed work: per precision, both programs and their ratio."""
    print("\n| work | precision | diffusers script s/step | dpo-tutorial train s/step | ratio | "
          "peak GPU GiB script / project | MFU script / project |\n|---|---|---|---|---|---|---|")
    by = {(r["precision"], r["program"]): r for r in rows}
    for precision in dict.fromkeys(r["precision"] for r in rows):
        script, project = by.get((precision, "script")), by.get((precision, "project"))
        if not script or not project or script.get("exit_code") or project.get("exit_code"):
            print(f"| {name} | {precision} | {'FAILED' if not script or script.get('exit_code') else 'ok'} | "
                  f"{'FAILED' if not project or project.get('exit_code') else 'ok'} | - | - | - |")
            continue
        gib = lambda r: "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"  # noqa: E731
        print(f"| {name} | {precision} | {script['median_s']:.4f} | {project['median_s']:.4f} | "
              f"**{script['median_s'] / project['median_s']:.2f}x** | {gib(script)} / {gib(project)} | "
              f"{script['mfu']:.1%} / {project['mfu']:.1%} |")


def child_env() -> dict:
    """The environment of every child: this checkout first on the path, the Hub and W&B off."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])}


def main(argv: list[str] | None = None) -> None:
    """Run both programs at two step counts per work and print per-step seconds, the ratio and peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="", help="path to diffusers' examples/research_projects/"
                                                        "diffusion_dpo/train_diffusion_dpo.py")
    parser.add_argument("--work", nargs="+", default=list(WORKS), choices=[*WORKS, *LOG_WORKS])
    parser.add_argument("--steps", nargs=2, type=int, default=None, metavar=("LOW", "HIGH"),
                        help="step counts of the two runs (default per work: 48px 20 180, toy 200 700)")
    parser.add_argument("--compile", action="store_true", help="also run the project with --compile-unet "
                        "(torch.compile; needs a C++ compiler on CPU; its compile time cancels in the difference)")
    parser.add_argument("--repeats", type=int, default=1, help="run each (program, steps) this many times, keep the min")
    parser.add_argument("--out", default=None, help="keep logs and runs here (default: a temporary folder)")
    log_work = parser.add_argument_group("the GPU peer (--work sd15-gpu): steps timed by each program's own log")
    log_work.add_argument("--tiny", action="store_true", help="a 64-px pipeline, 2 pairs a step, 2 + 4 steps: the "
                          "same code on a CPU in minutes (proves the code path, measures nothing)")
    log_work.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["no", "fp16", "bf16"])
    log_work.add_argument("--warmup-steps", type=int, default=None, help="steps left out of the median (default 10; "
                          "--tiny 2)")
    log_work.add_argument("--timed-steps", type=int, default=None, help="steps timed after them (default 30; --tiny 4)")
    log_work.add_argument("--pairs", type=int, default=None, help="pairs in the parquet (default: one per pair drawn, "
                          "so neither program sees a pair twice)")
    log_work.add_argument("--script-workers", type=int, default=0, help="the script's --dataloader_num_workers "
                          "(default 0, its own default: it decodes in the loop, while the project reads ahead)")
    log_work.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for the MFU (default: "
                          "from the card's name, bench_gpu.PEAK_BF16_TFLOPS)")
    log_work.add_argument("--work-dir", default=None, help="build the pipeline and parquet here, or reuse them when "
                          "its work.json matches (default: inside --out)")
    log_work.add_argument("--build-only", action="store_true", help="build (or reuse) the work in --work-dir, "
                          "print its work.json and stop")
    parser.add_argument("--make-work", nargs=2, metavar=("WORK", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--make-log-work", nargs=3, metavar=("WORK", "DIR", "PAIRS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_work:  # the child that builds a work's pipeline and data
        print(json.dumps(make_work(args.make_work[0], Path(args.make_work[1]))))
        return
    if args.make_log_work:  # the child that builds a log-timed work and counts its FLOPs
        name, folder, pairs = args.make_log_work
        print(json.dumps(make_log_work(name, Path(folder), args.tiny, int(pairs))))
        return
    logged = [w for w in args.work if w in LOG_WORKS]
    if args.build_only:
        for name in logged:
            spec = log_work_spec(name, args.tiny, args.warmup_steps, args.timed_steps)
            folder = Path(args.work_dir or Path(args.out or ".") / name / "work")
            print(json.dumps(make_log_work(name, folder, args.tiny, args.pairs or spec["max_steps"] * spec["batch_size"])))
        return
    if not Path(args.script).is_file():
        raise SystemExit(f"--script {args.script!r} is not a file: fetch diffusers and pass "
                         "examples/research_projects/diffusion_dpo/train_diffusion_dpo.py")
    for name in logged:
        run_log_work(name, args)
    if not [w for w in args.work if w in WORKS]:
        return
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-vs-diffusers-"))
    launcher = write_standins(root / "standins")
    programs = PROGRAMS if args.compile else PROGRAMS[:2]
    results = []
    for name in [w for w in args.work if w in WORKS]:
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
