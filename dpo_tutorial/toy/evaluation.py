"""Evaluate a DPO LoRA on the toy world: the judge plays the human raters of the paper's evaluation.

Held-out prompts: every one of the 12 captions, ``per_caption`` times (40 -> 480 images per model),
each with a sampling seed from a range the pair generator never draws from (seeds >= 3e9), so base
and DPO images are compared on the same caption *and* the same starting noise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..evaluate import evaluate
from . import GUIDANCE_SCALE, PAIRS_DIR, PIPELINE_DIR, SAMPLE_STEPS, judge, world

EVAL_SEED_BASE = 3_000_000_000


def judge_score(images, captions: list[str]) -> np.ndarray:
    """The toy judge's continuous score of each image for its caption, ``(N,)`` floats in [0, 1]."""
    return judge.score_batch(images, captions).numpy()


def judge_correct(images, captions: list[str]) -> np.ndarray:
    """Whether the judge reads each image as its caption (colour and shape right), ``(N,)`` bools."""
    return judge.correct_batch(images, captions)[1].numpy()


def heldout_prompts(per_caption: int = 40) -> tuple[list[str], list[int]]:
    """``12 * per_caption`` (caption, seed) prompts, caption-major, seeds disjoint from the training pairs'."""
    captions = [c for c in world.all_captions() for _ in range(per_caption)]
    return captions, [EVAL_SEED_BASE + i for i in range(len(captions))]


def evaluate_toy(lora_dir: str | Path, per_caption: int = 40, pretrained: str | Path = PIPELINE_DIR,
                 pairs_dir: str | Path = PAIRS_DIR, num_draws: int = 8, base_samples: dict | None = None):
    """Base vs DPO on held-out prompts and implicit-reward accuracy on the held-out ``test`` pairs.

    Returns ``(EvalResult, samples)`` (see :func:`dpo_tutorial.evaluate.evaluate`). ``base_samples``: the
    samples of an earlier call with the same ``per_caption`` (e.g. for a second LoRA): base images reused.
    """
    captions, seeds = heldout_prompts(per_caption)
    return evaluate(str(pretrained), lora_dir, captions, seeds, judge_score, judge_correct,
                    test_data=str(pairs_dir), test_split="test", resolution=world.SIZE,
                    steps=SAMPLE_STEPS, guidance_scale=GUIDANCE_SCALE, num_draws=num_draws,
                    base_samples=base_samples)
