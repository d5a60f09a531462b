"""The figures read: smoothed training curves, a shared-noise histogram on the data's own scale, a labelled
samples grid, and figure generation that does not depend on the machine's thread settings."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_tutorial import files, plots
from dpo_tutorial.figures import only_figures
from dpo_tutorial.run_dir import History
from dpo_tutorial.sample import image_grid, labelled_grid


def test_smooth_keeps_length_and_level_and_removes_noise():
    rng = np.random.default_rng(0)
    noisy = 0.6 + rng.normal(0, 0.1, 700)
    smoothed = plots.smooth(noisy)
    assert smoothed.shape == noisy.shape
    assert plots.smooth(np.full(50, 2.0)) == pytest.approx(np.full(50, 2.0))
    assert smoothed.std() < noisy.std() / 4 and abs(smoothed.mean() - 0.6) < 0.01
    assert plots.smooth([1.0, 2.0]).tolist() == [1.0, 2.0]


def test_training_figure_draws_a_moving_average_over_each_raw_curve():
    rng = np.random.default_rng(0)
    records = [{"step": s, **{k: float(rng.normal()) for k in ("loss", "implicit_acc", "reward_margin",
                                                              "model_mse_w", "model_mse_l", "raw_ref_loss")}}
               for s in range(1, 201)]
    fig = plots.training_figure(History(records=records))
    loss_lines = [line for line in fig.axes[0].lines if len(line.get_xdata()) == 200]
    assert len(loss_lines) == 2  # raw and smoothed
    raw, smooth = (np.asarray(line.get_ydata()) for line in loss_lines)
    assert smooth.std() < raw.std() / 2
    assert len([line for line in fig.axes[3].lines if len(line.get_xdata()) == 200]) == 6
    assert fig.get_size_inches()[0] <= 10, "four panels in a row were 14 in wide: unreadable at GitHub's width"


def test_shared_noise_histogram_is_not_squeezed_by_the_independent_tails():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.02, 2000)
    independent = np.concatenate([rng.normal(0, 0.1, 1980), rng.uniform(-1, 1, 20)])  # long tails to +-1
    fig = plots.spread_figure(shared, independent)
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert hi - lo < 0.8, (lo, hi)
        shared_bars = [p for p in ax.patches if p.get_facecolor()[:3] == pytest.approx((1.0, 0.498, 0.055), abs=0.01)]
        assert sum(p.get_height() > 0 for p in shared_bars) >= 8  # the shared estimates span many bins


def test_samples_grid_has_captions_above_and_row_labels_left():
    rows = [np.zeros((3, 32, 32, 3), np.uint8) + 255, np.zeros((3, 32, 32, 3), np.uint8) + 255]  # white images
    plain = image_grid(rows, scale=4)
    grid = np.asarray(labelled_grid(rows, ["base", "DPO"], ["a red circle", "a blue square", "a yellow triangle"],
                                    scale=4))
    assert grid.shape[0] > plain.height and grid.shape[1] > plain.width
    top, left = grid.shape[0] - plain.height, grid.shape[1] - plain.width
    assert (grid[:top] < 128).any() and (grid[top:, :left] < 128).any()  # text in both margins
    with pytest.raises(ValueError, match="2 row labels and 2 captions .* 2 rows x 3 columns"):
        labelled_grid(rows, ["base", "DPO"], ["a", "b"])


def test_figures_pin_threads_and_seeds():
    from dpo_tutorial.figures import fix_randomness

    before = torch.get_num_threads()
    try:
        fix_randomness(1)
        first = (torch.rand(3), np.random.rand(3))
        fix_randomness(1)
        assert torch.get_num_threads() == 1
        assert torch.equal(first[0], torch.rand(3)) and np.array_equal(first[1], np.random.rand(3))
    finally:
        torch.set_num_threads(before)


def test_forward_chain_figure_shows_the_image_then_ever_noisier_copies():
    image = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 8, 8)
    abar = torch.linspace(0.999, 0.001, 1000)
    fig = plots.forward_chain_figure(image, abar, timesteps=(0, 500, 999), generator=torch.Generator().manual_seed(0))
    shown = [a.get_images()[0].get_array() for a in fig.axes]
    assert len(shown) == 4
    np.testing.assert_allclose(shown[0], ((image.permute(1, 2, 0) + 1) / 2).numpy(), atol=1e-6)
    distance = [np.abs(s - shown[0]).mean() for s in shown]  # from the clean image
    assert distance[1] < distance[2] < distance[3]


def test_elbo_figure_draws_the_bound_below_the_log_likelihood():
    x0 = np.linspace(-2, 2, 5)
    log_p, elbo = -x0 ** 2, -x0 ** 2 - 0.3
    fig = plots.elbo_figure(x0, log_p, elbo, shifts=[0.0, 0.2], gaps=[0.0, 0.1])
    left = fig.axes[0].lines
    np.testing.assert_allclose(left[0].get_ydata(), log_p)
    np.testing.assert_allclose(left[1].get_ydata(), elbo)
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [0.0, 0.1])


def test_beta_saturation_figure_marks_where_the_weight_falls_to_a_tenth():
    betas = (250, 5000)
    fig = plots.beta_saturation_figure(betas, gap_max=0.02)
    weights = fig.axes[1]
    curves = [line for line in weights.lines if len(line.get_xdata()) > 2]
    marks = [line.get_xdata()[0] for line in weights.lines if len(line.get_xdata()) == 2]
    for beta, curve, mark in zip(betas, curves, marks):
        assert mark == pytest.approx(-2 * np.log(9) / beta)
        assert np.interp(mark, curve.get_xdata(), curve.get_ydata()) == pytest.approx(0.1, abs=0.01)


def test_pair_weights_figure_shows_sigmoid_weights_and_one_legacy_weight():
    z = torch.tensor([2.0, -1.0, 0.5, 3.0])
    fig = plots.pair_weights_figure(z)
    bars = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(bars, torch.sigmoid(-z.sort().values).numpy(), rtol=1e-6)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), torch.sigmoid(-z.mean()).item(), rtol=1e-6)


def test_control_variate_figure_plots_every_image_and_draw_against_the_diagonal():
    rng = np.random.default_rng(0)
    reference = np.exp(rng.normal(-3, 1, (6, 8)))                       # (draws, 2B) errors over orders of magnitude
    policy = reference * (1 + rng.normal(0, 0.01, reference.shape))
    timesteps = rng.integers(0, 1000, reference.shape)
    fig = plots.control_variate_figure(torch.as_tensor(policy), reference, timesteps)
    ax = fig.axes[0]
    (points,) = ax.collections
    xy = np.asarray(points.get_offsets())
    assert xy.shape == (48, 2)
    np.testing.assert_allclose(xy[:, 0], reference.flatten())          # x: the reference, y: the policy
    np.testing.assert_allclose(xy[:, 1], policy.flatten(), rtol=1e-6)
    np.testing.assert_allclose(points.get_array(), timesteps.flatten())  # coloured by t
    assert ax.get_xscale() == ax.get_yscale() == "log"
    corr = np.corrcoef(reference.flatten(), policy.flatten())[0, 1]
    assert f"{corr:.3f}" in ax.get_title()


def test_labels_curve_labels_only_the_counts():
    """With two label counts (25 and 200) a log axis used to add minor labels such as 3 x 10^1 between them."""
    rows = [dict(labels=n, win_rate=w, low=w - 0.05, high=w + 0.05) for n, w in ((25, 0.7), (200, 0.9))]
    fig = plots.labels_curve_figure({0: rows})
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["25", "200"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()] == []
    line = ax.lines[0]
    assert list(line.get_ydata()) == [0.7, 0.9]


def test_the_committed_figures_folder_is_one_the_figures_command_may_write(tmp_path):
    """`dpo-tutorial figures` on a fresh checkout: the committed folder (its marker, or without one only figure PNGs)
    is accepted; a file of the user's in it is refused (this once refused the checkout's own taste figures)."""
    committed = Path(__file__).resolve().parents[1] / "figures"
    copy = shutil.copytree(committed, tmp_path / "figures")
    assert files.claim_folder(copy, "figures") == copy
    (copy / files.MARKER).unlink()
    assert files.claim_folder(copy, "figures", legacy=only_figures) == copy     # no marker: recognised, then marked
    assert (copy / files.MARKER).read_text().strip() == "figures"
    (copy / files.MARKER).unlink()
    (copy / "my_notes.txt").write_text("mine")
    with pytest.raises(files.FolderError):
        files.claim_folder(copy, "figures", legacy=only_figures)

