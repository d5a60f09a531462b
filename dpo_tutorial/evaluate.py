"""Does the DPO LoRA help? Win-rate under a judge, judge accuracy, implicit-reward accuracy.

- **Win-rate** (the paper's headline metric, there with human raters): for the same caption and the
  same sampling seed, is the DPO image scored higher than the base image? A tie counts one half, as in
  the paper's human evaluation. Reported with a 95% normal-approximation confidence interval over the
  per-prompt outcomes (1, ½, 0).
- **Accuracy**: the share of images the judge calls correct, for base and DPO.
- **Implicit-reward accuracy** (the paper's Table 2 column): on held-out preference pairs, how often
  the trained model's implicit reward ``-β/2 · (model_diff - ref_diff)`` prefers the labelled winner,
  averaging the reward over several shared (noise, timestep) draws per pair.

The judge is any pair of functions over ``(N, H, W, 3)`` uint8 images and ``N`` captions: ``score`` →
``(N,)`` floats (higher = better) and, optionally, ``correct`` → ``(N,)`` bools. The toy world's judge
has both; PickScore (:class:`dpo_tutorial.pickscore.PickScore`, a learned human-preference model) plays
the scoring role for SD 1.5 and has no ``correct`` (accuracy is then NaN).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from tqdm.auto import tqdm

from .data import (
    DataError,
    PairTransform,
    SkipRow,
    collate_pairs,
    load_pickapic,
    make_example,
)
from .errors import ConfigError
from .loss import implicit_accuracy
from .models import DiffusionParts, ModelError
from .run_dir import LORA_FILE
from .sample import generate, generate_with_and_without_lora, load_pipeline
from .step import dpo_step


@dataclass
class EvalResult:
    """The numbers ``dpo-tutorial evaluate`` prints (``--json`` prints them as one object)."""

    base_accuracy: float
    dpo_accuracy: float
    win_rate: float
    win_rate_ci_low: float
    win_rate_ci_high: float
    implicit_acc: float
    n: int
    base_mean_score: float
    dpo_mean_score: float
    implicit_pairs: int | None = None  # how many non-tie pairs ``implicit_acc`` scored (None: not counted)

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


def win_rate(base_scores, dpo_scores, tie_tol: float = 1e-6) -> tuple[float, float, float]:
    """Win-rate of DPO over base with ties split, and its 95% confidence interval ``(rate, low, high)``.

    Outcome per prompt: 1 if ``dpo > base + tie_tol``, 0 if ``dpo < base - tie_tol``, else ½; the
    interval is ``mean ± 1.96 · sd / √n`` of those outcomes, clipped to [0, 1].
    """
    base, dpo = np.asarray(base_scores, float), np.asarray(dpo_scores, float)
    if base.shape != dpo.shape or base.size == 0:
        raise ValueError(f"need equal, non-empty score arrays, got {base.shape} and {dpo.shape}")
    outcome = np.where(dpo > base + tie_tol, 1.0, np.where(dpo < base - tie_tol, 0.0, 0.5))
    rate = float(outcome.mean())
    half = 1.96 * float(outcome.std(ddof=1)) / math.sqrt(outcome.size) if outcome.size > 1 else 1.0
    return rate, max(0.0, rate - half), min(1.0, rate + half)


def eval_batch_pairs(resolution: int, max_pairs: int = 64) -> int:
    """Pairs per no-grad batch at ``resolution`` px: 8 at 512 (16 images through an fp16 SD 1.5 UNet fit a
    16 GB GPU), scaled by pixel count (2 at 1024 px), at most ``max_pairs`` (the toy's 32 px: 64)."""
    if resolution < 8:
        raise ValueError(f"resolution={resolution!r}: expected a positive number of pixels (>= 8)")
    return max(1, min(max_pairs, int(8 * (512 / resolution) ** 2)))


@torch.no_grad()
def implicit_reward_accuracy(parts, unet, dataset, resolution: int, num_draws: int = 8,
                             batch_size: int | None = None, seed: int = 0, max_pairs: int | None = None,
                             return_count: bool = False, progress: bool = False,
                             ref_unet=None) -> float | tuple[float, int]:
    """Share of non-tie pairs whose implicit reward, averaged over ``num_draws`` noise/timestep draws, prefers the winner.

    ``unet`` carries the LoRA; the reference is the same UNet with the adapter off, or ``ref_unet`` when
    given (a fully tuned ``unet`` against its base UNet). ``dataset`` may be a stream; the first
    ``max_pairs`` non-tie pairs are scored (all when None). Pairs that do not decode are skipped; ties
    are not scored (they have no winner). ``return_count``: also return how many pairs were scored.
    ``batch_size`` pairs are scored at once (default :func:`eval_batch_pairs`).
    ``progress``: show a progress bar (on stderr) over the pairs read and the draws scored.
    """
    batch_size = batch_size or eval_batch_pairs(resolution)
    transform = PairTransform(resolution, random_crop=False, random_flip=False)
    examples = []
    for row in tqdm(dataset, desc="reading held-out pairs", unit="row", disable=not progress, leave=False):
        if max_pairs is not None and len(examples) >= max_pairs:
            break
        try:  # ties have no winner; undecodable images are skipped as in training
            examples.append(make_example(row, transform, random.Random(0)))
        except SkipRow:
            continue
    if not examples:
        raise DataError("no decodable non-tie pairs to score: expected held-out pairs with JPEG/PNG/WebP images")
    for model in (unet, ref_unet):
        if model is not None:
            model.eval()
    logits = torch.zeros(len(examples))
    generator = torch.Generator(device=parts.vae.device).manual_seed(seed)
    bar = tqdm(total=len(examples) * num_draws, desc="implicit-reward accuracy", unit="pair-draw",
               disable=not progress)
    for start in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[start:start + batch_size])
        for _ in range(num_draws):
            # β > 0 only scales the logits; their sign (all the accuracy reads) does not depend on it
            out = dpo_step(parts, unet, batch, 1.0, generator=generator, resolution=resolution, ref_unet=ref_unet)
            logits[start:start + len(out.logits)] += out.logits.cpu() / num_draws
            bar.update(len(out.logits))
    bar.close()
    accuracy = float(implicit_accuracy(logits))
    return (accuracy, len(examples)) if return_count else accuracy


def compare_samples(pipe, captions: list[str], seeds: list[int], judge_score, judge_correct, steps: int,
                    guidance_scale: float, batch_size: int = 240, base_samples: dict | None = None,
                    progress: bool = False) -> dict:
    """Base (LoRA off) and DPO (LoRA on) images for the same captions and seeds, scored by the judge.

    ``base_samples``: what an earlier call returned for the same base model, captions, seeds, sampler and
    judge (e.g. when evaluating a second LoRA); its base images and scores are reused, not sampled again.
    ``progress``: show a progress bar (on stderr) over the images sampled.
    """
    if base_samples is not None and len(base_samples["base_images"]) != len(captions):
        raise ValueError(f"base_samples holds {len(base_samples['base_images'])} base images for {len(captions)} "
                         "captions: expected the samples of an evaluation on the same captions and seeds")
    chunks = [(captions[i:i + batch_size], seeds[i:i + batch_size]) for i in range(0, len(captions), batch_size)]
    models = 1 if base_samples is not None else 2
    bar = tqdm(total=models * len(captions), desc=f"sampling {models} x {len(captions)} images", unit="image",
               disable=not progress)
    chunks = counted(chunks, bar, models)
    if base_samples is None:
        both = [generate_with_and_without_lora(pipe, *c, steps=steps, guidance_scale=guidance_scale) for c in chunks]
        base, dpo = np.concatenate([b for b, _ in both]), np.concatenate([d for _, d in both])
        base_scores = np.asarray(judge_score(base, captions), float)
        # a learned scorer such as PickScore has no notion of "correct": accuracy is then NaN
        base_correct = np.asarray(judge_correct(base, captions) if judge_correct else [np.nan], float)
    else:
        dpo = np.concatenate([generate(pipe, *c, steps=steps, guidance_scale=guidance_scale) for c in chunks])
        base, base_scores, base_correct = (base_samples[k] for k in ("base_images", "base_scores", "base_correct"))
    bar.close()
    return {"base_images": base, "dpo_images": dpo, "base_scores": base_scores,
            "dpo_scores": np.asarray(judge_score(dpo, captions), float), "base_correct": base_correct,
            "dpo_correct": np.asarray(judge_correct(dpo, captions) if judge_correct else [np.nan], float)}


def counted(chunks, bar, models: int):
    """Yield the ``(captions, seeds)`` chunks, advancing ``bar`` by ``models`` images per caption of each one
    once it has been sampled (that is, when the next chunk is asked for)."""
    for chunk in chunks:
        yield chunk
        bar.update(models * len(chunk[0]))


def load_with_lora(pretrained: str, lora_dir: str | Path, device: str | torch.device | None = None):
    """(pipeline with the LoRA loaded, its DiffusionParts) for evaluation, on ``device`` (default CPU)."""
    pipe = load_pipeline(pretrained, device)
    check_lora_fits(pipe, pretrained, lora_dir)
    train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    parts = DiffusionParts([pipe.tokenizer], [pipe.text_encoder], pipe.vae, pipe.unet, train_scheduler, False)
    return pipe, parts


def check_lora_fits(pipe, pretrained: str, lora_dir: str | Path) -> None:
    """Load the LoRA in ``lora_dir`` into ``pipe``; raise ``ModelError`` unless every tensor of it fits and is finite.

    A LoRA trained on another model either fails on shapes or (other layer names) loads nothing at all,
    which would silently evaluate the base model against itself.
    """
    path = Path(lora_dir) / LORA_FILE
    try:
        with safe_open(str(path), "pt") as f:
            expected = len(list(f.keys()))
        pipe.load_lora_weights(str(lora_dir))
    except Exception as err:  # diffusers/peft raise RuntimeError, ValueError, KeyError... on a mismatch
        first = " ".join(str(err).split())[:160] or type(err).__name__
        raise ModelError(f"the LoRA in {lora_dir} does not fit {pretrained} ({first}): expected a LoRA "
                         "trained on this model") from err
    loaded = sum("lora_" in n for n, _ in pipe.unet.named_parameters())
    if loaded != expected:
        raise ModelError(f"the LoRA in {lora_dir} does not fit {pretrained}: {loaded} of its {expected} tensors "
                         "match this model's layers; expected a LoRA trained on this model")
    check_lora_finite(lora_dir)


def evaluate(pretrained: str, lora_dir: str | Path, captions: list[str], seeds: list[int], judge_score,
             judge_correct=None, test_data: str | None = None, test_split: str = "test", resolution: int = 32,
             steps: int = 25, guidance_scale: float = 7.5, num_draws: int = 8,
             device: str | torch.device | None = None, streaming: bool = False,
             max_test_pairs: int | None = None, batch_size: int = 240,
             base_samples: dict | None = None) -> tuple[EvalResult, dict]:
    """Everything :class:`EvalResult` reports, plus the raw samples and scores (for plots).

    ``test_data`` (optional, with ``test_split``, ``streaming`` and ``max_test_pairs``): held-out pairs for
    the implicit-reward accuracy, loaded with :func:`dpo_tutorial.data.load_pickapic`. ``batch_size``
    captions are sampled at once (keep it small for 512-px models on a GPU). ``base_samples``: the samples
    an earlier call returned on the same base model, captions and seeds, whose base images are reused
    (:func:`compare_samples`).
    """
    pipe, parts = load_with_lora(pretrained, lora_dir, device)
    samples = compare_samples(pipe, captions, seeds, judge_score, judge_correct, steps, guidance_scale,
                              batch_size, base_samples)
    implicit = float("nan")
    if test_data:
        pairs = load_pickapic(test_data, test_split, streaming=streaming)
        implicit = implicit_reward_accuracy(parts, pipe.unet, pairs, resolution, num_draws=num_draws,
                                            max_pairs=max_test_pairs)
    return summarise_samples(samples, None, implicit), samples


def summarise_samples(samples: dict, keep=None, implicit_acc: float = float("nan"),
                      implicit_pairs: int | None = None) -> EvalResult:
    """The :class:`EvalResult` of the prompts that the boolean mask ``keep`` selects (all prompts when None).

    ``samples``: what :func:`compare_samples` returns; ``implicit_acc`` / ``implicit_pairs``: measured
    separately (on held-out pairs of the same prompt group). A judge without ``correct`` gives NaN accuracies.
    """
    n_prompts = len(samples["base_scores"])
    keep = np.ones(n_prompts, bool) if keep is None else np.asarray(keep, bool)
    if keep.shape != (n_prompts,) or not keep.any():
        raise ValueError(f"keep selects {int(keep.sum())} of {n_prompts} prompts (shape {keep.shape}): expected a "
                         "boolean mask over the prompts that selects at least one")

    def selected(key: str) -> np.ndarray:
        values = np.asarray(samples[key], float)
        return values if values.shape == (1,) and np.isnan(values[0]) else values[keep]  # NaN: no correct()

    base, dpo = selected("base_scores"), selected("dpo_scores")
    rate, low, high = win_rate(base, dpo)
    return EvalResult(base_accuracy=float(selected("base_correct").mean()),
                      dpo_accuracy=float(selected("dpo_correct").mean()), win_rate=rate, win_rate_ci_low=low,
                      win_rate_ci_high=high, implicit_acc=float(implicit_acc), n=int(keep.sum()),
                      base_mean_score=float(base.mean()), dpo_mean_score=float(dpo.mean()),
                      implicit_pairs=implicit_pairs)


def check_count(name: str, value: int, maximum: int, cost: str) -> None:
    """Refuse a count below 1 or above ``maximum`` with one line (``ConfigError``) saying what it would cost.

    ``cost``: what ``value`` would do, in words ("sample 2,400 images, about 1 min on a CPU").
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"invalid {name} {value!r}: expected an integer >= 1")
    if value > maximum:
        raise ConfigError(f"{name} {value} would {cost}: expected at most {maximum}")


def approx_duration(seconds: float) -> str:
    """``seconds`` in words at a readable unit: ``'40 s'``, ``'12 min'``, ``'3.5 h'``, ``'2.1 days'``,
    ``'4,000 years'``."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            value = seconds / size
            return f"{value:,.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{seconds:.0f} s"


def check_lora_finite(lora_dir: str | Path) -> None:
    """Raise ``ModelError`` when a tensor of the LoRA in ``lora_dir`` holds NaN or infinity.

    Such a LoRA (a diverged run) would otherwise produce NaN images that every judge scores as losses.
    """
    path = Path(lora_dir) / LORA_FILE
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        bad = [name for name in names if not torch.isfinite(f.get_tensor(name)).all()]
    if bad:
        raise ModelError(f"the LoRA in {lora_dir} holds NaN or infinite values in {len(bad)} of its {len(names)} "
                         f"tensors (first: {bad[0]}): expected the weights of a run that did not diverge")


def heldout_accuracy(parts, unet, config, num_draws: int = 4) -> dict:
    """A run's closing held-out score: the implicit-reward accuracy of ``unet`` (LoRA on vs off) on
    ``config.heldout_split`` of its dataset, at most ``config.heldout_pairs`` pairs, ``num_draws`` shared (noise,
    timestep) draws each. Returns ``heldout_split``, ``heldout_pairs`` (how many were scored) and
    ``heldout_implicit_acc``."""
    pairs = load_pickapic(config.dataset, config.heldout_split, streaming=config.streaming)
    acc, n = implicit_reward_accuracy(parts, unet, pairs, config.resolution, num_draws=num_draws,
                                      max_pairs=config.heldout_pairs, return_count=True)
    return {"heldout_split": config.heldout_split, "heldout_pairs": n, "heldout_implicit_acc": acc}
