"""Tastes the captions never name, each with a transparent scorer (notebook 08: "teach the model *your* taste").

A taste is a preference a person can hold consistently while labelling pairs and a program can measure:

- ``bigger``: the shape covers more of the image (score: the fraction of pixels that are not background);
- ``left``: the shape sits further left (score: 1 − the horizontal centre of its pixels, as a fraction of the width);
- ``brighter``: the shape's colour is brighter (score: the mean luminance of its pixels, in [0, 1]).

No caption says "big", "left" or "bright", so a model that moves along one of these after DPO has learned
it from the labels alone. :func:`scripted_labels` plays a labeller who follows a scorer but errs on a
fraction of pairs, as a careless human would; it stands in for the clicks in CI and in the
labels-versus-effect curve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .world import BACKGROUND

FOREGROUND_MIN_DISTANCE = 60  # a pixel is "shape" when one channel differs from the background by more than this
LUMINANCE = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights of R, G, B


def shape_mask(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` bools: pixels of ``(N, H, W, 3)`` uint8 images that are not the dark background."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got shape {images.shape}")
    distance = np.abs(images.astype(np.int16) - np.array(BACKGROUND, np.int16)).max(axis=-1)  # (N, H, W)
    return distance > FOREGROUND_MIN_DISTANCE


def size_score(images: np.ndarray) -> np.ndarray:
    """``(N,)`` fraction of each image covered by the shape, in [0, 1]."""
    return shape_mask(images).mean(axis=(1, 2))


def left_score(images: np.ndarray) -> np.ndarray:
    """``(N,)`` 1 − (mean column of the shape's pixels + ½) / width: 1 at the left edge, 0 at the right,
    ½ for an image with no shape."""
    mask = shape_mask(images)  # (N, H, W)
    columns = np.arange(mask.shape[2]) + 0.5  # pixel centres
    count = mask.sum(axis=(1, 2))  # (N,)
    centre = (mask.sum(axis=1) * columns).sum(axis=1) / np.maximum(count, 1)  # (N,) in pixels
    return np.where(count > 0, 1.0 - centre / mask.shape[2], 0.5)


def brightness_score(images: np.ndarray) -> np.ndarray:
    """``(N,)`` mean luminance of the shape's pixels, in [0, 1]; 0 for an image with no shape."""
    mask = shape_mask(images)  # (N, H, W)
    luminance = np.asarray(images, np.float64) @ LUMINANCE / 255.0  # (N, H, W)
    count = mask.sum(axis=(1, 2))
    return np.where(count > 0, (luminance * mask).sum(axis=(1, 2)) / np.maximum(count, 1), 0.0)


@dataclass(frozen=True)
class Taste:
    """A preference ``name`` described to the labeller by ``prompt``, measured by ``score`` (higher = preferred)."""

    name: str
    prompt: str
    score: Callable[[np.ndarray], np.ndarray]
    unit: str


TASTES: dict[str, Taste] = {
    "bigger": Taste("bigger", "click the image whose shape is BIGGER", size_score, "fraction of the image"),
    "left": Taste("left", "click the image whose shape sits further LEFT", left_score, "1 − centre x / width"),
    "brighter": Taste("brighter", "click the image whose shape is BRIGHTER", brightness_score, "mean luminance"),
}


def get_taste(name: str) -> Taste:
    """The taste called ``name``; a one-line error lists the known ones."""
    if name not in TASTES:
        raise ValueError(f"unknown taste {name!r}; expected one of {', '.join(TASTES)}")
    return TASTES[name]


def preference_labels(s0: np.ndarray, s1: np.ndarray, noise: float, rng: np.random.Generator,
                      tie_tol: float) -> np.ndarray:
    """``label_0`` per pair from two ``(N,)`` score arrays: 1 when image 0 scores higher, 0 when lower, 0.5 (a tie)
    within ``tie_tol``; then a fraction ``noise`` of the non-tie labels is flipped (careless raters). Used by the
    toy's shipped pairs (the caption judge) and by notebook 08's scripted labeller (a taste's scorer)."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be a fraction in [0, 1], got {noise}")
    label = np.where(s0 > s1, 1.0, 0.0)
    label[np.abs(s0 - s1) <= tie_tol] = 0.5
    flip = (rng.random(len(label)) < noise) & (label != 0.5)
    label[flip] = 1.0 - label[flip]
    return label


def scripted_labels(taste: Taste | str, img0: np.ndarray, img1: np.ndarray, noise: float,
                    rng: np.random.Generator, tie_tol: float = 1e-6) -> np.ndarray:
    """``label_0`` per pair as a labeller following ``taste`` would click, erring on a fraction ``noise`` of
    the non-tie pairs (:func:`preference_labels` on the taste's scores)."""
    taste = get_taste(taste) if isinstance(taste, str) else taste
    return preference_labels(taste.score(img0), taste.score(img1), noise, rng, tie_tol)
