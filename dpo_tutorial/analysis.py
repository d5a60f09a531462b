"""Measurements the notebooks show: which sharing of ε and t buys what, errors by noise level, per-pair errors.
(The first optimizer steps of a fresh run are measured by :func:`dpo_tutorial.train.first_steps`.)"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .loss import pair_mse, per_sample_mse
from .models import DiffusionParts, reference_mode
from .run_dir import LORA_FILE
from .step import EncodedBatch, draw_noise, encode_batch, noisy_prediction


def seeded_encoding(parts: DiffusionParts, batch: dict, seed: int) -> tuple[torch.Generator, EncodedBatch]:
    """A generator seeded with ``seed`` on the models' device and the batch encoded with it (latents
    ``(2B, C, h, w)``, embeddings ``(2B, L, D)``): the start of every measurement here, so each is reproducible."""
    g = torch.Generator(parts.vae.device).manual_seed(seed)
    return g, encode_batch(parts, batch, g)


@torch.no_grad()
def model_diff_draws(parts: DiffusionParts, unet, batch: dict, num_draws: int, share_noise: bool = True,
                     share_timesteps: bool = True, seed: int = 0) -> torch.Tensor:
    """``(num_draws, B)`` one-draw estimates of each pair's ``model_diff = mse(x_w) - mse(x_l)``.

    ``share_noise`` / ``share_timesteps``: winner and loser get the same ε / the same t (the recipe
    shares both); otherwise each image draws its own. The
    latents are encoded once; the target is the model's own (ε or v), as in training.
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    steps = parts.noise_scheduler.config.num_train_timesteps
    latents = encoded.latents
    out = []
    for _ in range(num_draws):
        noise, t = draw_noise(parts, encoded, g)  # (2B, C, h, w), (2B,): halves identical
        if not share_noise:
            noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        if not share_timesteps:
            t = torch.randint(0, steps, (latents.shape[0],), generator=g, device=latents.device)
        mse_w, mse_l = pair_mse(*noisy_prediction(parts, unet, encoded, noise, t))
        out.append(mse_w - mse_l)
    return torch.stack(out)  # (num_draws, B)


# How the one-draw estimate of a pair's logit draws its noise and timesteps. ``pair``: winner and loser share ε and t
# (the repeat trick); ``ref_noise`` / ``ref_t``: the reference pass sees the policy's ε / t (the same x_t).
COUPLINGS = {
    "everything shared": dict(pair=True, ref_noise=True, ref_t=True),
    "winner and loser apart": dict(pair=False, ref_noise=True, ref_t=True),
    "reference: own ε": dict(pair=True, ref_noise=False, ref_t=True),
    "reference: own t": dict(pair=True, ref_noise=True, ref_t=False),
    "reference: own ε and t": dict(pair=True, ref_noise=False, ref_t=False),
}


def _draw(parts: DiffusionParts, encoded: EncodedBatch, g: torch.Generator, pair: bool):
    """One ``(2B, C, h, w)`` noise and ``(2B,)`` timesteps: shared by each pair's two images, or each image its own."""
    if pair:
        return draw_noise(parts, encoded, g)
    latents = encoded.latents
    steps = parts.noise_scheduler.config.num_train_timesteps
    return (torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype),
            torch.randint(0, steps, (latents.shape[0],), generator=g, device=latents.device))


@torch.no_grad()
def logit_draws(parts: DiffusionParts, unet, batch: dict, num_draws: int, beta: float, pair: bool = True,
                ref_noise: bool = True, ref_t: bool = True, seed: int = 0) -> torch.Tensor:
    r"""``(num_draws, B)`` one-draw estimates of each pair's logit :math:`z = -\tfrac{\beta}{2}(\text{model\_diff} -
    \text{ref\_diff})`: the quantity the loss sees (Wallace et al. Eq. 14), ``unet`` carrying a LoRA (the policy) and
    the reference being the same UNet with it off.

    ``pair``: winner and loser share their ε and t (else each image draws its own); ``ref_noise`` / ``ref_t``: the
    reference sees the policy's ε / t (else it draws its own, coupled within the pair in the same way).
    :data:`COUPLINGS` names the ways the notebooks compare. The expectation of :math:`z` is the same for all of them;
    what the coupling changes is how far one draw strays from it.
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    out = []
    for _ in range(num_draws):
        noise, t = _draw(parts, encoded, g, pair)
        own_noise, own_t = _draw(parts, encoded, g, pair)  # drawn every time, so the stream of draws is the same
        policy_w, policy_l = pair_mse(*noisy_prediction(parts, unet, encoded, noise, t))
        with reference_mode(unet):
            ref_w, ref_l = pair_mse(*noisy_prediction(parts, unet, encoded, noise if ref_noise else own_noise,
                                                      t if ref_t else own_t))
        out.append(-0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l)))  # (B,)
    return torch.stack(out)  # (num_draws, B)


def logit_variance_table(parts: DiffusionParts, unet, batch: dict, num_draws: int, beta: float,
                         seed: int = 0) -> dict[str, dict]:
    """For each way of drawing (:data:`COUPLINGS`): the per-pair variance of the one-draw logit estimate relative to
    sharing everything (median over pairs, and pooled over pairs), the mean logit, and the ``(num_draws, B)`` draws."""
    draws = {name: logit_draws(parts, unet, batch, num_draws, beta, seed=seed, **coupling)
             for name, coupling in COUPLINGS.items()}
    base = draws["everything shared"]
    return {name: {"variance_ratio_median": variance_ratio(d, base),
                   "variance_ratio_pooled": float((d - d.mean(0)).pow(2).mean() / (base - base.mean(0)).pow(2).mean()),
                   "mean_logit": float(d.mean()), "draws": d}
            for name, d in draws.items()}


@torch.no_grad()
def mse_by_timestep(parts: DiffusionParts, unet, batch: dict, timesteps: list[int], num_draws: int = 4,
                    seed: int = 0) -> list[float]:
    """Mean per-element MSE of ``unet``'s prediction over the batch's images, at each fixed ``t``.

    For an ε-prediction model the error is largest at small t (little noise to find in a nearly clean
    image) and smallest at large t (the input is almost all noise, so ε is easy to read off).
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    out = []
    for step in timesteps:
        t = torch.full((encoded.latents.shape[0],), int(step), device=encoded.latents.device, dtype=torch.long)
        total = 0.0
        for _ in range(num_draws):
            noise = torch.randn(encoded.latents.shape, generator=g, device=encoded.latents.device,
                                dtype=encoded.latents.dtype)
            pred, target = noisy_prediction(parts, unet, encoded, noise, t)
            total += per_sample_mse(pred, target).mean().item() / num_draws
        out.append(total)
    return out


@torch.no_grad()
def per_pair_errors(parts: DiffusionParts, unet, batch: dict, timestep: int | None = None, seed: int = 0) -> dict:
    """One shared (ε, t) draw per pair; the ``(B,)`` per-element MSEs of winners and losers under the
    policy (LoRA on) and the reference (LoRA off), and the ``(2B, ...)`` predictions and target they
    come from (so a caller can feed the same tensors to :func:`dpo_tutorial.loss.diffusion_dpo_loss`).

    ``timestep``: one fixed t for every pair (e.g. 500), else each pair draws its own.
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    noise, t = draw_noise(parts, encoded, g)  # (2B, C, h, w), (2B,): shared within each pair
    if timestep is not None:
        t = torch.full_like(t, int(timestep))
    return _policy_and_reference(parts, unet, encoded, noise, t)


def _policy_and_reference(parts: DiffusionParts, unet, encoded, noise: torch.Tensor, t: torch.Tensor) -> dict:
    """Policy and reference predictions at one shared (ε, t), and their ``(B,)`` winner / loser MSEs."""
    policy, target = noisy_prediction(parts, unet, encoded, noise, t)
    with reference_mode(unet):
        reference, _ = noisy_prediction(parts, unet, encoded, noise, t)
    policy_w, policy_l = pair_mse(policy, target)
    ref_w, ref_l = pair_mse(reference, target)
    return {"policy_w": policy_w, "policy_l": policy_l, "ref_w": ref_w, "ref_l": ref_l,
            "policy_pred": policy, "ref_pred": reference, "target": target}


@torch.no_grad()
def pair_errors(parts: DiffusionParts, unet, batch: dict, num_draws: int = 8, seed: int = 0) -> dict:
    """Mean MSE of winners and losers under the policy (LoRA on) and the reference (LoRA off).

    The same shared noise/timestep draws are used for both, so the numbers are directly comparable.
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    sums = {k: 0.0 for k in ("policy_w", "policy_l", "ref_w", "ref_l")}
    for _ in range(num_draws):
        errors = _policy_and_reference(parts, unet, encoded, *draw_noise(parts, encoded, g))
        for k in sums:
            sums[k] += errors[k].mean().item() / num_draws
    return sums


# ------------------------------------------------------------------ a diffusion model small enough to compute exactly
@dataclass
class GaussianChain:
    r"""A one-dimensional diffusion model in which log-likelihood, ELBO and their gap can all be computed.

    Forward (noising) steps :math:`q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{1-\beta_t}\,x_{t-1},\ \beta_t)` for
    :math:`t = 1..T`; the model's reverse steps :math:`p(x_{t-1} \mid x_t) = \mathcal N(a_t x_t + c_t,\ v_t)`, started
    from :math:`p(x_T) = \mathcal N(0, 1)`. Every step is linear-Gaussian, so the model's own
    :math:`p(x_0)` is a Gaussian (:meth:`log_likelihood`, exact), while chains drawn from q give the ELBO
    :math:`\mathbb E_q[\log p(x_{0:T}) - \log q(x_{1:T} \mid x_0)] \le \log p(x_0)` by Monte Carlo
    (:meth:`forward_chains`, :meth:`log_ratios`). The gap is :math:`\mathrm{KL}(q(x_{1:T} \mid x_0)\,\|\,p(x_{1:T} \mid x_0))`.
    """

    betas: torch.Tensor  # (T,) the forward schedule β_1..β_T (float64)
    a: torch.Tensor  # (T,) reverse step t: mean a_t x_t + c_t ...
    c: torch.Tensor  # (T,)
    v: torch.Tensor  # (T,) ... and variance v_t

    @classmethod
    def exact_reverse(cls, betas, data_mean: float = 0.0, data_var: float = 1.0, shift: float = 0.0) -> "GaussianChain":
        r"""The model whose every reverse step is the Gaussian :math:`q(x_{t-1} \mid x_t)` of data
        :math:`x_0 \sim \mathcal N(m, s^2)` (``data_mean``, ``data_var``), with each step's mean moved by ``shift``.

        With :math:`V_t = \bar\alpha_t s^2 + 1 - \bar\alpha_t` the variance of :math:`x_t`:
        :math:`a_t = \sqrt{\alpha_t}\,V_{t-1}/V_t`, :math:`c_t = \sqrt{\bar\alpha_{t-1}}\,m - a_t\sqrt{\bar\alpha_t}\,m`,
        :math:`v_t = \beta_t V_{t-1}/V_t`. ``shift = 0`` is a perfect model of that data (up to :math:`p(x_T)`, which is
        exact when :math:`m = 0, s^2 = 1`); any other shift makes every step a little wrong.
        """
        betas = torch.as_tensor(betas, dtype=torch.float64)  # (T,)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)  # (T,) ᾱ_1..ᾱ_T
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])  # (T,) ᾱ_0..ᾱ_{T-1}
        var, var_prev = abar * data_var + 1 - abar, abar_prev * data_var + 1 - abar_prev  # (T,) V_t, V_{t-1}
        a = alphas.sqrt() * var_prev / var  # Cov(x_{t-1}, x_t) / Var(x_t)
        c = abar_prev.sqrt() * data_mean - a * abar.sqrt() * data_mean + shift
        return cls(betas, a, c, betas * var_prev / var)

    @property
    def num_steps(self) -> int:
        """T, the number of noising steps."""
        return self.betas.shape[0]

    def log_likelihood(self, x0: torch.Tensor) -> torch.Tensor:
        r"""Exact :math:`\log p(x_0)` of the ``(N,)`` points: the reverse chain's marginal, a Gaussian whose mean and
        variance run back from :math:`(0, 1)` at :math:`x_T` through :math:`m \leftarrow a_t m + c_t`,
        :math:`V \leftarrow a_t^2 V + v_t`."""
        mean, var = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        for t in reversed(range(self.num_steps)):
            mean, var = self.a[t] * mean + self.c[t], self.a[t] ** 2 * var + self.v[t]
        return gaussian_log_density(torch.as_tensor(x0, dtype=torch.float64), mean, var)  # (N,)

    def forward_chains(self, x0: torch.Tensor, num_chains: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""``num_chains`` noising chains :math:`x_{1:T} \sim q(\cdot \mid x_0)` from each of the ``(N,)`` points:
        ``(num_chains, N, T + 1)``, ``[..., 0]`` being :math:`x_0` itself."""
        x0 = torch.as_tensor(x0, dtype=torch.float64)
        xs = [x0.expand(num_chains, -1)]  # (num_chains, N) each
        for beta in self.betas:
            noise = torch.randn(xs[-1].shape, generator=generator, dtype=torch.float64)
            xs.append((1 - beta).sqrt() * xs[-1] + beta.sqrt() * noise)
        return torch.stack(xs, dim=-1)  # (num_chains, N, T + 1)

    def log_ratios(self, chains: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x_{0:T}) - \log q(x_{1:T} \mid x_0)` of each chain of :meth:`forward_chains`: ``(num_chains, N)``.

        Their mean over the chains is the ELBO; the log of their mean of exponentials is :math:`\log p(x_0)`
        (importance sampling), which Jensen's inequality puts above the ELBO.
        """
        prev, nxt = chains[..., :-1], chains[..., 1:]  # (C, N, T): x_{t-1} and x_t
        log_p = gaussian_log_density(prev, self.a * nxt + self.c, self.v).sum(-1)  # Σ_t log p(x_{t-1} | x_t)
        standard = torch.ones((), dtype=torch.float64)  # p(x_T) = N(0, 1)
        log_p = log_p + gaussian_log_density(chains[..., -1], 0 * standard, standard)  # + log p(x_T)
        log_q = gaussian_log_density(nxt, (1 - self.betas).sqrt() * prev, self.betas).sum(-1)  # Σ_t log q(x_t | x_{t-1})
        return log_p - log_q  # (C, N)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \mathcal N(x;\ \text{mean}, \text{var})`, elementwise (broadcasting)."""
    return -0.5 * (torch.log(var) + (x - mean) ** 2 / var) - 0.5 * math.log(2 * math.pi)


def variance_ratio(draws: torch.Tensor, base: torch.Tensor) -> float:
    r"""How much noisier one way of drawing is than another, pair by pair: the median over pairs :math:`i` of
    :math:`\mathrm{Var}(\text{draws}_{\cdot i}) / \mathrm{Var}(\text{base}_{\cdot i})`, each variance over the
    ``num_draws`` one-draw estimates of pair :math:`i` (unbiased, ``N - 1`` in the denominator).

    ``draws``, ``base``: ``(num_draws, B)``, e.g. two entries' ``draws`` of :func:`logit_variance_table` (whose
    ``variance_ratio_median`` is this against ``everything shared``). The median is torch's: the lower of the two
    middle values when ``B`` is even.
    """
    if draws.dim() != 2 or draws.shape[1] != base.shape[1] or min(draws.shape[0], base.shape[0]) < 2:
        raise ValueError(f"expected (num_draws >= 2, B) draws of the same B pairs, got {tuple(draws.shape)} and "
                         f"{tuple(base.shape)}")
    return float((draws.var(dim=0) / base.var(dim=0)).median())


@torch.no_grad()
def policy_reference_draws(parts: DiffusionParts, unet, batch: dict, num_draws: int, seed: int = 0) -> dict:
    r"""Per image, the policy's and the reference's errors at the *same* draws: ``policy`` and ``reference``, each
    ``(num_draws, 2B)`` per-element MSEs :math:`\|\epsilon - \epsilon_\theta(x_t, t)\|^2 / d` (winners then losers),
    and the ``(num_draws, 2B)`` ``timesteps`` each draw used (one shared ε and t per pair, as in training).

    The two errors of an image rise and fall together with the draw (mostly with t); their difference, which is
    what enters the logit, keeps little of the draw's noise: the reference acts as a control variate.
    """
    g, encoded = seeded_encoding(parts, batch, seed)
    rows = {"policy": [], "reference": [], "timesteps": []}
    for _ in range(num_draws):
        noise, t = draw_noise(parts, encoded, g)  # (2B, C, h, w), (2B,)
        errors = _policy_and_reference(parts, unet, encoded, noise, t)
        rows["policy"].append(torch.cat([errors["policy_w"], errors["policy_l"]]).float().cpu())  # (2B,)
        rows["reference"].append(torch.cat([errors["ref_w"], errors["ref_l"]]).float().cpu())
        rows["timesteps"].append(t.cpu())
    return {key: torch.stack(values) for key, values in rows.items()}  # each (num_draws, 2B)


def lora_weight_change(lora_dir) -> float:
    r"""How far a saved LoRA moves the UNet's weights: :math:`\sqrt{\sum_\ell \|\Delta W_\ell\|_F^2}` over the adapted
    layers :math:`\ell`, with :math:`\Delta W_\ell = \tfrac{\alpha}{r}\,B_\ell A_\ell` (``lora.up`` times ``lora.down``
    in the diffusers file ``<lora_dir>/pytorch_lora_weights.safetensors``; :math:`\alpha/r = 1` when the file stores
    no alpha). It is 0 at initialisation (:math:`B = 0`) and contains no β: under AdamW it grows with the learning
    rate and the number of steps.
    """
    weights = load_file(str(Path(lora_dir) / LORA_FILE))
    total = 0.0
    for name, down in weights.items():
        if not name.endswith(("lora.down.weight", "lora_A.weight")):
            continue
        prefix = name.rsplit(".lora", 1)[0]
        up = weights[name.replace("lora.down", "lora.up").replace("lora_A", "lora_B")]
        rank = down.shape[0]
        alpha = weights.get(f"{prefix}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / rank
        delta = scale * up.float().reshape(up.shape[0], -1) @ down.float().reshape(rank, -1)  # (out, in)
        total += delta.pow(2).sum().item()
    if not total and not any(n.endswith(("lora.down.weight", "lora_A.weight")) for n in weights):
        raise ValueError(f"{Path(lora_dir) / LORA_FILE} holds no LoRA down/up (A/B) matrices")
    return math.sqrt(total)
