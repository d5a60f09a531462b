"""The Diffusion-DPO loss against independent (per-element, pure-Python) computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from dpo_tutorial.loss import LOSS_TYPES, diffusion_dpo_loss


def batch(num_pairs=5, seed=0, shape=(4, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * num_pairs, *shape, generator=g)
    model = target + 0.5 * torch.randn(2 * num_pairs, *shape, generator=g)
    ref = target + 0.5 * torch.randn(2 * num_pairs, *shape, generator=g)
    return model, ref, target


def python_mse(a, b):
    """Mean squared error of two tensors computed element by element in Python floats."""
    xs, ys = a.flatten().tolist(), b.flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(xs, ys)) / len(xs)


def independent_logits(model, ref, target, beta):
    n = model.shape[0] // 2
    out = []
    for i in range(n):
        m_diff = python_mse(model[i], target[i]) - python_mse(model[i + n], target[i + n])
        r_diff = python_mse(ref[i], target[i]) - python_mse(ref[i + n], target[i + n])
        out.append(-0.5 * beta * (m_diff - r_diff))
    return out


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


@pytest.mark.parametrize("beta", [1.0, 50.0, 5000.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_variant_matches_independent_formula(loss_type, beta):
    model, ref, target = batch()
    z = independent_logits(model, ref, target, beta)
    n = len(z)
    expected = {
        "sigmoid": sum(-logsig(v) for v in z) / n,
        "legacy_mean_inside": -logsig(sum(z) / n),
        "hinge": sum(max(0.0, 1 - v) for v in z) / n,
        "ipo": sum((v - 0.5) ** 2 for v in z) / n,
        "sft": sum(python_mse(model[i], target[i]) for i in range(n)) / n,
    }[loss_type]
    out = diffusion_dpo_loss(model, ref, target, beta=beta, loss_type=loss_type)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert out.logits.tolist() == pytest.approx(z, rel=1e-4, abs=1e-5)
    assert out.implicit_acc.item() == pytest.approx(sum((v > 0) + 0.5 * (v == 0) for v in z) / n)


def test_model_and_ref_diff_shapes_and_values():
    model, ref, target = batch(num_pairs=3)
    out = diffusion_dpo_loss(model, ref, target)
    assert out.model_diff.shape == out.ref_diff.shape == (3,)
    for i in range(3):
        assert out.model_diff[i].item() == pytest.approx(
            python_mse(model[i], target[i]) - python_mse(model[i + 3], target[i + 3]), rel=1e-5)
    all_model = sum(python_mse(model[i], target[i]) for i in range(6)) / 6
    assert out.raw_model_loss.item() == pytest.approx(all_model, rel=1e-5)
    assert out.raw_ref_loss.item() == pytest.approx(sum(python_mse(ref[i], target[i]) for i in range(6)) / 6, rel=1e-5)


def test_policy_equal_reference_gives_log2_and_half_accuracy():
    model, _, target = batch(num_pairs=8)
    out = diffusion_dpo_loss(model, model.clone(), target, beta=5000.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.implicit_acc.item() == 0.5
    assert torch.count_nonzero(out.logits) == 0


def test_swapping_winner_and_loser_flips_logit_sign():
    model, ref, target = batch(num_pairs=4)
    swap = lambda t: torch.cat(t.chunk(2)[::-1])  # noqa: E731
    a = diffusion_dpo_loss(model, ref, target, beta=100.0)
    b = diffusion_dpo_loss(swap(model), swap(ref), swap(target), beta=100.0)
    torch.testing.assert_close(b.logits, -a.logits)
    assert a.implicit_acc.item() + b.implicit_acc.item() == pytest.approx(1.0)


def test_diffusers_sd_script_beta_is_half_of_ours():
    """The diffusers SD script: -logsigmoid(beta_dpo * (ref_diff - model_diff)) with beta_dpo = beta / 2."""
    model, ref, target = batch()
    out = diffusion_dpo_loss(model, ref, target, beta=5000.0)
    theirs = -F.logsigmoid(2500.0 * (out.ref_diff - out.model_diff)).mean()
    torch.testing.assert_close(out.loss, theirs)


def test_mean_outside_differs_from_legacy_mean_inside():
    model, ref, target = batch(num_pairs=6)
    paper = diffusion_dpo_loss(model, ref, target, beta=500.0).loss
    legacy = diffusion_dpo_loss(model, ref, target, beta=500.0, loss_type="legacy_mean_inside").loss
    assert paper.item() > legacy.item()  # Jensen: mean of a convex function >= function of the mean


def test_gradient_flows_only_through_the_policy():
    model, ref, target = batch()
    model.requires_grad_(True)
    ref.requires_grad_(True)
    diffusion_dpo_loss(model, ref, target, beta=10.0).loss.backward()
    assert model.grad is not None and model.grad.abs().sum() > 0
    assert ref.grad is None


def test_bad_inputs_are_rejected_with_clear_errors():
    model, ref, target = batch()
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        diffusion_dpo_loss(model, ref, target, loss_type="dpo")
    with pytest.raises(ValueError, match="beta must be > 0"):
        diffusion_dpo_loss(model, ref, target, beta=0)
    with pytest.raises(ValueError, match="2B rows"):
        diffusion_dpo_loss(model[:3], ref[:3], target[:3])
    with pytest.raises(ValueError, match="needs ref_pred"):
        diffusion_dpo_loss(model, None, target)
    assert diffusion_dpo_loss(model, None, target, loss_type="sft").loss > 0


def test_sft_loss_from_the_winners_equals_the_full_batch_sft_loss():
    from dpo_tutorial.loss import sft_loss

    g = torch.Generator().manual_seed(3)
    model, target = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 4, 4, 4, generator=g)  # (2B, ...), B = 4
    full = diffusion_dpo_loss(model, None, target, loss_type="sft")
    half = sft_loss(model[:4], target[:4])
    assert half.loss.item() == full.loss.item()  # the same numbers, the same reduction
    torch.testing.assert_close(half.model_mse_w, full.model_mse_w, rtol=0, atol=0)
    assert half.raw_model_loss.item() == pytest.approx(full.model_mse_w.mean().item(), rel=1e-6)
    for name in ("model_diff", "ref_diff", "logits", "model_mse_l", "implicit_acc", "raw_ref_loss"):
        assert torch.isnan(getattr(half, name)).all(), name
