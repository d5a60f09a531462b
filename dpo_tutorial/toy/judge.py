"""A transparent, programmatic judge for the shapes world (the toy's stand-in for human raters).

How it scores an image against a caption ``"a <colour> <shape>"``:

1. Foreground: a pixel's weight rises linearly from 0 to 1 as its RGB distance from the background
   grows from 0.15 to 0.40 (pixel values in [0, 1]).
2. Colour: each foreground pixel gets a softmax over the palette of -squared-distance / 0.05; the
   weighted mean over pixels is ``p_colour`` (4 probabilities summing to 1; used by ``is_correct``).
   For the score, ``colour_match`` = weighted mean of exp(-|pixel - caption colour|^2 / 0.3).
3. Shape: two features of the foreground - *fill* (foreground mass / bounding-box area: square ~0.95,
   circle ~0.78, triangle ~0.57) and *top* (share of the mass in the upper half of the box: triangle
   ~0.25, others ~0.5) - are compared with per-shape prototypes by a Gaussian softmax: ``p_shape``
   (used by ``is_correct``); ``shape_match`` is the caption shape's unnormalised Gaussian likelihood.
4. ``score = (2 * colour_match + shape_match) / 3``, shrunk towards 0 when there is hardly any
   foreground. It is smooth (even two wrong colours score differently), so ties are rare; in [0, 1].

``is_correct`` asks that the most likely colour and shape both match the caption.

Measured accuracy of ``is_correct`` (see ``measure_accuracy``; 1200 renders, 100 per caption):
clean renders 100.0%; renders blurred (Gaussian radius 1.0) and noised (std 10/255) 98.3%; with the
*wrong* colour in the caption 0.0% and a wrong-colour caption always scores lower than the true one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from .world import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    all_captions,
    caption_for,
    parse_caption,
    render_caption,
)

COLOUR_NAMES = list(COLOURS)
_PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32) / 255.0  # (4, 3)
_BG = torch.tensor(BACKGROUND, dtype=torch.float32) / 255.0  # (3,)
_FG_LOW, _FG_HIGH = 0.15, 0.40  # RGB distance from background: weight 0 below, 1 above
_COLOUR_TEMP = 0.05
# prototype (fill, top) per shape, measured on clean renders, and the Gaussian widths used
_SHAPE_PROTO = torch.tensor([[0.78, 0.50], [0.95, 0.50], [0.57, 0.29]])  # (3, 2) circle/square/tri
_SHAPE_SIGMA = torch.tensor([0.05, 0.04])
_MATCH_TEMP = 0.3  # temperature of the smooth colour match used by the score
_MIN_MASS = 12.0  # pixels of foreground below which the score is shrunk


def _to_tensor(images) -> torch.Tensor:
    """Convert a PIL image, uint8 array (H, W, 3) / (B, H, W, 3) or float tensor to (B, 3, H, W)."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        return x.unsqueeze(0) if x.dim() == 3 else x
    if isinstance(images, (list, tuple)):
        return torch.cat([_to_tensor(im) for im in images])
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    x = x.unsqueeze(0) if x.dim() == 3 else x  # (B, H, W, 3)
    return x.permute(0, 3, 1, 2)  # (B, 3, H, W)


def foreground_weight(x: torch.Tensor) -> torch.Tensor:
    """Soft foreground mask in [0, 1]: x (B, 3, H, W) in [0, 1] -> (B, H, W)."""
    dist = (x - _BG.view(1, 3, 1, 1)).norm(dim=1)  # (B, H, W)
    return ((dist - _FG_LOW) / (_FG_HIGH - _FG_LOW)).clamp(0, 1)


def colour_probs(x: torch.Tensor) -> torch.Tensor:
    """Foreground-weighted palette probabilities: x (B, 3, H, W) -> (B, 4), rows sum to 1."""
    w = foreground_weight(x)  # (B, H, W)
    d2 = ((x.unsqueeze(1) - _PALETTE.view(1, -1, 3, 1, 1)) ** 2).sum(dim=2)  # (B, 4, H, W)
    p = F.softmax(-d2 / _COLOUR_TEMP, dim=1)  # (B, 4, H, W)
    mass = w.sum(dim=(1, 2)).clamp_min(1e-6)  # (B,)
    probs = (p * w.unsqueeze(1)).sum(dim=(2, 3)) / mass.unsqueeze(1)  # (B, 4)
    empty = w.sum(dim=(1, 2)) < 1e-6
    probs[empty] = 1.0 / len(COLOUR_NAMES)
    return probs


def _bbox(mask: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index along ``dim`` (1 = rows, 2 = cols) where a (B, H, W) bool mask is set."""
    any_ = mask.any(dim=3 - dim)  # (B, L)
    n = any_.shape[1]
    first = any_.float().argmax(dim=1)  # (B,)
    last = n - 1 - any_.flip(1).float().argmax(dim=1)  # (B,)
    return first, last


def shape_features(x: torch.Tensor) -> torch.Tensor:
    """(fill, top) features of the foreground: x (B, 3, H, W) -> (B, 2)."""
    w = foreground_weight(x)  # (B, H, W)
    mask = w > 0.5  # (B, H, W)
    y0, y1 = _bbox(mask, 1)
    x0, x1 = _bbox(mask, 2)
    area = ((y1 - y0 + 1) * (x1 - x0 + 1)).float()  # (B,)
    rows = torch.arange(w.shape[1]).view(1, -1, 1)  # (1, H, 1)
    cols = torch.arange(w.shape[2]).view(1, 1, -1)  # (1, 1, W)
    inside = ((rows >= y0.view(-1, 1, 1)) & (rows <= y1.view(-1, 1, 1))
              & (cols >= x0.view(-1, 1, 1)) & (cols <= x1.view(-1, 1, 1)))  # (B, H, W)
    wb = w * inside  # (B, H, W)
    mass = wb.sum(dim=(1, 2)).clamp_min(1e-6)  # (B,)
    mid = (y0 + y1).float().view(-1, 1, 1) / 2  # (B, 1, 1)
    upper = (wb * (rows < mid)).sum(dim=(1, 2)) + 0.5 * (wb * (rows == mid)).sum(dim=(1, 2))
    return torch.stack([mass / area, upper / mass], dim=1)  # (B, 2)


def shape_probs(x: torch.Tensor) -> torch.Tensor:
    """Per-shape probabilities from the (fill, top) features: x (B, 3, H, W) -> (B, 3)."""
    feats = shape_features(x)  # (B, 2)
    z = (feats.unsqueeze(1) - _SHAPE_PROTO.unsqueeze(0)) / _SHAPE_SIGMA  # (B, 3, 2)
    return F.softmax(-0.5 * (z ** 2).sum(dim=2), dim=1)  # (B, 3)


def colour_match(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Mean over foreground pixels of exp(-|pixel - target colour|^2 / 0.3): x (B, 3, H, W),
    colour (B,) palette indices -> (B,) in [0, 1]; smooth, so it also ranks two wrong colours."""
    w = foreground_weight(x)  # (B, H, W)
    target = _PALETTE[colour].view(-1, 3, 1, 1)  # (B, 3, 1, 1)
    sim = torch.exp(-((x - target) ** 2).sum(dim=1) / _MATCH_TEMP)  # (B, H, W)
    return (sim * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1e-6)


def shape_match(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Unnormalised Gaussian likelihood of the (fill, top) features under the target shape's
    prototype: x (B, 3, H, W), shape (B,) indices -> (B,) in (0, 1]."""
    z = (shape_features(x) - _SHAPE_PROTO[shape]) / _SHAPE_SIGMA  # (B, 2)
    return torch.exp(-0.5 * (z ** 2).sum(dim=1))


def _targets(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour and shape indices of each caption: two (B,) long tensors."""
    parsed = [parse_caption(c) for c in captions]
    colour = torch.tensor([COLOUR_NAMES.index(c) for c, _ in parsed])
    shape = torch.tensor([SHAPES.index(s) for _, s in parsed])
    return colour, shape


def score_batch(images, captions: list[str]) -> torch.Tensor:
    """Continuous match scores in [0, 1], higher = better: images (B, 3, H, W) floats in [0, 1]
    (or anything ``_to_tensor`` accepts) and B captions -> (B,)."""
    x = _to_tensor(images)  # (B, 3, H, W)
    colour, shape = _targets(captions)
    pc = colour_match(x, colour)  # (B,)
    ps = shape_match(x, shape)  # (B,)
    mass = foreground_weight(x).sum(dim=(1, 2))  # (B,)
    presence = (mass / _MIN_MASS).clamp(max=1.0)  # (B,)
    return presence * (2 * pc + ps) / 3


def correct_batch(images, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour right, colour and shape right) as two (B,) bool tensors."""
    x = _to_tensor(images)  # (B, 3, H, W)
    colour, shape = _targets(captions)
    present = foreground_weight(x).sum(dim=(1, 2)) >= _MIN_MASS  # (B,)
    colour_ok = (colour_probs(x).argmax(dim=1) == colour) & present
    shape_ok = (shape_probs(x).argmax(dim=1) == shape) & present
    return colour_ok, colour_ok & shape_ok


def score(image, caption: str) -> float:
    """Score one image (PIL or uint8 (H, W, 3) array) against one caption; higher = better."""
    return float(score_batch(image, [caption])[0])


def is_correct(image, caption: str) -> bool:
    """True when both the image's colour and its shape match the caption."""
    return bool(correct_batch(image, [caption])[1][0])


def predict(images) -> list[tuple[str, str]]:
    """The judge's (colour, shape) reading of each image in a batch."""
    x = _to_tensor(images)  # (B, 3, H, W)
    ci = colour_probs(x).argmax(dim=1).tolist()
    si = shape_probs(x).argmax(dim=1).tolist()
    return [(COLOUR_NAMES[c], SHAPES[s]) for c, s in zip(ci, si)]


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 1.0,
            noise: float = 10.0) -> np.ndarray:
    """Blur (Gaussian radius ``blur``) and noise (std ``noise`` / 255) a uint8 (H, W, 3) image."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)), np.float32)
    noisy = blurred + rng.normal(0.0, noise, size=blurred.shape)  # (H, W, 3)
    return noisy.clip(0, 255).astype(np.uint8)


def measure_accuracy(per_caption: int = 100, seed: int = 0) -> dict[str, float]:
    """Judge accuracy on clean and degraded renders, and on wrong-colour captions."""
    rng = np.random.default_rng(seed)
    caps = [c for c in all_captions() for _ in range(per_caption)]
    clean = np.stack([render_caption(c, rng) for c in caps])  # (N, 32, 32, 3)
    dirty = np.stack([degrade(im, rng) for im in clean])  # (N, 32, 32, 3)
    wrong = []
    for c in caps:
        colour, shape = parse_caption(c)
        others = [o for o in COLOUR_NAMES if o != colour]
        wrong.append(caption_for(others[int(rng.integers(len(others)))], shape))
    right_scores, wrong_scores = score_batch(clean, caps), score_batch(clean, wrong)
    return {
        "clean": correct_batch(clean, caps)[1].float().mean().item(),
        "degraded": correct_batch(dirty, caps)[1].float().mean().item(),
        "wrong_colour_accepted": correct_batch(clean, wrong)[1].float().mean().item(),
        "wrong_scores_lower": (wrong_scores < right_scores).float().mean().item(),
    }
