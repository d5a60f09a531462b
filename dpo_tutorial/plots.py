"""Every figure of the notebooks and of ``figures/`` (``dpo-tutorial figures`` regenerates them)."""
from __future__ import annotations

import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves
import numpy as np
import torch

from .data import decode_image, pair_order
from .loss import loss_from_logits, per_pair_weights


def logsigmoid_figure():
    """``-log σ(x)`` (the per-pair loss) and its slope ``σ(-x)`` (the per-pair weight of the gradient)."""
    x = torch.linspace(-8, 8, 401)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(x, -torch.nn.functional.logsigmoid(x), color="C0")
    ax[0].axhline(np.log(2), ls=":", color="grey")
    ax[0].text(-7.5, np.log(2) + 0.2, "log 2 at x = 0 (policy = reference)", fontsize=8)
    ax[0].set(title=r"loss $-\log\sigma(x)$", xlabel=r"$x = -\frac{\beta}{2}$(model_diff − ref_diff)")
    ax[1].plot(x, torch.sigmoid(-x), color="C1")
    ax[1].set(title=r"slope $\sigma(-x)$: how hard a pair still pulls", xlabel="x")
    fig.tight_layout()
    return fig


def beta_figure(delta_scale: float, betas=(500, 2000, 5000, 20000)):
    """Loss against ``model_diff - ref_diff`` for several β, on the scale the data actually has."""
    d = torch.linspace(-4 * delta_scale, 4 * delta_scale, 401)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for beta in betas:
        ax.plot(d, -torch.nn.functional.logsigmoid(-0.5 * beta * d), label=f"β = {beta}")
    ax.axvspan(-delta_scale, delta_scale, color="grey", alpha=0.15, label="typical |model_diff − ref_diff|")
    ax.set(xlabel="model_diff − ref_diff", ylabel="loss", title="β sets how far the policy may move")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_variants_figure():
    """The sigmoid (paper), hinge and IPO per-pair losses as functions of the logit."""
    z = torch.linspace(-4, 4, 401)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for kind in ("sigmoid", "hinge", "ipo"):
        ax.plot(z, [loss_from_logits(v.view(1), kind).item() for v in z], label=kind)
    ax.set(xlabel=r"logit $z = -\frac{\beta}{2}$(model_diff − ref_diff)", ylabel="per-pair loss", ylim=(0, 6))
    ax.legend()
    fig.tight_layout()
    return fig


def geometry_figure(eps, pred_w, pred_l, ref_w, ref_l, title: str = "model_diff vs ref_diff"):
    """2-D picture: the true noise ε, policy and reference predictions for winner and loser, errors as segments.

    Arguments are 2-vectors (already projected). ``model_diff = |pred_w-ε|² - |pred_l-ε|²`` and the same
    for the reference; the loss pushes the policy's winner prediction toward ε and its loser's away.
    """
    pts = {"ε (true noise)": (eps, "k", "*"), "policy, winner": (pred_w, "C2", "o"), "policy, loser": (pred_l, "C3", "o"),
           "reference, winner": (ref_w, "C2", "s"), "reference, loser": (ref_l, "C3", "s")}
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, (p, c, m) in pts.items():
        ax.scatter(*p, color=c, marker=m, s=90 if m == "*" else 50, label=name, zorder=3,
                   facecolors="none" if m == "s" else c)
        if name != "ε (true noise)":
            ax.plot([eps[0], p[0]], [eps[1], p[1]], color=c, ls="-" if "policy" in name else ":", lw=1)
    sq = lambda p: float(((np.asarray(p) - np.asarray(eps)) ** 2).sum())  # noqa: E731
    model_diff, ref_diff = sq(pred_w) - sq(pred_l), sq(ref_w) - sq(ref_l)
    ax.annotate("", xy=eps, xytext=pred_w, arrowprops=dict(arrowstyle="->", color="C2", alpha=0.5))
    ax.set_title(f"{title}\nmodel_diff = {model_diff:.3f}, ref_diff = {ref_diff:.3f}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    return fig


def pair_errors_figure(ref_w, ref_l, policy_w, policy_l, title: str = "each pair: winner's error vs loser's"):
    """Exact picture of ``model_diff`` and ``ref_diff``: each pair is a point (winner's MSE, loser's MSE).

    ``(B,)`` arrays of per-element MSEs for the reference (hollow) and the policy (filled), an arrow from
    one to the other per pair. The diagonal is ``diff = 0``; a point's signed distance *below* it is
    ``(mse_w − mse_l)/√2``, so an arrow that moves the point up and to the left, across or away from the
    diagonal on the loser's side, means ``model_diff < ref_diff``: the policy fits the winner better
    *relative to* the loser, which is what the loss rewards, even when both errors grew (arrows up and
    right). No projection: every coordinate is a true value.
    """
    ref_w, ref_l, policy_w, policy_l = (np.asarray(v, float) for v in (ref_w, ref_l, policy_w, policy_l))
    better = (policy_w - policy_l) < (ref_w - ref_l)  # model_diff < ref_diff: the direction the loss pushes
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    for i in range(len(ref_w)):
        ax.annotate("", xy=(policy_w[i], policy_l[i]), xytext=(ref_w[i], ref_l[i]),
                    arrowprops=dict(arrowstyle="->", color="C2" if better[i] else "C3", alpha=0.6, lw=0.8))
    ax.scatter(ref_w, ref_l, facecolors="none", edgecolors="0.4", s=25, label="reference (LoRA off)")
    ax.scatter(policy_w, policy_l, color="C0", s=12, label="policy (LoRA on)")
    top = max(ref_w.max(), ref_l.max(), policy_w.max(), policy_l.max()) * 1.05
    ax.plot([0, top], [0, top], color="k", lw=0.8, ls=":", label="mse_w = mse_l (diff = 0)")
    ax.set(xlabel="winner's per-element MSE  mse(x_w)", ylabel="loser's per-element MSE  mse(x_l)",
           xlim=(0, top), ylim=(0, top))
    ax.set_title(f"{title}\ngreen: model_diff < ref_diff ({int(better.sum())} of {len(better)} pairs)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def _clipped_bins(values: np.ndarray, low: float, high: float, n: int = 50) -> np.ndarray:
    """``n`` equal bins over the ``low``-``high`` percentiles of ``values`` (outliers left off the axis)."""
    lo, hi = np.percentile(values, [low, high])
    return np.linspace(lo, hi, n + 1) if hi > lo else np.linspace(lo - 1e-6, hi + 1e-6, n + 1)


def spread_figure(shared: np.ndarray, independent: np.ndarray):
    """Histograms of per-pair ``model_diff`` estimates with shared vs independent noise and timesteps.

    The independent estimates have long tails, so one axis over their full range squeezes the shared ones
    into a single bar: the left panel spans the independent estimates' 1st-99th percentiles, the right one
    zooms on the shared estimates' 0.5th-99.5th.
    """
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    panels = [(_clipped_bins(independent, 1, 99), "both, on the independent estimates' scale"),
              (_clipped_bins(shared, 0.5, 99.5), "zoomed on the shared estimates")]
    for a, (bins, title) in zip(ax, panels):
        inside = lambda v: v[(v >= bins[0]) & (v <= bins[-1])]  # noqa: E731
        a.hist(inside(independent), bins=bins, alpha=0.6, color="C0",
               label=f"independent (sd {independent.std():.3g})")
        a.hist(inside(shared), bins=bins, alpha=0.6, color="C1", label=f"shared (sd {shared.std():.3g})")
        left_off = len(independent) + len(shared) - len(inside(independent)) - len(inside(shared))
        a.set(xlabel="model_diff estimate (one draw, centred per pair)", ylabel="count",
              title=f"{title}\n({left_off} estimates beyond the axis)")
        a.title.set_fontsize(9)
        a.legend(fontsize=8)
    fig.suptitle(f"variance ratio independent / shared = {independent.var() / shared.var():.1f}", fontsize=10)
    fig.tight_layout()
    return fig


def smooth(values, window: int | None = None) -> np.ndarray:
    """Centred moving average of ``values`` over ``window`` steps (default: 1/20 of them, odd); the window
    shrinks at both ends, so the result has the same length and no edge dip."""
    v = np.asarray(values, dtype=float)
    window = max(1, len(v) // 20) if window is None else window
    window = min(window | 1, len(v) - (1 - len(v) % 2)) if len(v) else 1
    if window <= 1:
        return v
    kernel = np.ones(window)
    return np.convolve(v, kernel, mode="same") / np.convolve(np.ones_like(v), kernel, mode="same")


def _raw_and_smoothed(ax, steps, values, color: str, label: str = "") -> None:
    """The per-step values faint, their moving average bold, in one colour."""
    ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
    ax.plot(steps, smooth(values), color=color, lw=1.8, label=label or None)


def training_figure(history):
    """Loss, implicit accuracy, reward margin and raw MSEs of a :class:`History`: each step faint, the
    moving average over 1/20 of the run bold (one batch's value is mostly noise)."""
    steps = history["step"]
    window = max(1, len(steps) // 20) | 1
    fig, ax = plt.subplots(2, 2, figsize=(9, 5.6))  # 2 x 2: readable at the width GitHub shows a notebook
    ax = ax.ravel()
    _raw_and_smoothed(ax[0], steps, history["loss"], "C0")
    ax[0].axhline(np.log(2), ls=":", color="grey")
    ax[0].set(title="loss (log 2 = no preference)")
    _raw_and_smoothed(ax[1], steps, history["implicit_acc"], "C0")
    ax[1].axhline(0.5, ls=":", color="grey")
    ax[1].set(title="implicit accuracy (batch)")
    _raw_and_smoothed(ax[2], steps, history["reward_margin"], "C0")
    ax[2].axhline(0.0, ls=":", color="grey")
    ax[2].set(title="reward margin")
    for key, color, label in (("model_mse_w", "C2", "policy, winners"), ("model_mse_l", "C3", "policy, losers"),
                              ("raw_ref_loss", "C7", "reference, all")):
        _raw_and_smoothed(ax[3], steps, history[key], color, label)
    ax[3].set(title="raw MSE")
    ax[3].legend(fontsize=8)
    for a in ax[2:]:
        a.set_xlabel("step")
    fig.suptitle(f"faint: each step; bold: moving average over {window} steps", fontsize=9)
    fig.tight_layout()
    return fig


def denoising_error_figure(history):
    """The policy's and the reference's denoising error over a run, winners and losers apart (each step faint, a
    moving average bold): DPO widens the gap between winners and losers relative to the reference, and both of the
    policy's errors may grow while it does."""
    steps = history["step"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for a, side, name in ((ax[0], "w", "winners"), (ax[1], "l", "losers")):
        _raw_and_smoothed(a, steps, history[f"model_mse_{side}"], "C2" if side == "w" else "C3", "policy (LoRA on)")
        _raw_and_smoothed(a, steps, history[f"ref_mse_{side}"], "C7", "reference (LoRA off)")
        a.set(title=f"{name}: per-element error on the step's batch", xlabel="step")
        a.legend(fontsize=8)
    ax[0].set_ylabel("MSE")
    fig.tight_layout()
    return fig


def grid_figure(base: np.ndarray, dpo: np.ndarray, captions: list[str], base_scores=None, dpo_scores=None):
    """Base (top) vs DPO (bottom) images for the same captions and seeds, with judge scores if given."""
    n = len(captions)
    fig, ax = plt.subplots(2, n, figsize=(1.5 * n, 3.6), squeeze=False)
    for i in range(n):
        for row, (imgs, scores, name) in enumerate([(base, base_scores, "base"), (dpo, dpo_scores, "DPO")]):
            ax[row, i].imshow(imgs[i])
            ax[row, i].set_xticks([]), ax[row, i].set_yticks([])
            label = f"{scores[i]:.2f}" if scores is not None else ""
            ax[row, i].set_title(label, fontsize=8)
            if i == 0:
                ax[row, i].set_ylabel(name)
        ax[1, i].set_xlabel(captions[i].replace("a ", ""), fontsize=8)
    fig.tight_layout()
    return fig


def pairs_figure(rows: list[dict], max_pairs: int = 6):
    """Pick-a-Pic rows as a grid: ``jpg_0`` left, ``jpg_1`` right, the preferred image framed in green."""
    rows = rows[:max_pairs]
    fig, ax = plt.subplots(len(rows), 2, figsize=(3.2, 1.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        order = pair_order(row["label_0"])
        for c, key in enumerate(("jpg_0", "jpg_1")):
            a = ax[r, c]
            a.imshow(decode_image(row[key]))
            a.set_xticks([]), a.set_yticks([])
            won = order == str(c)
            for spine in a.spines.values():
                spine.set_color("green" if won else "lightgrey")
                spine.set_linewidth(4 if won else 1)
            a.set_title(f"{key}  label_{c}={row[f'label_{c}'] if f'label_{c}' in row else ''}", fontsize=7)
        ax[r, 0].set_ylabel(row["caption"][:24], fontsize=7)
    fig.tight_layout()
    return fig


def batch_figure(pixel_values: torch.Tensor, captions: list[str]):
    """A winners-then-losers batch ``(2B, 3, H, W)`` in its real order, each image tagged with its role."""
    n = pixel_values.shape[0]
    half = n // 2
    fig, ax = plt.subplots(1, n, figsize=(1.7 * n, 2.2), squeeze=False)
    for i in range(n):
        img = ((pixel_values[i].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
        ax[0, i].imshow(img)
        ax[0, i].set_xticks([]), ax[0, i].set_yticks([])
        role = "x_w" if i < half else "x_l"
        ax[0, i].set_title(f"row {i}: {role}\n{captions[i % half][:18]}", fontsize=7)
    fig.tight_layout()
    return fig


def taste_shift_figure(shift, columns: int = 8):
    """A :class:`~dpo_tutorial.toy.your_taste.TasteShift`: base (top) and DPO (middle) images for the same captions
    and seeds, each titled with its taste score, and the score's distribution before and after (bottom)."""
    per_caption = len(shift.captions) // 12
    idx = [i * per_caption for i in range(min(columns, 12))]  # the first prompt of each of the first captions
    fig = plt.figure(figsize=(1.3 * len(idx), 5.6))
    grid = fig.add_gridspec(3, len(idx), height_ratios=[1, 1, 1.4])
    for col, i in enumerate(idx):
        for row, (images, scores, name) in enumerate([(shift.base_images, shift.base_scores, "base"),
                                                      (shift.dpo_images, shift.dpo_scores, "DPO")]):
            a = fig.add_subplot(grid[row, col])
            a.imshow(images[i])
            a.set_xticks([]), a.set_yticks([])
            a.set_title(f"{scores[i]:.2f}", fontsize=8)
            if col == 0:
                a.set_ylabel(name)
            if row == 1:
                a.set_xlabel(shift.captions[i].replace("a ", ""), fontsize=7)
    h = fig.add_subplot(grid[2, :])
    bins = np.linspace(min(shift.base_scores.min(), shift.dpo_scores.min()),
                       max(shift.base_scores.max(), shift.dpo_scores.max()), 30)
    h.hist(shift.base_scores, bins=bins, alpha=0.6, label=f"base (mean {shift.base_scores.mean():.3f})")
    h.hist(shift.dpo_scores, bins=bins, alpha=0.6, label=f"DPO (mean {shift.dpo_scores.mean():.3f})")
    rate, low, high = shift.win_rate
    h.set(xlabel=f"'{shift.taste}' score of each image ({len(shift.captions)} prompts per model)",
          ylabel="images", title=f"win-rate of DPO over base under the '{shift.taste}' scorer: "
                                 f"{rate:.2f} [{low:.2f}, {high:.2f}]")
    h.legend(fontsize=8)
    fig.tight_layout()
    return fig


def labels_curve_figure(rows_by_seed: dict):
    """Win-rate (with its 95% interval) against the number of labelled pairs, one line per seed;
    ``rows_by_seed`` maps a seed to :func:`~dpo_tutorial.toy.your_taste.labels_curve`'s rows."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for k, (seed, rows) in enumerate(rows_by_seed.items()):
        n = np.array([r["labels"] for r in rows]) * (1 + 0.03 * (k - 1))  # a small offset keeps bars apart
        rate = np.array([r["win_rate"] for r in rows])
        err = np.array([[r["win_rate"] - r["low"] for r in rows], [r["high"] - r["win_rate"] for r in rows]])
        ax.errorbar(n, rate, yerr=err, marker="o", capsize=3, label=f"seed {seed}")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.minorticks_off()  # only the counts are labelled (a log axis otherwise adds "3 x 10^1"-style minor labels)
    counts = sorted({r["labels"] for rows in rows_by_seed.values() for r in rows})
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set(xlabel="labelled pairs", ylabel="win-rate of DPO over base", ylim=(0.3, 1.0),
           title="how many labels does a taste take?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def forward_chain_figure(image: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps=(0, 50, 200, 500, 999),
                         generator: torch.Generator | None = None):
    r"""The forward (noising) chain on one ``(3, H, W)`` image in [-1, 1]: :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 +
    \sqrt{1-\bar\alpha_t}\,\epsilon` at each of ``timesteps``, with one ε for all of them (``alphas_cumprod``: the
    scheduler's :math:`\bar\alpha`, indexed by t). The first panel is :math:`x_0`."""
    x0 = image.detach().double().cpu()  # (3, H, W)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)  # one ε for the whole chain
    abar = alphas_cumprod.detach().double().cpu()
    fig, ax = plt.subplots(1, len(timesteps) + 1, figsize=(1.8 * (len(timesteps) + 1), 2.3), squeeze=False)
    panels = [(x0, r"$x_0$ (the image)")]
    for t in timesteps:
        x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * noise  # (3, H, W)
        panels.append((x_t, f"t = {t}\n" + r"$\sqrt{\bar\alpha_t}$" + f" = {abar[t].sqrt().item():.2f}"))
    for a, (x, title) in zip(ax[0], panels):
        a.imshow(((x.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        a.set_xticks([]), a.set_yticks([])
        a.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def elbo_figure(x0, log_likelihood, elbo, shifts, gaps):
    """Left: a model's exact :math:`\\log p(x_0)` and its ELBO over the points ``x0`` (the ELBO lies below, by the
    gap :math:`\\mathrm{KL}(q(x_{1:T}|x_0)\\,\\|\\,p(x_{1:T}|x_0))`). Right: that gap at one point against how wrong the
    model's steps are (``shifts``: the error of each reverse step's mean; ``gaps``: log p - ELBO for each)."""
    x0, log_likelihood, elbo = (np.asarray(v, dtype=float) for v in (x0, log_likelihood, elbo))
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    ax[0].plot(x0, log_likelihood, color="C0", label=r"$\log p_\theta(x_0)$ (exact)")
    ax[0].plot(x0, elbo, color="C1", ls="--", label="ELBO (average over noising chains)")
    ax[0].fill_between(x0, elbo, log_likelihood, color="C1", alpha=0.25, label="gap")
    ax[0].set(xlabel=r"$x_0$", ylabel="nats", title="the ELBO is a lower bound on the log-likelihood")
    ax[0].legend(fontsize=8)
    ax[1].plot(np.asarray(shifts, dtype=float), np.asarray(gaps, dtype=float), marker="o", color="C1")
    ax[1].axhline(0, color="grey", ls=":", lw=1)
    ax[1].set(xlabel="error of every reverse step's mean (0: the exact reverse of q)",
              ylabel=r"$\log p_\theta(x_0)$ − ELBO", title="the gap: how far the model's chains are from q's")
    fig.tight_layout()
    return fig


def beta_saturation_figure(betas=(250, 1000, 5000), gap_max: float = 0.02):
    """Per-pair loss (left) and gradient weight :math:`\\sigma(-z)` (right) against ``model_diff - ref_diff`` for each
    β, with :math:`z = -\\tfrac{\\beta}{2}(\\text{model\\_diff} - \\text{ref\\_diff})`. A dotted line marks where a
    right-ranked pair's weight has fallen to 0.1: at ``model_diff - ref_diff`` :math:`= -2\\ln 9/\\beta`."""
    gap = torch.linspace(-gap_max, gap_max, 401)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), sharex=True)
    for k, beta in enumerate(betas):
        z = -0.5 * beta * gap
        ax[0].plot(gap, -torch.nn.functional.logsigmoid(z), color=f"C{k}", label=f"β = {beta:g}")
        ax[1].plot(gap, torch.sigmoid(-z), color=f"C{k}", label=f"β = {beta:g}")
        for a in ax:
            a.axvline(-2 * np.log(9) / beta, color=f"C{k}", ls=":", lw=1)
    ax[0].axhline(np.log(2), color="grey", lw=0.8)
    ax[0].set(xlabel="model_diff − ref_diff (per element)", ylabel="per-pair loss", title=r"loss $-\log\sigma(z)$",
              ylim=(0, 5))
    ax[1].set(xlabel="model_diff − ref_diff (per element)", ylabel=r"weight $\sigma(-z)$",
              title="how hard each pair still pulls (dotted: weight 0.1)")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def pair_weights_figure(logits: torch.Tensor):
    """Each pair's gradient weight, times B, pairs sorted by their logit: the paper's :math:`\\sigma(-z_i)` (bars) and
    the mean-inside form's one shared weight :math:`\\sigma(-\\bar z)` (line), from :func:`~dpo_tutorial.loss.per_pair_weights`."""
    z = logits.detach().float().cpu()
    order = z.argsort()
    paper, legacy = (per_pair_weights(z, kind)[order] * len(z) for kind in ("sigmoid", "legacy_mean_inside"))
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(z)), paper, alpha=0.7, label=r"paper, mean outside: $\sigma(-z_i)$")
    ax.plot(range(len(z)), legacy, color="C3", label=r"mean inside (first diffusers version): $\sigma(-\bar z)$")
    ax.set(xlabel="pairs, sorted by logit z (worst ranked first)", ylabel="gradient weight × B")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def control_variate_figure(policy, reference, timesteps):
    """Each (image, draw) as one point: the reference's error (x) against the policy's (y) at the same ε and t,
    coloured by t, on log axes with the diagonal. The points hug the diagonal over orders of magnitude: the draw
    moves both errors together, so their difference (what the logit uses) keeps little of the draw's noise.

    ``policy``, ``reference``, ``timesteps``: ``(num_draws, 2B)`` arrays or tensors, e.g. from
    :func:`dpo_tutorial.analysis.policy_reference_draws`."""
    x, y, t = (np.asarray(torch.as_tensor(v).float().flatten()) for v in (reference, policy, timesteps))
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    points = ax.scatter(x, y, c=t, s=6, cmap="viridis", alpha=0.7)
    low, high = min(x.min(), y.min()), max(x.max(), y.max())
    ax.plot([low, high], [low, high], color="grey", ls=":", lw=1, label="policy = reference")
    ax.set(xscale="log", yscale="log", xlabel="reference's error (LoRA off)", ylabel="policy's error (LoRA on)",
           title=f"each point: one image at one draw; correlation {np.corrcoef(x, y)[0, 1]:.3f}")
    fig.colorbar(points, ax=ax, label="timestep t")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
