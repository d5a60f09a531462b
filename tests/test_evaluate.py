"""Evaluation: win-rate arithmetic, implicit accuracy at init, and a small end-to-end evaluate()."""
import math

import numpy as np
import pytest
import torch

from dpo_tutorial.config import TrainConfig
from dpo_tutorial.data import load_pickapic
from dpo_tutorial.evaluate import evaluate, implicit_reward_accuracy, win_rate
from dpo_tutorial.models import add_lora, load_parts
from dpo_tutorial.train import train


def test_win_rate_splits_ties_and_gives_a_normal_interval():
    base = [0.1, 0.5, 0.5, 0.9, 0.2]
    dpo = [0.2, 0.5, 0.4, 0.95, 0.2]
    outcome = np.array([1, 0.5, 0, 1, 0.5])
    rate, low, high = win_rate(base, dpo)
    assert rate == pytest.approx(0.6)
    half = 1.96 * outcome.std(ddof=1) / math.sqrt(5)
    assert (low, high) == pytest.approx((0.6 - half, min(1.0, 0.6 + half)))
    assert win_rate([0.0] * 10, [1.0] * 10) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_implicit_accuracy_is_exactly_half_at_lora_init(sd_dir, pairs_parquet):
    parts = load_parts(str(sd_dir))
    add_lora(parts.unet, rank=4, init_seed=0)
    acc = implicit_reward_accuracy(parts, parts.unet, load_pickapic(str(pairs_parquet)), 32, num_draws=2)
    assert acc == 0.5


def test_evaluate_returns_well_formed_numbers(sd_dir, pairs_parquet, tmp_path):
    train(TrainConfig(pretrained=str(sd_dir), dataset=str(pairs_parquet), output_dir=str(tmp_path), resolution=32,
                      batch_size=4, max_steps=3, lr=5e-2, rank=4, sample_grid=False))
    red = lambda imgs, caps: np.asarray(imgs, float)[..., 0].mean(axis=(1, 2))  # noqa: E731  "redness" judge
    correct = lambda imgs, caps: red(imgs, caps) > 127  # noqa: E731
    captions = ["a red square", "a blue square"] * 4
    result, samples = evaluate(str(sd_dir), tmp_path, captions, list(range(8)), red, correct,
                               test_data=str(pairs_parquet), test_split="train", steps=2, num_draws=2)
    d = result.to_dict()
    assert d["n"] == 8 and samples["base_images"].shape == (8, 32, 32, 3)
    for key in ("base_accuracy", "dpo_accuracy", "win_rate", "win_rate_ci_low", "win_rate_ci_high", "implicit_acc"):
        assert 0.0 <= d[key] <= 1.0, key
    assert d["win_rate_ci_low"] <= d["win_rate"] <= d["win_rate_ci_high"]
    assert not np.array_equal(samples["base_images"], samples["dpo_images"])  # the LoRA is applied
    np.testing.assert_allclose(samples["base_scores"], red(samples["base_images"], captions))
    assert torch.is_grad_enabled()
