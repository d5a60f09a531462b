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


@pytest.mark.slow
def test_implicit_accuracy_reads_the_policy_against_the_reference(sd_dir, pairs_parquet):
    """0.5 exactly at a zero-initialised LoRA; once the LoRA moves, the 15 scored pairs' logits are non-zero, so the
    accuracy (a multiple of 1/15) leaves 0.5. Were the reference the policy itself, every logit would stay 0 and the
    accuracy 0.5 whatever the LoRA."""
    parts = load_parts(str(sd_dir))
    params = add_lora(parts.unet, rank=4, init_seed=0)
    pairs = load_pickapic(str(pairs_parquet))
    assert implicit_reward_accuracy(parts, parts.unet, pairs, 32, num_draws=2) == 0.5
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn_like(p))
    acc, scored = implicit_reward_accuracy(parts, parts.unet, pairs, 32, num_draws=2, return_count=True)
    assert scored == 15 and acc != 0.5 and round(acc * 15, 6) == round(acc * 15)


@pytest.mark.slow
def test_evaluate_returns_well_formed_numbers(sd_dir, pairs_parquet, tmp_path, monkeypatch):
    train(TrainConfig(pretrained=str(sd_dir), dataset=str(pairs_parquet), output_dir=str(tmp_path), resolution=32,
                      batch_size=4, max_steps=3, lr=5e-2, rank=4, sample_grid=False))
    red = lambda imgs, caps: np.asarray(imgs, float)[..., 0].mean(axis=(1, 2))  # noqa: E731  "redness" judge
    correct = lambda imgs, caps: red(imgs, caps) > 127  # noqa: E731
    captions = ["a red square", "a blue square"] * 4
    result, samples = evaluate(str(sd_dir), tmp_path, captions, list(range(8)), red, correct,
                               test_data=str(pairs_parquet), test_split="train", steps=2, num_draws=2)
    assert result.n == 8 and samples["base_images"].shape == (8, 32, 32, 3)
    assert not np.array_equal(samples["base_images"], samples["dpo_images"])  # the LoRA is applied
    base, dpo = red(samples["base_images"], captions), red(samples["dpo_images"], captions)  # independent scoring
    np.testing.assert_allclose(samples["base_scores"], base)
    np.testing.assert_allclose(samples["dpo_scores"], dpo)
    wins = sum(1.0 if d > b + 1e-6 else 0.0 if d < b - 1e-6 else 0.5 for b, d in zip(base, dpo))
    assert result.win_rate == pytest.approx(wins / 8)  # counted by hand, not with win_rate()
    assert result.base_accuracy == pytest.approx(np.mean(base > 127))  # which column is which is checked
    assert result.dpo_accuracy == pytest.approx(np.mean(dpo > 127))
    assert result.base_mean_score == pytest.approx(base.mean()) and result.dpo_mean_score == pytest.approx(dpo.mean())
    swapped, _, _ = win_rate(dpo, base)
    assert swapped == pytest.approx(1 - result.win_rate)
    assert result.win_rate_ci_low <= result.win_rate <= result.win_rate_ci_high
    acc, scored = implicit_reward_accuracy(*_parts_with_lora(sd_dir, tmp_path), load_pickapic(str(pairs_parquet)), 32,
                                           num_draws=2, return_count=True)
    assert scored == 15 and result.implicit_acc == pytest.approx(acc)  # 12 good + 3 odd-format pairs; tie, corrupt out
    assert torch.is_grad_enabled()

    # a second evaluation on the same captions and seeds reuses the base images and gives the same numbers
    called = []
    import dpo_tutorial.evaluate as evaluate_module

    original = evaluate_module.generate_with_and_without_lora
    monkeypatch.setattr(evaluate_module, "generate_with_and_without_lora",
                        lambda *a, **k: called.append(1) or original(*a, **k))
    again, reused = evaluate(str(sd_dir), tmp_path, captions, list(range(8)), red, correct, steps=2,
                             base_samples=samples)
    monkeypatch.undo()
    assert not called  # the base images were not sampled again
    assert reused["base_images"] is samples["base_images"]
    np.testing.assert_array_equal(reused["dpo_images"], samples["dpo_images"])
    assert (again.win_rate, again.base_accuracy, again.dpo_accuracy) == (result.win_rate, result.base_accuracy,
                                                                         result.dpo_accuracy)
    with pytest.raises(ValueError, match="base_samples holds 8 base images for 2 captions"):
        evaluate(str(sd_dir), tmp_path, captions[:2], [0, 1], red, correct, steps=2, base_samples=samples)


def _parts_with_lora(sd_dir, lora_dir):
    from dpo_tutorial.evaluate import load_with_lora

    pipe, parts = load_with_lora(str(sd_dir), lora_dir)
    return parts, pipe.unet


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    from dpo_tutorial.testing.fixtures import build_tiny_pickscore

    return build_tiny_pickscore(tmp_path_factory.mktemp("pickscore"))


def test_pickscore_equals_clip_forward_logits_and_ignores_batching(pickscore_dir):
    """Independent path: CLIPModel.forward's logits_per_image (its own normalisation and logit scale)."""
    from PIL import Image

    from dpo_tutorial.pickscore import PickScore

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square", "a photo of a cat", "a dog", "a green triangle"]
    judge = PickScore(pickscore_dir, pickscore_dir, batch_size=2)
    scores = judge(images, captions)
    inputs = judge.processor(text=captions, images=[Image.fromarray(im) for im in images], padding=True,
                             return_tensors="pt")
    with torch.no_grad():
        expected = judge.model(**inputs).logits_per_image.diagonal().numpy()
    assert scores.shape == (5,)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(PickScore(pickscore_dir, pickscore_dir, batch_size=16)(images, captions), scores,
                               rtol=1e-5, atol=1e-5)
    assert len(set(np.round(scores, 4))) == 5  # the stand-in tells the pairs apart
    with pytest.raises(ValueError, match="one caption per image"):
        judge(images, captions[:3])


def test_pickscore_offline_hub_id_fails_with_a_message_naming_it():
    from dpo_tutorial.pickscore import PickScore

    with pytest.raises(OSError, match="could not load PickScore.*no-such-org/PickScore"):
        PickScore("no-such-org/PickScore", "no-such-org/PickScore")


@pytest.mark.slow
def test_evaluate_with_pickscore_reports_nan_accuracy_and_a_win_rate(sd_dir, pairs_parquet, pickscore_dir, tmp_path):
    from dpo_tutorial.pickscore import PickScore

    train(TrainConfig(pretrained=str(sd_dir), dataset=str(pairs_parquet), output_dir=str(tmp_path), resolution=32,
                      batch_size=4, max_steps=3, lr=5e-2, rank=4, sample_grid=False))
    judge = PickScore(pickscore_dir, pickscore_dir)
    captions = ["a red square", "a blue square", "a photo of a cat", "a dog"]
    result, samples = evaluate(str(sd_dir), tmp_path, captions, [0, 1, 2, 3], judge, steps=2, batch_size=3)
    assert math.isnan(result.base_accuracy) and math.isnan(result.dpo_accuracy)
    np.testing.assert_allclose(samples["dpo_scores"], judge(samples["dpo_images"], captions))
    assert not np.array_equal(samples["base_scores"], samples["dpo_scores"])
    base, dpo = samples["base_scores"], samples["dpo_scores"]
    wins = sum(1.0 if d > b + 1e-6 else 0.0 if d < b - 1e-6 else 0.5 for b, d in zip(base, dpo))
    assert result.win_rate == pytest.approx(wins / 4) and result.n == 4


def test_summarise_samples_counts_only_the_selected_prompts():
    from dpo_tutorial.evaluate import summarise_samples

    samples = {"base_scores": np.array([0.1, 0.9, 0.5, 0.2]), "dpo_scores": np.array([0.3, 0.2, 0.5, 0.8]),
               "base_correct": np.array([0.0, 1.0, 1.0, 0.0]), "dpo_correct": np.array([1.0, 0.0, 1.0, 1.0])}
    keep = np.array([True, False, True, True])  # outcomes 1, 1/2, 1 -> 5/6
    r = summarise_samples(samples, keep, implicit_acc=0.75, implicit_pairs=8)
    assert (r.n, r.win_rate, r.implicit_acc, r.implicit_pairs) == (3, pytest.approx(5 / 6), 0.75, 8)
    assert (r.base_accuracy, r.dpo_accuracy) == (pytest.approx(1 / 3), 1.0)
    assert (r.base_mean_score, r.dpo_mean_score) == (pytest.approx(0.8 / 3), pytest.approx(1.6 / 3))
    everything = summarise_samples(samples)
    assert everything.n == 4 and everything.win_rate == pytest.approx(0.625) and math.isnan(everything.implicit_acc)
    learned = dict(samples, base_correct=np.array([np.nan]), dpo_correct=np.array([np.nan]))  # PickScore: no correct()
    assert math.isnan(summarise_samples(learned, keep).base_accuracy)
    with pytest.raises(ValueError, match="selects 0 of 4 prompts"):
        summarise_samples(samples, np.zeros(4, bool))
