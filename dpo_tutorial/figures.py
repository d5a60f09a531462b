"""``dpo-tutorial figures``: regenerate every PNG in ``figures/`` from the plotting functions the notebooks use.

It trains one toy DPO run (the default preset; fewer steps under ``DPO_TUTORIAL_FAST=1``) and measures
on it, so the figures show real numbers from the shipped toy model, not made-up curves.

Regenerating must give the same pictures, so every random source is seeded and torch runs on a fixed
number of threads (:data:`FIGURE_THREADS`) with MKL's dynamic threading off: the float rounding of a
700-step run depends on how its sums are split across threads, and the toy base model draws the right
colour only about half the time, so a different split flips some samples' colours (a "blue square"
drawn blue in one run is drawn green in another). The PNGs carry no software-version metadata.
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from . import files, plots
from .analysis import model_diff_draws
from .config import get_preset
from .data import PairStream, PairTransform, load_pickapic
from .evaluate import load_with_lora
from .models import reference_mode
from .notebook_env import budget
from .threads import use_threads
from .toy.evaluation import evaluate_toy, heldout_prompts
from .train import first_steps, train

FIGURE_THREADS = 2


def _save(fig, path: Path) -> str:
    with files.atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path.name


def fix_randomness(threads: int, seed: int = 0) -> None:
    """Seed python, numpy and torch, and pin torch to ``threads`` threads (always calling
    ``torch.set_num_threads``, which also turns MKL's load-dependent dynamic threading off)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    use_threads(threads, deterministic=True)


FIGURE_NAMES = ("logsigmoid.png", "loss_variants.png", "model_diff_geometry.png", "training_curves.png", "beta.png",
                "shared_noise.png", "base_vs_dpo.png")
# written to the same folder by benchmarks/taste_curve.py (hours of training: not part of `dpo-tutorial figures`)
TASTE_FIGURE_NAMES = ("taste_curve.png", "taste_left.png")


def only_figures(folder: Path) -> bool:
    """A figures folder written before folders were marked: it holds nothing but the figures' PNGs."""
    return all(p.name in FIGURE_NAMES + TASTE_FIGURE_NAMES for p in folder.iterdir())


def make_figures(out_dir: str | Path = "figures") -> list[str]:
    """Write logsigmoid, beta, loss variants, geometry, shared-noise, training-curve and base-vs-DPO figures."""
    out = files.claim_folder(out_dir, "figures", legacy=only_figures)
    fix_randomness(FIGURE_THREADS)
    written = [_save(plots.logsigmoid_figure(), out / "logsigmoid.png"),
               _save(plots.loss_variants_figure(), out / "loss_variants.png"),
               _save(plots.geometry_figure(np.zeros(2), np.array([0.35, 0.28]), np.array([0.6, -0.6]),
                                           np.array([0.5, 0.4]), np.array([0.45, -0.45]),
                                           title="one DPO step: winner pulled in, loser pushed out"),
                     out / "model_diff_geometry.png")]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = get_preset("toy", output_dir=run_dir, max_steps=budget(get_preset("toy").max_steps, 20),
                         checkpoint_every=0, sample_grid=False, num_threads=FIGURE_THREADS)
        history = train(cfg)
        written.append(_save(plots.training_figure(history), out / "training_curves.png"))
        pipe, parts = load_with_lora(cfg.pretrained, run_dir)
        test = load_pickapic(cfg.dataset, "test")
        batch = next(iter(PairStream(test, PairTransform(cfg.resolution, random_flip=False), budget(64, 16), seed=0)))
        # notebook 04's band: the per-element gap after an untrained LoRA's first steps (the warm-up)
        early = first_steps(get_preset("toy", num_threads=FIGURE_THREADS), budget(50, 4))
        delta = (early["model_diff"][-1] - early["ref_diff"][-1]).abs().median().item()
        written.append(_save(plots.beta_figure(delta, betas=(cfg.beta / 4, cfg.beta, cfg.beta * 4)), out / "beta.png"))
        with reference_mode(parts.unet):  # the base model's own spread
            shared = model_diff_draws(parts, parts.unet, batch, budget(64, 8))
            independent = model_diff_draws(parts, parts.unet, batch, budget(64, 8), False, False)
        centre = lambda d: (d - d.mean(dim=0, keepdim=True)).flatten().numpy()  # noqa: E731
        written.append(_save(plots.spread_figure(centre(shared), centre(independent)), out / "shared_noise.png"))
        per_caption = budget(40, 2)
        _, samples = evaluate_toy(run_dir, per_caption=per_caption, num_draws=1)
        captions, _ = heldout_prompts(per_caption)
        idx = list(range(0, len(captions), per_caption))  # one prompt per caption
        written.append(_save(plots.grid_figure(samples["base_images"][idx], samples["dpo_images"][idx],
                                               [captions[i] for i in idx], samples["base_scores"][idx],
                                               samples["dpo_scores"][idx]), out / "base_vs_dpo.png"))
    return written
