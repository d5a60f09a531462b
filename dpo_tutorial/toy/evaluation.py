"""Evaluate a DPO LoRA on the toy world: the judge plays the human raters of the paper's evaluation.

Held-out prompts: every one of the 12 captions, ``per_caption`` times (40 -> 480 images per model),
each with a sampling seed from a range the pair generator never draws from (seeds >= 3e9), so base
and DPO images are compared on the same caption *and* the same starting noise.

The prompts fall into two groups, reported separately:

- **seen captions, new seeds**: the 9 captions the training pairs show; only the sampling seeds are new.
- **unseen captions**: the 3 colour x shape combinations no training or validation pair shows
  (:data:`dpo_tutorial.toy.pairs.UNSEEN_CAPTIONS`). Their colours and shapes occur in training, in
  other combinations; does the preference learnt on the seen captions carry over to these?

The implicit-reward accuracy is measured on the ``test`` split's pairs of each group.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..data import load_pickapic
from ..evaluate import (
    EvalResult,
    approx_duration,
    check_count,
    compare_samples,
    implicit_reward_accuracy,
    load_with_lora,
    summarise_samples,
)
from . import GUIDANCE_SCALE, PAIRS_DIR, PIPELINE_DIR, SAMPLE_STEPS, judge, world
from .pairs import UNSEEN_CAPTIONS

EVAL_SEED_BASE = 3_000_000_000
GROUPS = ("seen", "unseen")
MAX_PER_CAPTION = 1000  # 24,000 images in all
MAX_NUM_DRAWS = 256  # 32 times the default 8
# for the cost a bound's message names; measured on one thread of a busy 2-core AMD EPYC machine: 120 images
# of the 25-step sampler in 5.7 s, and 593 test pairs x 2 draws (policy and reference on both images) in 11.7 s
CPU_IMAGES_PER_SECOND = 20.0
CPU_PAIR_DRAWS_PER_SECOND = 100.0


@dataclass
class ToyEvalResult(EvalResult):
    """:class:`~dpo_tutorial.evaluate.EvalResult` over all 12 captions, and the same numbers per caption group.

    ``seen``: the captions of the training pairs (new seeds); ``unseen``: the captions no training pair
    shows. ``to_dict()`` nests them under the keys ``"seen"`` and ``"unseen"``.
    """

    seen: EvalResult | None = None
    unseen: EvalResult | None = None


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


def caption_group(caption: str) -> str:
    """``"unseen"`` for a caption no training pair shows, else ``"seen"``."""
    return "unseen" if caption in UNSEEN_CAPTIONS else "seen"


def group_masks(captions: list[str]) -> dict[str, np.ndarray]:
    """``{"seen": mask, "unseen": mask}``: ``(N,)`` bools saying which of ``captions`` is in each group."""
    groups = np.array([caption_group(c) for c in captions])
    return {name: groups == name for name in GROUPS}


def group_implicit_accuracy(parts, unet, pairs, num_draws: int = 8, progress: bool = False,
                            max_pairs: int | None = None) -> dict[str, tuple[float, int]]:
    """``{group: (implicit-reward accuracy, pairs scored)}`` on the pairs of each caption group (the first
    ``max_pairs`` non-tie pairs of each, when given).

    The accuracy over all pairs is the pair-weighted mean of the two. A group with no pair in ``pairs``
    gives ``(nan, 0)``.
    """
    out = {}
    for name, mask in group_masks(pairs["caption"]).items():
        if not mask.any():
            out[name] = (float("nan"), 0)
            continue
        subset = pairs.select(np.flatnonzero(mask))
        out[name] = implicit_reward_accuracy(parts, unet, subset, world.SIZE, num_draws=num_draws, return_count=True,
                                             progress=progress, max_pairs=max_pairs)
    return out


def check_toy_counts(per_caption: int, num_draws: int, names: tuple[str, str] = ("per_caption", "num_draws"),
                     pairs_dir: str | Path = PAIRS_DIR) -> None:
    """Refuse a ``per_caption`` or ``num_draws`` below 1 or above its bound, naming its cost (``ConfigError``)."""
    images = 2 * len(world.all_captions()) * per_caption
    check_count(names[0], per_caption, MAX_PER_CAPTION,
                f"sample {images:,} images (12 captions x 2 models x {per_caption}), about "
                f"{approx_duration(images / CPU_IMAGES_PER_SECOND)} on a CPU core")
    test = Path(pairs_dir) / "test.parquet"
    pairs = pq.read_metadata(test).num_rows if test.is_file() else 600
    check_count(names[1], num_draws, MAX_NUM_DRAWS,
                f"score {pairs} test pairs {num_draws:,} times ({4 * pairs * num_draws:,} UNet passes), about "
                f"{approx_duration(pairs * num_draws / CPU_PAIR_DRAWS_PER_SECOND)} on a CPU core")


def evaluate_toy(lora_dir: str | Path, per_caption: int = 40, pretrained: str | Path = PIPELINE_DIR,
                 pairs_dir: str | Path = PAIRS_DIR, num_draws: int = 8, base_samples: dict | None = None,
                 progress: bool = False, max_pairs: int | None = None):
    """Base vs DPO on held-out prompts and implicit-reward accuracy on the held-out ``test`` pairs.

    Returns ``(ToyEvalResult, samples)``: the numbers over all captions with ``seen`` and ``unseen``
    per group, and the raw images and scores (see :func:`dpo_tutorial.evaluate.compare_samples`).
    ``base_samples``: the samples of an earlier call with the same ``per_caption`` (e.g. for a second
    LoRA): base images reused. ``max_pairs``: score only the first that many non-tie test pairs of each caption
    group (all 593 when None). ``progress``: progress bars on stderr. Counts beyond :data:`MAX_PER_CAPTION`
    and :data:`MAX_NUM_DRAWS` are refused (:func:`check_toy_counts`), as is a LoRA holding NaN or infinity.
    """
    check_toy_counts(per_caption, num_draws, pairs_dir=pairs_dir)
    captions, seeds = heldout_prompts(per_caption)
    pipe, parts = load_with_lora(str(pretrained), lora_dir)
    samples = compare_samples(pipe, captions, seeds, judge_score, judge_correct, SAMPLE_STEPS, GUIDANCE_SCALE,
                              base_samples=base_samples, progress=progress)
    implicit = group_implicit_accuracy(parts, pipe.unet, load_pickapic(str(pairs_dir), "test"), num_draws, progress,
                                       max_pairs)
    masks = group_masks(captions)
    groups = {name: summarise_samples(samples, masks[name], *implicit[name]) for name in GROUPS}
    scored = sum(count for _, count in implicit.values())
    pooled = sum(acc * count for acc, count in implicit.values() if count) / scored if scored else float("nan")
    overall = summarise_samples(samples, None, pooled, scored)
    return ToyEvalResult(**overall.to_dict(), **groups), samples
