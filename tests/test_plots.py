"""The figures read: smoothed training curves, a shared-noise histogram on the data's own scale, a labelled
samples grid, and figure generation that does not depend on the machine's thread settings."""
import numpy as np
import pytest
import torch

from dpo_tutorial import plots
from dpo_tutorial.sample import image_grid, labelled_grid
from dpo_tutorial.run_dir import History


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
