"""Label toy pairs yourself (notebook 08): candidate pairs, a label file that survives restarts, a widget.

- :func:`candidate_pairs` samples two images per caption from the toy base model, reproducibly from a seed;
- :class:`LabelStore` writes every label as it is given to ``<folder>/train.parquet`` in the exact
  Pick-a-Pic v2 schema (:mod:`dpo_tutorial.pickapic`), so ``load_pickapic`` and ``dpo-tutorial train
  --dataset <folder>`` read it unchanged, and a restarted kernel resumes at the first unlabelled pair;
- :class:`LabellingWidget` shows one pair at a time with four buttons (left / right / tie / skip); its
  :meth:`~LabellingWidget.choose` is the buttons' callback, and :func:`label_with_script` calls that same
  callback with a scripted labeller's choices, so CI runs exactly the code a click runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..pickapic import encode_image, pickapic_row, write_pickapic_parquet
from . import GUIDANCE_SCALE, SAMPLE_STEPS, world
from .tastes import Taste, scripted_labels

CANDIDATE_SEED_BASE = 2_000_000_000  # candidate pairs' sampling seeds start here, below the held-out evaluation's
# (>= 3e9), so a taste is never measured on the images it was labelled on
CHOICES = {"left": 1.0, "right": 0.0, "tie": 0.5, "skip": None}  # a click -> label_0 (None: not a label)


@dataclass
class CandidatePairs:
    """``n`` pairs to label: ``captions[i]`` with images ``img0[i]`` (shown left) and ``img1[i]`` (right)."""

    captions: list[str]
    img0: np.ndarray  # (n, 32, 32, 3) uint8
    img1: np.ndarray  # (n, 32, 32, 3) uint8

    def __len__(self) -> int:
        return len(self.captions)


def candidate_pairs(pipe, n_pairs: int, seed: int = 0) -> CandidatePairs:
    """``n_pairs`` pairs from the toy ``pipe``: the 12 captions in a seeded shuffled cycle, two sampling seeds each.

    The same ``(n_pairs, seed)`` gives the same pairs, so a restarted notebook shows the pairs it showed before.
    """
    from ..sample import generate

    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1, got {n_pairs}")
    rng = np.random.default_rng(seed)
    caps = world.all_captions()
    captions = [caps[i % len(caps)] for i in rng.permutation(n_pairs)]
    first = CANDIDATE_SEED_BASE + 10_000 * seed
    seeds = list(range(first, first + 2 * n_pairs))
    images = generate(pipe, captions + captions, seeds, SAMPLE_STEPS, GUIDANCE_SCALE)  # (2n, 32, 32, 3)
    return CandidatePairs(captions, images[:n_pairs], images[n_pairs:])


class LabelStore:
    """Labels of one :class:`CandidatePairs`, saved to ``folder/train.parquet`` after every one.

    ``folder/progress.json`` remembers how many pairs were shown (skips included), so labelling resumes at
    the next unseen pair after a restart. ``label_0`` is 1 (left preferred), 0 (right) or 0.5 (a tie).
    """

    def __init__(self, folder: str | Path, pairs: CandidatePairs):
        self.folder, self.pairs = Path(folder), pairs
        self.rows: list[dict] = []
        self.shown = 0
        progress = self.folder / "progress.json"
        if progress.exists():
            saved = json.loads(progress.read_text())
            if saved.get("pairs") != len(pairs):
                raise ValueError(f"{self.folder} holds labels of {saved.get('pairs')} candidate pairs, these are "
                                 f"{len(pairs)}: use another folder or the same n_pairs")
            self.shown = int(saved["shown"])
            self.rows = self._read_rows()

    def _read_rows(self) -> list[dict]:
        import pyarrow.parquet as pq

        path = self.folder / "train.parquet"
        return pq.read_table(path).to_pylist() if path.exists() else []

    @property
    def done(self) -> bool:
        """True when every candidate pair has been shown."""
        return self.shown >= len(self.pairs)

    def record(self, choice: str) -> None:
        """Record ``choice`` (``left`` / ``right`` / ``tie`` / ``skip``) for the current pair and save at once."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if self.done:
            raise IndexError(f"all {len(self.pairs)} pairs are labelled already")
        i, label_0 = self.shown, CHOICES[choice]
        if label_0 is not None:
            p = self.pairs
            self.rows.append(pickapic_row(p.captions[i], encode_image(p.img0[i]), encode_image(p.img1[i]), label_0,
                                          ranking_id=i, model="tiny-sd-shapes"))
            write_pickapic_parquet(self.folder / "train.parquet", self.rows)
        self.shown += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".progress.json.tmp"
        tmp.write_text(json.dumps({"pairs": len(self.pairs), "shown": self.shown}))
        tmp.replace(self.folder / "progress.json")

    def labels(self) -> np.ndarray:
        """``(L,)`` the ``label_0`` of every recorded label, in labelling order."""
        return np.array([r["label_0"] for r in self.rows], dtype=float)

    def progress(self) -> str:
        """E.g. ``"37 / 150 shown, 35 labelled"``."""
        return f"{self.shown} / {len(self.pairs)} shown, {len(self.rows)} labelled"


def label_with_script(store: LabelStore, taste: Taste | str, noise: float, seed: int = 0, limit: int | None = None,
                      callback=None) -> None:
    """Label the remaining pairs as a labeller following ``taste`` with ``noise`` errors would
    (:func:`~dpo_tutorial.toy.tastes.scripted_labels`), through ``callback`` (default ``store.record``; pass a
    widget's ``choose`` to drive the widget), stopping after ``limit`` pairs if given."""
    callback = callback or store.record
    p = store.pairs
    label_0 = scripted_labels(taste, p.img0, p.img1, noise, np.random.default_rng(seed))  # (n,), all pairs
    stop = len(p) if limit is None else min(len(p), store.shown + limit)
    for i in range(store.shown, stop):
        callback({1.0: "left", 0.0: "right", 0.5: "tie"}[float(label_0[i])])


def _png(image: np.ndarray, scale: int) -> bytes:
    """PNG bytes of one uint8 image enlarged ``scale`` times (nearest neighbour, so pixels stay crisp)."""
    import io

    from PIL import Image

    img = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class LabellingWidget:
    """One pair at a time: the caption, the two images, and buttons "left is better" / "right is better" /
    "tie" / "skip" (Tab moves between them, Space or Enter clicks), with the progress below.

    ``display(widget.box)`` shows it; every click calls :meth:`choose`, which records and shows the next pair.
    """

    def __init__(self, store: LabelStore, instruction: str = "click the image you prefer", scale: int = 6):
        import ipywidgets as w

        self.store, self.scale = store, scale
        self.caption = w.HTML()
        self.images = [w.Image(format="png") for _ in range(2)]
        labels = {"left": "◀ left is better", "right": "right is better ▶", "tie": "tie", "skip": "skip"}
        self.buttons = []
        for choice, text in labels.items():
            button = w.Button(description=text, tooltip=f"label this pair: {choice}")
            button.on_click(lambda _b, c=choice: self.choose(c))
            self.buttons.append(button)
        self.status = w.HTML()
        self.box = w.VBox([w.HTML(f"<b>{instruction}</b>"), self.caption, w.HBox(self.images),
                           w.HBox(self.buttons), self.status])
        self.refresh()

    def choose(self, choice: str) -> None:
        """The buttons' callback: record ``choice`` for the pair on screen, then show the next one."""
        self.store.record(choice)
        self.refresh()

    def refresh(self) -> None:
        """Show the current pair (or a closing message) and the progress."""
        s = self.store
        self.status.value = f"{s.progress()}; saved to {s.folder / 'train.parquet'}"
        if s.done:
            self.caption.value = "<i>all pairs shown: train on your labels below</i>"
            for b in self.buttons:
                b.disabled = True
            return
        i = s.shown
        self.caption.value = f"pair {i + 1}: <b>{s.pairs.captions[i]}</b>"
        for image, array in zip(self.images, (s.pairs.img0[i], s.pairs.img1[i])):
            image.value = _png(array, self.scale)
