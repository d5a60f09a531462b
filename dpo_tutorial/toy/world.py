"""The "shapes world": 32x32 RGB images of one coloured shape on a dark background.

Every image shows exactly one shape (circle, square or triangle) filled with one of four clearly
distinct colours (red, green, blue, yellow), with random position and size. Its caption is
``"a <colour> <shape>"``, e.g. ``"a red circle"``; there are 4 x 3 = 12 captions in all.

Shapes are drawn with PIL at 4x resolution and box-downsampled, so edges are anti-aliased.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # output images are SIZE x SIZE x 3
SUPERSAMPLE = 4  # draw at 4x resolution, then box-filter down
BACKGROUND = (20, 20, 20)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
}
SHAPES = ("circle", "square", "triangle")
RADIUS_RANGE = (6.0, 11.0)  # half-size of a shape, in output pixels


def caption_for(colour: str, shape: str) -> str:
    """The caption of an image showing ``shape`` in ``colour``."""
    return f"a {colour} {shape}"


def all_captions() -> list[str]:
    """All 12 captions of the world, colour-major order."""
    return [caption_for(c, s) for c in COLOURS for s in SHAPES]


def vocabulary() -> list[str]:
    """Every word used by a caption (for building the tokenizer)."""
    return ["a", *COLOURS, *SHAPES]


def parse_caption(caption: str) -> tuple[str, str]:
    """Split ``"a red circle"`` into ``("red", "circle")``; raises ValueError if malformed."""
    words = caption.strip().lower().split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if colour is None or shape is None:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    return colour, shape


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon (or bounding box for a circle) of a shape centred at (cx, cy) with half-size r."""
    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        s = 0.85 * r  # a square of half-side r looks bigger than a circle of radius r
        return [(cx - s, cy - s), (cx + s, cy + s)]
    if shape == "triangle":  # upright isoceles triangle filling half of its bounding box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    raise ValueError(f"unknown shape {shape!r}")


def render(colour: str, shape: str, rng: np.random.Generator) -> np.ndarray:
    """Render one image with random size and position; returns uint8 array (SIZE, SIZE, 3)."""
    r = rng.uniform(*RADIUS_RANGE)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
    k = SUPERSAMPLE
    big = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUND)
    draw = ImageDraw.Draw(big)
    points = [(x * k, y * k) for x, y in _outline(shape, cx, cy, r)]
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(points, fill=fill)
    elif shape == "square":
        draw.rectangle(points, fill=fill)
    else:
        draw.polygon(points, fill=fill)
    small = big.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)  # (SIZE, SIZE, 3)


def render_caption(caption: str, rng: np.random.Generator) -> np.ndarray:
    """Render a random image matching ``caption``; uint8 array (SIZE, SIZE, 3)."""
    colour, shape = parse_caption(caption)
    return render(colour, shape, rng)


def render_dataset(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], list[str]]:
    """``n`` random images with uniformly drawn colour and shape.

    Returns (images uint8 (n, SIZE, SIZE, 3), colours, shapes).
    """
    colours = [str(c) for c in rng.choice(list(COLOURS), size=n)]
    shapes = [str(s) for s in rng.choice(SHAPES, size=n)]
    images = np.stack([render(c, s, rng) for c, s in zip(colours, shapes)])  # (n, 32, 32, 3)
    return images, colours, shapes
