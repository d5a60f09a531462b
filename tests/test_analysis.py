"""dpo_tutorial.analysis against independent computations: the notebooks' measurements on a tiny stand-in SD, and the
one-dimensional diffusion model of notebook 00 (exact log-likelihood, ELBO and gap against the data's own density,
ancestral samples and importance sampling)."""
from __future__ import annotations

import math

import pytest
import torch

from dpo_tutorial import analysis
from dpo_tutorial.analysis import (GaussianChain, gaussian_log_density, logit_variance_table, per_pair_errors,
                                   policy_reference_draws, variance_ratio)
from dpo_tutorial.data import PairStream, PairTransform, load_pickapic
from dpo_tutorial.models import add_lora, load_parts


@pytest.fixture(scope="module")
def moved_lora(sd_dir):
    """The tiny SD with a LoRA whose B matrices were moved off zero (a stand-in for a trained policy)."""
    parts = load_parts(str(sd_dir))
    params = add_lora(parts.unet, rank=4, init_seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn_like(p))
    return parts


@pytest.fixture(scope="module")
def batch(pairs_parquet):
    return next(iter(PairStream(load_pickapic(str(pairs_parquet)), PairTransform(32, random_flip=False), 5, seed=0)))


@pytest.mark.parametrize("measure", [
    lambda parts, batch: analysis.model_diff_draws(parts, parts.unet, batch, 2),
    lambda parts, batch: analysis.logit_draws(parts, parts.unet, batch, 2, 100.0),
    lambda parts, batch: analysis.mse_by_timestep(parts, parts.unet, batch, [10, 900], num_draws=1),
    lambda parts, batch: analysis.per_pair_errors(parts, parts.unet, batch, timestep=500),
    lambda parts, batch: analysis.pair_errors(parts, parts.unet, batch, num_draws=2),
    lambda parts, batch: analysis.policy_reference_draws(parts, parts.unet, batch, 2),
], ids=["model_diff_draws", "logit_draws", "mse_by_timestep", "per_pair_errors", "pair_errors",
        "policy_reference_draws"])
def test_every_measurement_runs_the_unet_without_building_a_graph(moved_lora, batch, monkeypatch, measure):
    """A measurement only reads the model: no UNet pass may record autograd history for the LoRA's trainable
    weights (mse_by_timestep once lost its ``no_grad`` when a neighbouring function was removed)."""
    seen = []
    real = analysis.noisy_prediction

    def spy(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis, "noisy_prediction", spy)
    measure(moved_lora, batch)
    assert seen and not any(seen)


def test_variance_ratio_is_the_median_of_per_pair_variance_ratios():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 5, generator=g)                               # (draws, B)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert variance_ratio(base * scale, base) == pytest.approx(9.0)      # each pair's ratio is scale², median 3²
    by_hand = sorted((base[:, i] * scale[i] + 1.0).var().item() / base[:, i].var().item() for i in range(5))[2]
    assert variance_ratio(base * scale + 1.0, base) == pytest.approx(by_hand)  # a shift changes no variance
    with pytest.raises(ValueError):
        variance_ratio(base[:, :3], base)


def test_variance_ratio_matches_the_table(moved_lora, batch):
    table = logit_variance_table(moved_lora, moved_lora.unet, batch, num_draws=4, beta=500.0)
    base = table["everything shared"]["draws"]
    for row in table.values():
        assert variance_ratio(row["draws"], base) == pytest.approx(row["variance_ratio_median"])


def test_policy_reference_draws_at_initialisation_are_equal(sd_dir, batch):
    """A zero-initialised LoRA: the policy is the reference, so every image's two errors are equal at every draw."""
    parts = load_parts(str(sd_dir))
    add_lora(parts.unet, rank=4, init_seed=0)
    out = policy_reference_draws(parts, parts.unet, batch, num_draws=3)
    assert out["policy"].shape == out["reference"].shape == out["timesteps"].shape == (3, 10)
    assert torch.equal(out["policy"], out["reference"])


def test_policy_reference_draws_share_each_pairs_draw(moved_lora, batch):
    """The first draw is the one per_pair_errors takes from the same seed (its own code path), and every draw gives
    a pair's winner (row i) and loser (row i + B) one timestep."""
    out = policy_reference_draws(moved_lora, moved_lora.unet, batch, num_draws=3, seed=7)
    first = per_pair_errors(moved_lora, moved_lora.unet, batch, seed=7)
    torch.testing.assert_close(out["policy"][0], torch.cat([first["policy_w"], first["policy_l"]]))
    torch.testing.assert_close(out["reference"][0], torch.cat([first["ref_w"], first["ref_l"]]))
    assert torch.equal(out["timesteps"][:, :5], out["timesteps"][:, 5:])
    assert not torch.equal(out["policy"], out["reference"])              # the moved LoRA changes the errors
    assert not torch.equal(out["timesteps"][0], out["timesteps"][1])     # a new draw each time


def test_lora_weight_change_is_zero_at_initialisation_and_the_norm_of_b_times_a(sd_dir, tmp_path):
    """Read from the exported diffusers file; compared with the adapter's own peft matrices (scale α/r = 1)."""
    from dpo_tutorial.analysis import lora_weight_change
    from dpo_tutorial.models import export_lora

    parts = load_parts(str(sd_dir))
    add_lora(parts.unet, rank=4, init_seed=0)
    export_lora(parts.unet, tmp_path / "init", is_sdxl=False)
    assert lora_weight_change(tmp_path / "init") == 0.0                  # B = 0: the policy is the reference
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in parts.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    export_lora(parts.unet, tmp_path / "moved", is_sdxl=False)
    params = dict(parts.unet.named_parameters())
    by_hand = sum((params[n.replace("lora_A", "lora_B")] @ a).pow(2).sum().item()
                  for n, a in params.items() if "lora_A" in n) ** 0.5
    assert by_hand > 0 and lora_weight_change(tmp_path / "moved") == pytest.approx(by_hand, rel=1e-5)


def test_lora_weight_change_applies_a_stored_alpha(tmp_path):
    from safetensors.torch import save_file

    from dpo_tutorial.analysis import lora_weight_change

    down, up = torch.ones(2, 3), torch.full((4, 2), 0.5)                 # B·A: a (4, 3) matrix of ones
    save_file({"unet.x.lora.down.weight": down, "unet.x.lora.up.weight": up, "unet.x.alpha": torch.tensor(4.0)},
              str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert lora_weight_change(tmp_path) == pytest.approx(2.0 * 12 ** 0.5)  # α/r = 2, ‖ones(4, 3)‖ = √12
    save_file({"unet.x.weight": down}, str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match="no LoRA"):
        lora_weight_change(tmp_path)


# ------------------------------------------------------------------ notebook 00's one-dimensional model
BETAS = torch.linspace(0.05, 0.7, 10, dtype=torch.float64)


def test_the_exact_reverse_of_standard_normal_data_has_no_elbo_gap():
    """Data N(0, 1) makes x_T exactly N(0, 1), so the exact reverse chain is q's own posterior: every noising chain's
    log-ratio log p(x_{0:T}) - log q(x_{1:T}|x_0) equals log N(x_0; 0, 1), with no spread and no gap."""
    model = GaussianChain.exact_reverse(BETAS, data_mean=0.0, data_var=1.0)
    x0 = torch.tensor([-1.5, 0.0, 0.7], dtype=torch.float64)
    want = -0.5 * (math.log(2 * math.pi) + x0 ** 2)
    torch.testing.assert_close(model.log_likelihood(x0), want)
    ratios = model.log_ratios(model.forward_chains(x0, 64, torch.Generator().manual_seed(0)))  # (64, 3)
    torch.testing.assert_close(ratios, want.expand_as(ratios), rtol=0, atol=1e-10)


def test_log_likelihood_is_the_density_of_ancestral_samples():
    """Sampling the reverse chain step by step (written out here) gives x_0 with the mean and variance that
    log_likelihood's Gaussian has (read off its curvature and slope)."""
    model = GaussianChain.exact_reverse(BETAS, data_mean=0.5, data_var=0.25, shift=0.3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g, dtype=torch.float64)  # x_T
    for t in reversed(range(len(BETAS))):
        x = model.a[t] * x + model.c[t] + model.v[t].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    lp = model.log_likelihood(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    var = -1 / (lp[0] + lp[2] - 2 * lp[1])  # a Gaussian's log-density has second difference -1/var at spacing 1
    mean = var * (lp[2] - lp[0]) / 2  # and slope mean/var at 0
    assert abs(x.mean() - mean) < 4 * math.sqrt(var / len(x))
    assert abs(x.var() / var - 1) < 4 * math.sqrt(2 / len(x))


def test_the_elbo_lies_below_and_importance_sampling_recovers_the_log_likelihood():
    model = GaussianChain.exact_reverse(BETAS, data_mean=0.5, data_var=0.25, shift=0.4)
    x0 = torch.linspace(-2, 2, 9, dtype=torch.float64)
    ratios = model.log_ratios(model.forward_chains(x0, 20_000, torch.Generator().manual_seed(1)))  # (20000, 9)
    log_p = model.log_likelihood(x0)
    assert (ratios.mean(0) < log_p - 0.1).all()  # a real gap for a model whose every step is off
    torch.testing.assert_close(ratios.logsumexp(0) - math.log(len(ratios)), log_p, rtol=0, atol=0.03)


def test_forward_chains_have_the_noising_marginals():
    """x_t given x_0 is N(sqrt(abar_t) x_0, 1 - abar_t)."""
    model = GaussianChain.exact_reverse(BETAS)
    chains = model.forward_chains(torch.tensor([2.0], dtype=torch.float64), 100_000, torch.Generator().manual_seed(2))
    abar = torch.cumprod(1 - BETAS, 0)
    assert chains.shape == (100_000, 1, 11) and (chains[:, 0, 0] == 2.0).all()
    for t in (1, 5, 10):
        x_t = chains[:, 0, t]
        assert abs(x_t.mean() - 2 * abar[t - 1].sqrt()) < 0.01
        assert abs(x_t.var() / (1 - abar[t - 1]) - 1) < 0.02


def test_gaussian_log_density_integrates_to_one():
    x = torch.linspace(-20, 20, 40_001, dtype=torch.float64)
    density = gaussian_log_density(x, torch.tensor(1.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)).exp()
    assert abs(torch.trapezoid(density, x).item() - 1) < 1e-9
