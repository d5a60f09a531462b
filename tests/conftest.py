"""Shared fixtures: tiny SD / SDXL pipelines and a Pick-a-Pic-format parquet with the awkward cases."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one share of the cores per pytest-xdist worker (oversubscribed CPU threads slow torch 10-50x); the notebooks' kernels
# inherit it. A worker sets its share even when the controller (which loads this file too, as one process) set its own.
if "PYTEST_XDIST_WORKER" in os.environ or "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))
if torch.get_num_threads() != int(os.environ["OMP_NUM_THREADS"]):  # the call costs MKL its dynamic threading
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import datasets  # noqa: E402

# datasets waits 5 s after every pass over a streamed parquet (a guard against pyarrow's thread-shutdown crash,
# apache/arrow#45214, which strikes at interpreter exit); the tests end many short passes, so a short wait will do
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.2

from dpo_tutorial.config import TrainConfig  # noqa: E402
from dpo_tutorial.pickapic import encode_image, pickapic_row, write_pickapic_parquet  # noqa: E402
from dpo_tutorial.testing.fixtures import build_tiny_pipeline  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def solid(colour: str, size=(32, 32), rng=None) -> np.ndarray:
    """An (H, W, 3) uint8 image: a coloured square on grey, with a little noise."""
    rng = rng or np.random.default_rng(0)
    h, w = size
    img = np.full((h, w, 3), 128, dtype=np.uint8)
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = COLOURS[colour]
    noise = rng.integers(-10, 10, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def make_rows(n_good: int = 12, seed: int = 0) -> list[dict]:
    """Good pairs (both label orders), plus a tie, a corrupt JPEG, a grayscale image, a CMYK JPEG,
    a PNG and a pair of different sizes."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    rows = []
    for i in range(n_good):
        c = colours[i % 4]
        other = colours[(i + 1) % 4]
        right, wrong = encode_image(solid(c, rng=rng)), encode_image(solid(other, rng=rng))
        if i % 2 == 0:  # label_0 = 1: jpg_0 (right colour) wins
            rows.append(pickapic_row(f"a {c} square", right, wrong, 1.0, ranking_id=i))
        else:  # label_0 = 0: jpg_1 wins
            rows.append(pickapic_row(f"a {c} square", wrong, right, 0.0, ranking_id=i))
    k = n_good
    rows.append(pickapic_row("a red square", encode_image(solid("red")), encode_image(solid("blue")), 0.5, k))
    rows.append(pickapic_row("a blue square", b"\xff\xd8\xff\xe0 not a jpeg", encode_image(solid("red")), 1.0, k + 1))
    rows.append(pickapic_row("a green square", encode_image(solid("green"), mode="L"),
                             encode_image(solid("red")), 1.0, k + 2))
    rows.append(pickapic_row("a yellow square", encode_image(solid("yellow"), mode="CMYK"),
                             encode_image(solid("red"), fmt="PNG"), 1.0, k + 3))
    rows.append(pickapic_row("a blue square", encode_image(solid("blue", size=(48, 64))),
                             encode_image(solid("red", size=(40, 32))), 0.0, k + 4))
    return rows


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    """A tiny random-weight SD 1.x-shaped pipeline folder."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """A tiny random-weight SDXL-shaped pipeline folder."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), sdxl=True)


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory):
    """A Pick-a-Pic v2 parquet: 12 good pairs, 1 tie, 1 corrupt JPEG, grayscale/CMYK/PNG, mixed sizes."""
    return write_pickapic_parquet(tmp_path_factory.mktemp("pickapic") / "train.parquet", make_rows())


def tiny_config(pipe, data, out, **kw) -> TrainConfig:
    """A run of a few steps on a tiny stand-in pipeline: 32 px, 2 pairs a step, rank 4, constant lr, no grid."""
    return TrainConfig(**{**dict(pretrained=str(pipe), dataset=str(data), output_dir=str(out), resolution=32,
                                 batch_size=2, max_steps=2, lr=1e-3, beta=500.0, rank=4, sample_grid=False), **kw})


@pytest.fixture(scope="session")
def finished_run(sd_dir, pairs_parquet, tmp_path_factory):
    """A finished 3-step run with checkpoints 1, 2, 3, trained once per test session; tests that change it take a
    copy (``run_copy``)."""
    from dpo_tutorial.train import train

    out = tmp_path_factory.mktemp("finished-run")
    train(tiny_config(sd_dir, pairs_parquet, out, max_steps=3, checkpoint_every=1))
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of ``finished_run`` (its lock file left behind) that a test may damage or continue."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns(".lock"))
    return out
