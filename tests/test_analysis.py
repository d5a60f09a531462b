"""The one-dimensional diffusion model of notebook 00: exact log-likelihood, ELBO and gap, each checked against an
independent computation (the data's own density, ancestral samples, importance sampling)."""
import math

import torch

from dpo_tutorial.analysis import GaussianChain, gaussian_log_density

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
