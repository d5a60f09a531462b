"""Label toy pairs yourself (notebook 08): candidate pairs, a label file that survives restarts, a widget.

- :func:`candidate_pairs` samples two images per caption from the toy base model, reproducibly from a seed;
- :class:`LabelStore` writes every label as it is given to ``<folder>/train.parquet`` in the exact
  Pick-a-Pic v2 schema (:mod:`dpo_tutorial.pickapic`), so ``load_pickapic`` and ``dpo-tutorial train
  --dataset <folder>`` read it unchanged, and a restarted kernel resumes at the first unlabelled pair; a
  label once saved is never lost to a crash, a damaged ``progress.json`` or a second store on the folder;
- :class:`LabellingWidget` shows one pair at a time with four buttons (left / right / tie / skip); its
  :meth:`~LabellingWidget.choose` is the buttons' callback, and :func:`label_with_script` calls that same
  callback with a scripted labeller's choices, so CI runs exactly the code a click runs.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .. import files
from ..pickapic import (
    encode_image,
    pickapic_arrow_schema,
    pickapic_row,
    write_pickapic_parquet,
)
from ..sample import generate
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
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1, got {n_pairs}")
    rng = np.random.default_rng(seed)
    caps = world.all_captions()
    captions = [caps[i % len(caps)] for i in rng.permutation(n_pairs)]
    first = CANDIDATE_SEED_BASE + 10_000 * seed
    seeds = list(range(first, first + 2 * n_pairs))
    images = generate(pipe, captions + captions, seeds, SAMPLE_STEPS, GUIDANCE_SCALE)  # (2n, 32, 32, 3)
    return CandidatePairs(captions, images[:n_pairs], images[n_pairs:])


class LabelFolderError(ValueError):
    """A label folder this :class:`LabelStore` cannot continue; the message names the folder and the way forward."""


class LabelStore:
    """Labels of one :class:`CandidatePairs`, saved to ``folder/train.parquet`` after every one.

    ``train.parquet`` is the record: one Pick-a-Pic v2 row per label, ``ranking_id`` the pair's index,
    ``label_0`` 1 (left preferred), 0 (right) or 0.5 (a tie). ``progress.json`` only remembers how many pairs
    were shown (skips included), so labelling resumes at the next unseen pair after a restart. The rules that
    keep labels safe:

    - the labels are always read back from ``train.parquet``, whatever ``progress.json`` says;
    - a label adds one row: the file is written whole under a temporary name, flushed and renamed into place
      (a crash leaves the old file or the new one), and only after checking that it still holds exactly
      the labels this store knows, so it is never rewritten from a shorter state;
    - ``progress.json`` is checked against the labels: missing, cut, incomplete, negative, past the last
      pair or behind the last label, it is a one-line warning and labelling resumes after the last label;
    - a folder labelled with another number of candidate pairs, or with other pairs (its captions differ),
      or holding an unreadable ``train.parquet`` is a :class:`LabelFolderError`: keep one folder per
      ``n_pairs``.
    """

    def __init__(self, folder: str | Path, pairs: CandidatePairs):
        self.folder, self.pairs = Path(folder), pairs
        saved = self._read_progress()
        self.rows: list[dict] = self._read_rows()
        self._check_rows()
        self.shown = self._resume_point(saved)

    @property
    def path(self) -> Path:
        """``folder/train.parquet``: the labels, in the Pick-a-Pic v2 schema."""
        return self.folder / "train.parquet"

    def _read_progress(self):
        """``progress.json`` as saved (None if absent, the error if unreadable); a wrong pair count is fatal."""
        path = self.folder / "progress.json"
        if not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # ValueError: cut JSON or bytes that are not text
            return err
        count = saved.get("pairs") if isinstance(saved, dict) else None
        if is_int(count) and count >= 1 and count != len(self.pairs):
            raise LabelFolderError(f"{self.folder} holds labels of {count} candidate pairs, these are "
                                   f"{len(self.pairs)}: label these into another folder (one per n_pairs), or make "
                                   f"{count} candidate pairs again to continue there")
        return saved

    def _read_rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            table = pq.read_table(self.path)
            rows = table.to_pylist()
        except (pa.ArrowException, OSError, ValueError) as err:
            raise LabelFolderError(f"{self.path} is not a readable label file ({type(err).__name__}: "
                                   f"{str(err)[:100]}): restore it from a copy, or move it away to label from the "
                                   "first pair") from err
        if not table.schema.remove_metadata().equals(pickapic_arrow_schema()):
            raise LabelFolderError(f"{self.path} is not a label file of this store (columns {table.schema.names}): "
                                   "expected the Pick-a-Pic v2 schema; label into another folder")
        return rows

    def _check_rows(self) -> None:
        """Every saved label belongs to one of these pairs: its index is in range and its caption matches."""
        n = len(self.pairs)
        for row in self.rows:
            i = row["ranking_id"]
            if not 0 <= i < n:
                last = max(r["ranking_id"] for r in self.rows)
                raise LabelFolderError(f"{self.folder} holds labels of at least {last + 1} candidate pairs, these are "
                                       f"{n}: label these into another folder (one per n_pairs), or make at least "
                                       f"{last + 1} candidate pairs again to continue there")
            if row["caption"] != self.pairs.captions[i]:
                raise LabelFolderError(f"{self.folder} holds labels of other candidate pairs (pair {i + 1} is "
                                       f"{row['caption']!r} there, {self.pairs.captions[i]!r} here): make the pairs "
                                       "with the n_pairs and seed it was labelled with, or label into another folder")

    def _after_labels(self) -> int:
        """The pair after the last saved label (0 when there is none)."""
        return max((r["ranking_id"] for r in self.rows), default=-1) + 1

    def _resume_point(self, saved) -> int:
        """How many pairs were shown: ``progress.json`` where it agrees with the labels, else after the last label."""
        after, n = self._after_labels(), len(self.pairs)
        where = self.folder / "progress.json"
        if saved is None:
            problem = "is missing" if self.rows else None
        elif isinstance(saved, Exception):
            problem = f"is unreadable ({type(saved).__name__})"
        elif not isinstance(saved, dict) or saved.get("pairs") != n or not is_int(saved.get("shown")):
            problem = f"is incomplete (expected {{\"pairs\": {n}, \"shown\": <an integer>}})"
        elif not after <= saved["shown"] <= n:
            problem = f"says {saved['shown']} pairs shown where the labels need {after} to {n}"
        else:
            return saved["shown"]
        if problem:
            warnings.warn(f"{where} {problem}: resuming from the {len(self.rows)} saved labels, at pair {after + 1}")
        return after

    @property
    def done(self) -> bool:
        """True when every candidate pair has been shown."""
        return self.shown >= len(self.pairs)

    def record(self, choice: str) -> None:
        """Record ``choice`` (``left`` / ``right`` / ``tie`` / ``skip``) for the current pair and save at once.

        Raises :class:`LabelFolderError`, saving nothing, when ``train.parquet`` no longer holds the labels this
        store knows (another store or program wrote it meanwhile).
        """
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if self.done:
            raise IndexError(f"all {len(self.pairs)} pairs are labelled already")
        i, label_0 = self.shown, CHOICES[choice]
        self.folder.mkdir(parents=True, exist_ok=True)
        if label_0 is not None:
            self._check_unchanged()
            p = self.pairs
            row = pickapic_row(p.captions[i], encode_image(p.img0[i]), encode_image(p.img1[i]), label_0,
                               ranking_id=i, model="tiny-sd-shapes")
            write_pickapic_parquet(self.path, self.rows + [row])  # atomic: the old file or the new one
            self.rows.append(row)
        self.shown += 1
        files.write_text(self.folder / "progress.json", json.dumps({"pairs": len(self.pairs), "shown": self.shown}))

    def _check_unchanged(self) -> None:
        """Raise :class:`LabelFolderError` unless ``train.parquet`` holds exactly the labels in :attr:`rows`."""
        mine = [(r["ranking_id"], r["label_0"]) for r in self.rows]
        saved = []
        if self.path.exists():
            try:
                table = pq.read_table(self.path, columns=["ranking_id", "label_0"])
                saved = list(zip(table.column("ranking_id").to_pylist(), table.column("label_0").to_pylist()))
            except (pa.ArrowException, OSError, KeyError, ValueError):  # unreadable or other columns: not ours
                saved = None
        if saved == mine:
            return
        if saved is not None and saved[:len(mine)] == mine:
            self.rows = self._read_rows()  # another store on this folder added labels: take them, skip their pairs
            self._check_rows()
            self.shown = max(self.shown, self._after_labels())
            raise LabelFolderError(f"{self.path} gained {len(saved) - len(mine)} label(s) from another LabelStore "
                                   f"on {self.folder} (two notebooks on one folder?): this choice was not saved; the "
                                   f"store now continues at pair {self.shown + 1}")
        raise LabelFolderError(f"{self.path} no longer holds the {len(mine)} labels this store saved "
                               f"({'unreadable' if saved is None else f'{len(saved)} labels'}): it was changed "
                               "outside this store and is not overwritten; make a new LabelStore on the folder to "
                               "continue from what it holds")

    def labels(self) -> np.ndarray:
        """``(L,)`` the ``label_0`` of every recorded label, in labelling order."""
        return np.array([r["label_0"] for r in self.rows], dtype=float)

    def progress(self) -> str:
        """E.g. ``"37 / 150 shown, 35 labelled"``."""
        return f"{self.shown} / {len(self.pairs)} shown, {len(self.rows)} labelled"


def is_int(value) -> bool:
    """True for an integer from JSON (``true`` and ``1.0`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


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
        self.status.value = f"{s.progress()}; saved to {files.shown_path(s.folder / 'train.parquet')}"
        if s.done:
            self.caption.value = "<i>all pairs shown: train on your labels below</i>"
            for b in self.buttons:
                b.disabled = True
            return
        i = s.shown
        self.caption.value = f"pair {i + 1}: <b>{s.pairs.captions[i]}</b>"
        for image, array in zip(self.images, (s.pairs.img0[i], s.pairs.img1[i])):
            image.value = _png(array, self.scale)
