"""Train DPO on your own labels and measure what moved (notebook 08, ``benchmarks/taste_curve.py``).

:func:`taste_config` is the toy preset pointed at a folder of labels, with two changes a small label set
needs: no horizontal flips (a flip mirrors both images of a pair, so a "left" taste would be taught as
often as its opposite) and no held-out split (the labels are all there is). :func:`measure_shift`
samples base and DPO on the same held-out captions and seeds and compares them under the taste's scorer
(win-rate with its 95% interval, means before and after) and under the caption judge (what the captions
ask for, which the labels never mentioned).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .. import files
from ..config import get_preset
from ..evaluate import compare_samples, load_with_lora, win_rate
from ..pickapic import write_pickapic_parquet
from ..train import train
from . import GUIDANCE_SCALE, PIPELINE_DIR, SAMPLE_STEPS
from .evaluation import heldout_prompts, judge_correct
from .tastes import Taste, get_taste

TASTE_RECIPE = dict(max_steps=150, batch_size=16, lr_warmup_steps=15)  # 200 labels: 12 passes over them


def taste_config(label_dir: str | Path, output_dir: str | Path, seed: int = 0, **overrides):
    """The toy preset trained on ``label_dir/train.parquet`` into ``output_dir`` (see the module doc)."""
    settings = dict(TASTE_RECIPE, dataset=str(label_dir), split="train", output_dir=str(output_dir), seed=seed,
                    random_flip=False, heldout_split=None, sample_grid=False, checkpoint_every=0,
                    checkpoints_total_limit=1)
    return get_preset("toy", **{**settings, **overrides})


@dataclass
class TasteShift:
    """Base vs DPO on the same held-out captions and seeds, under a taste's scorer and the caption judge."""

    taste: str
    captions: list[str]
    base_images: np.ndarray  # (N, 32, 32, 3) uint8
    dpo_images: np.ndarray  # (N, 32, 32, 3) uint8
    base_scores: np.ndarray  # (N,) the taste's score of each base image
    dpo_scores: np.ndarray  # (N,)
    win_rate: tuple[float, float, float]  # (rate, low, high): DPO scores higher than base on the same prompt
    judge_base: float  # fraction of base images the caption judge reads as their caption
    judge_dpo: float
    base_correct: np.ndarray  # (N,) 1.0 where the caption judge reads the base image as its caption, else 0.0

    def summary(self) -> str:
        """One line: win-rate with its interval, the mean score before -> after, the judge's accuracy."""
        rate, low, high = self.win_rate
        return (f"{self.taste}: win-rate {rate:.3f} [{low:.3f}, {high:.3f}], mean score {self.base_scores.mean():.3f} "
                f"-> {self.dpo_scores.mean():.3f}, caption judge {self.judge_base:.3f} -> {self.judge_dpo:.3f}")


def measure_shift(lora_dir: str | Path, taste: Taste | str, per_caption: int = 20,
                  pretrained: str | Path = PIPELINE_DIR, base: TasteShift | None = None) -> TasteShift:
    """Sample the 12 captions ``per_caption`` times each with and without the LoRA in ``lora_dir`` (seeds from the
    toy evaluation's held-out range) and score both sets (see :class:`TasteShift`).

    ``base``: an earlier shift of the same taste and ``per_caption`` from the same ``pretrained`` model (another LoRA
    of it); its base images and scores are reused, since the model without a LoRA is the same, and only the LoRA's
    images are sampled.
    """
    taste = get_taste(taste) if isinstance(taste, str) else taste
    pipe, _parts = load_with_lora(str(pretrained), lora_dir)
    captions, seeds = heldout_prompts(per_caption)
    reused = None
    if base is not None:
        if base.taste != taste.name or base.captions != captions:
            raise ValueError(f"base is a '{base.taste}' shift of {len(base.captions)} prompts; this one is "
                             f"'{taste.name}' with {len(captions)} (per_caption={per_caption}): expected the same")
        reused = {"base_images": base.base_images, "base_scores": base.base_scores, "base_correct": base.base_correct}
    s = compare_samples(pipe, captions, seeds, lambda images, _captions: taste.score(images), judge_correct,
                        SAMPLE_STEPS, GUIDANCE_SCALE, base_samples=reused)  # judge_correct: as in evaluate_toy
    return TasteShift(taste.name, captions, s["base_images"], s["dpo_images"], s["base_scores"], s["dpo_scores"],
                      win_rate(s["base_scores"], s["dpo_scores"]), float(s["base_correct"].mean()),
                      float(s["dpo_correct"].mean()), s["base_correct"])


def train_on_labels(label_dir: str | Path, output_dir: str | Path, seed: int = 0, **overrides):
    """``(history, config)`` of a fresh :func:`taste_config` run on the labels in ``label_dir``.

    Labels change between runs (you label more, or relabel), so an earlier run in ``output_dir`` is replaced,
    never reused, even one interrupted before its first step; a folder the package did not make for a run (no
    run marker, :data:`dpo_tutorial.files.MARKER`) is refused rather than emptied.
    """
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if files.marker_kind(out) != "run":
            raise FileExistsError(f"{out} is not empty and holds no dpo-tutorial run: choose another folder")
        files.remove_folder(out)
    config = taste_config(label_dir, out, seed=seed, **overrides)
    return train(config), config


def subset_labels(label_dir: str | Path, n: int, out_dir: str | Path) -> Path:
    """``out_dir/train.parquet``: the first ``n`` labels of ``label_dir/train.parquet`` (the rows, unchanged)."""
    rows = pq.read_table(Path(label_dir) / "train.parquet").to_pylist()
    if n > len(rows):
        raise ValueError(f"asked for the first {n} labels but {label_dir} holds {len(rows)}")
    return write_pickapic_parquet(Path(out_dir) / "train.parquet", rows[:n]).parent


def labels_curve(label_dir: str | Path, counts: list[int], run_root: str | Path, taste: Taste | str, seed: int = 0,
                 per_caption: int = 20, base: TasteShift | None = None, **overrides) -> list[dict]:
    """For each ``n`` in ``counts``: train on the first ``n`` labels and measure the shift (:func:`measure_shift`).

    The base model's images are sampled once, for the first count (or taken from ``base``, an earlier shift of the
    same taste and ``per_caption``), and reused for the others.

    Returns one dict per count: ``labels``, ``win_rate``, ``low``, ``high``, ``mean_base``, ``mean_dpo``,
    ``judge_base``, ``judge_dpo`` and ``train_seconds``.
    """
    rows = []
    for n in counts:
        data = subset_labels(label_dir, n, Path(run_root) / f"labels-{n}")
        start = time.perf_counter()
        _, config = train_on_labels(data, Path(run_root) / f"run-{n}", seed=seed, **overrides)
        seconds = time.perf_counter() - start
        shift = measure_shift(config.output_dir, taste, per_caption=per_caption, base=base)
        base, (rate, low, high) = shift, shift.win_rate
        rows.append(dict(labels=n, win_rate=rate, low=low, high=high, mean_base=float(shift.base_scores.mean()),
                         mean_dpo=float(shift.dpo_scores.mean()), judge_base=shift.judge_base,
                         judge_dpo=shift.judge_dpo, train_seconds=seconds))
    return rows
