"""One typed configuration for a Diffusion-DPO run, with named presets and validation.

``TrainConfig`` is the single source of truth: the CLI builds its flags from these fields (the help
text is each field's ``metadata["help"]``), notebooks and tests construct it directly, and
:func:`get_preset` returns the named recipes (``toy`` is the offline default).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .loss import LOSS_TYPES

MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PREDICTION_TYPES = (None, "epsilon", "v_prediction")


def _finite(value) -> bool:
    """True for a finite int or float (NaN and ±inf are not)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _f(default, help: str, **kw):
    """A field with its ``--help`` text; ``none=`` says what a ``None`` default means."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a Diffusion-DPO LoRA (or full) fine-tuning run."""

    # what to train on
    pretrained: str = _f("", "diffusers pipeline folder or hub id (SD 1.x/2.x or SDXL)")
    vae: str | None = _f(None, "optional separate VAE folder or hub id (e.g. the SDXL fp16-fix VAE)",
                           none="the pipeline's")
    dataset: str = _f("", "Pick-a-Pic-format data: hub id, folder of parquet files, or a .parquet file")
    split: str = _f("train", "dataset split to train on")
    streaming: bool = _f(False, "stream the dataset instead of loading it (for the 335 GB Pick-a-Pic v2)")
    max_train_pairs: int | None = _f(None, "use at most this many pairs (after tie removal)",
                                   none="all")
    cache: str | None = _f(None, "train from a latent cache folder made by `dpo-tutorial cache` (same model)",
                             none="no cache")
    cache_latents: bool = _f(True, "when a local dataset is drawn from more often than a cache costs to build, encode "
                                   "it once into <output_dir>/latent-cache and train from latents (same losses, "
                                   "faster steps; off: read and encode the images every step)")
    output_dir: str = _f("runs/dpo", "where the LoRA, history.jsonl and checkpoints go")
    # the DPO objective
    beta: float = _f(5000.0, "the paper's beta (diffusers SD script's beta_dpo is half of it)")
    loss_type: str = _f("sigmoid", f"one of {', '.join(LOSS_TYPES)}")
    # optimisation
    max_steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(1, "preference pairs per process per micro-batch (each pair = 2 images)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    lr: float = _f(1e-5, "learning rate")
    lr_scheduler: str = _f("constant", f"one of {', '.join(LR_SCHEDULERS)}")
    lr_warmup_steps: int = _f(0, "warm-up steps for the lr schedule")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (needs bitsandbytes and a GPU)")
    # what is trained
    rank: int = _f(8, "LoRA rank")
    lora_alpha: int | None = _f(None, "LoRA alpha", none="equal to rank")
    full_finetune: bool = _f(False, "train the whole UNet against a frozen copy (the paper's setting)")
    # images and captions
    resolution: int = _f(512, "training resolution in pixels (multiple of 8)")
    random_crop: bool = _f(False, "random instead of center crop (same window for both images)")
    random_flip: bool = _f(True, "horizontal flip with p=0.5 (same flip for both images)")
    empty_prompt_prob: float = _f(0.0, "probability of replacing a caption by '' (official code: 0.2)")
    prediction_type: str | None = _f(None, "override the scheduler's prediction type (epsilon / v_prediction)",
                                      none="the scheduler's")
    # speed and memory
    mixed_precision: str = _f("no", f"one of {', '.join(MIXED_PRECISIONS)}")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet")
    channels_last: bool = _f(False, "UNet weights and activations in channels-last layout (GPU convs)")
    vae_encode_batch_size: int = _f(8, "images per VAE encoder call (memory: ~0.5 GB each at 512 px in fp32)")
    prefetch: int | None = _f(None, "batches decoded and transformed ahead, in a background thread (0: in the loop)",
                               none="2 on a GPU reading images; 0 on a CPU-only run or from a latent cache, where "
                                    "the thread only takes cores from the compute (toy: 0.19 -> 0.32 s a step)")
    compile_unet: bool = _f(False, "torch.compile the UNet: toy on 2 CPU cores ~2 min to compile once, then "
                                   "~1.3x faster steps (benchmarks/README.md)")
    allow_tf32: bool = _f(False, "TF32 matmuls/convs on Ampere+ GPUs")
    # bookkeeping
    seed: int = _f(0, "random seed (data order, noise, timesteps, LoRA init)")
    checkpoint_every: int = _f(0, "save a resumable checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int | None = _f(None, "keep at most this many checkpoints", none="keep all")
    resume: str | None = _f(None, "'latest' or a checkpoint folder to resume from", none="start fresh")
    report_to: str | None = _f(None, "also log to 'tensorboard' or 'wandb' through accelerate",
                                none="history.jsonl only")
    num_threads: int | None = _f(None, "CPU threads per process for torch",
                                 none="OMP_NUM_THREADS, else cores / processes")
    num_processes: int | None = _f(None, "fail unless the launcher started exactly this many processes",
                                    none="any number")
    max_nonfinite_steps: int = _f(5, "stop after this many non-finite (skipped) updates in a row")
    heldout_split: str | None = _f(None, "at the end, measure the implicit-reward accuracy on this split of the "
                                         "dataset (e.g. validation); '' switches it off. A split the dataset lacks "
                                         "is reported before the first step and skipped", none="off")
    heldout_pairs: int = _f(300, "score at most this many held-out pairs (heldout_split)")
    sample_grid: bool = _f(True, "at the end, write a base-vs-DPO image grid (samples.png)")
    sample_steps: int = _f(25, "denoising steps for the image grid")
    guidance_scale: float = _f(7.5, "classifier-free guidance scale for the image grid")

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` naming the first invalid field; return ``self`` when all is well."""
        checks = [
            (bool(self.pretrained), "pretrained", "a pipeline folder or hub id"),
            (bool(self.dataset), "dataset", "a Pick-a-Pic-format hub id, folder or .parquet file"),
            (self.resolution >= 8 and self.resolution % 8 == 0, "resolution", "a positive multiple of 8"),
            (_finite(self.beta) and self.beta > 0, "beta", "a finite number > 0 (the paper uses 2000-5000)"),
            (self.batch_size >= 1, "batch_size", "an integer >= 1"),
            (self.grad_accum >= 1, "grad_accum", "an integer >= 1"),
            (self.max_steps >= 1, "max_steps", "an integer >= 1"),
            (_finite(self.lr) and self.lr > 0, "lr", "a finite number > 0"),
            (_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0"),
            (_finite(self.guidance_scale), "guidance_scale", "a finite number (e.g. 7.5)"),
            (self.sample_steps >= 1, "sample_steps", "an integer >= 1"),
            (self.rank >= 1, "rank", "an integer >= 1"),
            (self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "a number > 0"),
            (0.0 <= self.empty_prompt_prob <= 1.0, "empty_prompt_prob", "a probability in [0, 1]"),
            (self.loss_type in LOSS_TYPES, "loss_type", f"one of {LOSS_TYPES}"),
            (self.mixed_precision in MIXED_PRECISIONS, "mixed_precision", f"one of {MIXED_PRECISIONS}"),
            (self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"one of {LR_SCHEDULERS}"),
            (self.prediction_type in PREDICTION_TYPES, "prediction_type", "epsilon or v_prediction"),
            (self.lr_warmup_steps >= 0, "lr_warmup_steps", "an integer >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0"),
            (self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             "checkpoints_total_limit", "an integer >= 1"),
            (self.max_train_pairs is None or self.max_train_pairs >= 1, "max_train_pairs", "an integer >= 1"),
            (_finite(self.max_grad_norm) and self.max_grad_norm >= 0, "max_grad_norm", "a finite number >= 0"),
            (self.report_to in (None, "tensorboard", "wandb"), "report_to", "tensorboard or wandb"),
            (self.num_threads is None or self.num_threads >= 1, "num_threads", "an integer >= 1"),
            (self.num_processes is None or self.num_processes >= 1, "num_processes", "an integer >= 1"),
            (self.vae_encode_batch_size >= 1, "vae_encode_batch_size", "an integer >= 1"),
            (self.prefetch is None or self.prefetch >= 0, "prefetch", "an integer >= 0"),
            (self.heldout_pairs >= 1, "heldout_pairs", "an integer >= 1"),
            (self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "an integer >= 1"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"invalid {name}={getattr(self, name)!r}: expected {expected}")
        if self.full_finetune and self.loss_type != "sft" and self.mixed_precision == "fp16":
            raise ConfigError("full_finetune with mixed_precision='fp16' is unsupported: use 'bf16' or 'no'")
        return self

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (unknown names raise :class:`ConfigError`)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict of every field (JSON-serialisable)."""
        return dataclasses.asdict(self)


# The toy world's shipped assets, as paths (the toy package reads them from here, not the reverse).
TOY_ASSETS = Path(__file__).parent / "toy" / "assets"
TOY_PIPELINE_DIR = TOY_ASSETS / "tiny-sd-shapes"
TOY_PAIRS_DIR = TOY_ASSETS / "pickapic-shapes"

PRESETS: dict[str, dict] = {
    # the offline default: tiny SD + toy pairs shipped in the package (see dpo_tutorial/toy)
    "toy": dict(pretrained=str(TOY_PIPELINE_DIR), dataset=str(TOY_PAIRS_DIR), resolution=32, batch_size=32,
                # cosine decay with a 50-step warm-up: every one of 5 seeds passes the toy's bar, where a constant
                # lr left seed 2 worse than the base model (benchmarks/toy_seeds.py)
                max_steps=700, lr=5e-3, lr_scheduler="cosine", lr_warmup_steps=50, beta=250.0, rank=8,
                checkpoint_every=100, checkpoints_total_limit=2, output_dir="runs/toy", heldout_split="validation",
                # how the toy samples (pairs, evaluation, the grid): the pipeline's own DDPM sampler, 25 steps, and
                # no classifier-free guidance, which would amplify the colour the caption names
                sample_steps=25, guidance_scale=1.0,
                # a 32-px image takes 1/256 of a 512-px one's VAE memory: 256 per call weigh what SD 1.5's 8 do
                vae_encode_batch_size=256),
    # SD 1.5 on one Colab GPU. beta 5000: the official launcher's (the paper's SD 1.5 runs used 2000), = the diffusers
    # SD script's beta_dpo 2500.
    "sd15": dict(pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5",
                 dataset="yuvalkirstain/pickapic_v2", streaming=True, resolution=512,
                 batch_size=2, grad_accum=8, lr=1e-5, beta=5000.0, rank=8, max_steps=2000,
                 mixed_precision="fp16", gradient_checkpointing=True, checkpoint_every=500,
                 output_dir="runs/sd15"),
    # SDXL on one big GPU or several (accelerate launch). The fp16-fix VAE avoids NaNs in fp16.
    "sdxl": dict(pretrained="stabilityai/stable-diffusion-xl-base-1.0",
                 vae="madebyollin/sdxl-vae-fp16-fix", dataset="yuvalkirstain/pickapic_v2",
                 streaming=True, resolution=1024, batch_size=1, grad_accum=16, lr=1e-5,
                 beta=5000.0, rank=8, max_steps=2000, mixed_precision="fp16",
                 gradient_checkpointing=True, checkpoint_every=500, output_dir="runs/sdxl"),
}


PRESET_NAMES = tuple(PRESETS)


def get_preset(name: str = "toy", **overrides) -> TrainConfig:
    """The named recipe as a validated :class:`TrainConfig`, with ``overrides`` applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {PRESET_NAMES}")
    return TrainConfig().replace(**{**PRESETS[name], **overrides}).validate()
