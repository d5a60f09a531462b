"""Pick-a-Pic v2 preference pairs: loading, tie removal, winner-first order, paired transforms.

A Pick-a-Pic row holds one caption, two JPEGs (``jpg_0``, ``jpg_1``) and ``label_0`` (1: image 0 was
preferred, 0: image 1 was, 0.5: a tie; ``label_1 = 1 - label_0``). A training batch of ``B`` pairs is
laid out as ``2B`` images: the ``B`` winners ``x_w`` first, then the ``B`` losers ``x_l`` in the same
pair order; row ``i`` and row ``i + B`` share a caption (and, in training, noise and timestep).
Both images of a pair get the *same* crop window and the *same* flip.

Images are decoded by this module only (:func:`decode_image`): whatever feature type a dataset declares
for a column (a ``datasets`` ``Image`` feature, say), ``datasets`` hands over the stored bytes, never a
decoded image and never a file it read from a path the dataset names.
"""
from __future__ import annotations

import dataclasses
import io
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets.features.features import require_decoding
from PIL import Image, ImageOps

from .errors import DataError
from .hub import check_hub_reachable, is_hub_id
from .pickapic import REQUIRED_COLUMNS, schema_text

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # what a preference dataset holds; nothing else is even opened
MAX_ASPECT_RATIO = 8.0  # longer side / shorter side; beyond it the resize to the training size explodes
MAX_IMAGE_PIXELS = 64_000_000  # per image, before resizing (PIL's own bomb limit is ~179 M)


class SkipRow(ValueError):
    """A row that cannot be a training pair; ``reason`` names why (counted under that name, never fatal).

    Reasons: ``tie``, ``invalid`` (label), ``bad_caption`` (not text), ``missing_image`` (None),
    ``not_bytes`` (e.g. a string), ``image_path`` (no bytes, only a ``path``: a file name or URL that
    an image feature points to; the project never opens it, inside the dataset's folder or not),
    ``undecodable`` (empty, corrupt or not JPEG/PNG/WebP), ``oversized`` (extreme aspect ratio or size).
    Only this exception is skipped: any other error in a row (a plain ``ValueError`` included) is a bug and
    propagates. It subclasses ``ValueError`` so older callers that caught that keep working.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------- loading
def local_parquet_files(root: Path, split: str) -> list[str]:
    """Parquet files of ``split`` under a local folder, in the layouts people actually have (a file: itself)."""
    if root.is_file():
        return [str(root)]
    for pattern in (f"{split}.parquet", f"{split}/*.parquet", f"data/{split}-*.parquet",
                    f"data/{split}/*.parquet", f"{split}-*.parquet"):
        files = sorted(root.glob(pattern))
        if files:
            return [str(f) for f in files]
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))[:10]
    raise DataError(f"no parquet files for split {split!r} under {root}; looked for {split}.parquet, "
                    f"{split}/*.parquet and data/{split}-*.parquet; found: {found or 'no parquet files'}")


def hub_dataset_error(source: str, split: str, err: Exception) -> DataError:
    """The one-line error for a hub dataset that could not be reached or read."""
    return DataError(f"could not load dataset {source!r} split {split!r} from the Hugging Face Hub "
                     f"({type(err).__name__}: {str(err)[:200]}). Offline? Pass a local parquet file "
                     "or folder in the Pick-a-Pic v2 schema instead.")


def check_dataset_source(source: str, split: str = "train") -> None:
    """Fail at once, before anything loads, when ``source`` is a hub id and the Hub cannot be reached."""
    if is_hub_id(source) and not Path(source).expanduser().exists():
        try:
            check_hub_reachable(f"dataset {source!r}")
        except ConnectionError as err:
            raise hub_dataset_error(source, split, err) from err


def load_pickapic(source: str, split: str = "train", streaming: bool = False):
    """Load Pick-a-Pic-format pairs from a hub id, a folder of parquet files or one ``.parquet`` file.

    Returns a ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) after checking that the
    required columns are present (:func:`check_columns`).
    """
    path = Path(source).expanduser()
    if path.is_file():
        files: list[str] | None = [str(path)]
    elif path.is_dir():
        files = local_parquet_files(path, split)
    elif not is_hub_id(source):
        raise DataError(f"dataset {source!r} does not exist: expected a .parquet file, a folder of "
                        "parquet files or a hub id such as 'yuvalkirstain/pickapic_v2'")
    else:
        files = None
    if files is not None:
        check_parquet_files(files)
    try:
        if files is not None:
            ds = datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming,
                                       features=stored_features(files[0]))
        else:
            check_hub_reachable(f"dataset {source!r}")  # fails at once offline instead of retrying
            ds = datasets.load_dataset(source, split=split, streaming=streaming)
    except datasets.exceptions.DatasetGenerationError as err:
        raise DataError(f"could not read dataset {source!r} split {split!r} ({str(err.__cause__ or err)[:200]})") from err
    except (ConnectionError, OSError) as err:
        raise hub_dataset_error(source, split, err) from err
    ds = without_decoding(ds)
    check_columns(ds.column_names, source)
    if not streaming and len(ds) == 0:
        raise DataError(f"dataset {source!r} split {split!r} has 0 rows: expected Pick-a-Pic-format pairs")
    return ds


def stored_features(file: str):
    """The ``datasets.Features`` of a parquet file's columns as stored, ignoring the features it declares.

    A parquet file may carry ``datasets`` features in its schema metadata (``jpg_0`` as an ``Image``, say);
    those would make ``datasets`` open a ``path`` the file names and decode images before
    :func:`decode_image` sees them. Here an image column is the plain struct ``{"bytes", "path"}`` it is
    stored as; a type arrow itself marks as decodable (JSON) gets ``decode=False``.
    """
    return feature_without_decoding(datasets.Features.from_arrow_schema(pq.read_schema(file).remove_metadata()))


def feature_without_decoding(feature):
    """``feature`` with decoding switched off wherever a decodable feature (Image, Audio, Video, Pdf, JSON, ...)
    sits, nested ones included: such a column then reads as what is stored, e.g. ``{"bytes": ..., "path": ...}``."""
    if isinstance(feature, datasets.Features):
        return datasets.Features({k: feature_without_decoding(v) for k, v in feature.items()})
    if isinstance(feature, dict):
        return {k: feature_without_decoding(v) for k, v in feature.items()}
    if isinstance(feature, (list, tuple)):
        return [feature_without_decoding(feature[0])]
    if dataclasses.is_dataclass(feature):
        fields = {f.name for f in dataclasses.fields(feature)}
        if "decode" in fields:
            return dataclasses.replace(feature, decode=False)
        if "feature" in fields:  # List, LargeList, Sequence: their element type
            return dataclasses.replace(feature, feature=feature_without_decoding(feature.feature))
    return feature


def without_decoding(ds):
    """``ds`` (a ``Dataset`` or ``IterableDataset``) reading every column as stored, whatever features it declares.

    A top-level media column is switched to ``decode=False`` in place (no copy of the data); a media feature
    nested deeper needs a full cast (rare). Raises :class:`DataError` if decoding could not be switched off.
    """
    features = ds.features
    if not features or not require_decoding(features):  # unknown features: datasets decodes nothing either
        return ds
    if isinstance(ds, datasets.IterableDataset):
        ds = ds.cast(feature_without_decoding(features))  # lazy: applied to each streamed row
    else:
        for name, feature in features.items():
            plain = feature_without_decoding(feature)
            if hasattr(plain, "decode_example"):
                ds = ds.cast_column(name, plain)  # only the feature changes, not the data
        if require_decoding(ds.features):
            ds = ds.cast(feature_without_decoding(ds.features))
    if ds.features and require_decoding(ds.features):
        raise DataError(f"could not switch off decoding of the dataset's features {ds.features}: expected raw "
                        "image bytes in jpg_0 and jpg_1")
    return ds


# arrow type names each required column may have (datasets' Image feature is a struct with bytes)
_COLUMN_TYPES = {"caption": ("string", "large_string", "null"),
                 "label_0": ("double", "float", "int", "uint", "halffloat", "null"),
                 "jpg_0": ("binary", "large_binary", "struct"), "jpg_1": ("binary", "large_binary", "struct")}


def _type_ok(column: str, arrow_type) -> bool:
    name = str(arrow_type)
    return any(name.startswith(t) for t in _COLUMN_TYPES[column])


def check_parquet_files(files: list[str]) -> None:
    """Before loading: every file is parquet, the required columns have usable types and every file agrees.

    Raises :class:`DataError` naming the file (not parquet, wrong column type) or the mixed schemas.
    """
    first, rows = None, 0
    for f in files:
        try:
            schema = pq.read_schema(f)
            rows += pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{f} is not a readable parquet file ({str(err)[:120]}): expected Pick-a-Pic "
                            "v2 parquet") from err
        check_columns(schema.names, f)
        twice = sorted({name for name in schema.names if schema.names.count(name) > 1})
        if twice:
            raise DataError(f"{f} has {len(schema.names) - len(set(schema.names))} duplicate column(s) named "
                            f"{', '.join(map(repr, twice))}: expected each column once")
        types = {c: schema.field(c).type for c in REQUIRED_COLUMNS}
        bad = [f"{c} is {t}" for c, t in types.items() if not _type_ok(c, t)]
        if bad:
            raise DataError(f"{f}: {'; '.join(bad)}: expected caption string, label_0 numeric, jpg_0/jpg_1 "
                            "binary image bytes")
        if first is None:
            first = (f, types)
        elif types != first[1]:
            diffs = [f"{c}: {first[1][c]} vs {types[c]}" for c in REQUIRED_COLUMNS if types[c] != first[1][c]]
            raise DataError(f"{first[0]} and {f} have different schemas ({'; '.join(diffs)}): expected one "
                            "schema for all files of a split")
        check_text_columns(f, schema)
    if rows == 0:
        raise DataError(f"{files[0] if len(files) == 1 else f'{len(files)} parquet files'} hold 0 rows: expected "
                        "Pick-a-Pic-format pairs")


def check_text_columns(file: str, schema) -> None:
    """Raise :class:`DataError` naming the file, column and row when a text column holds bytes that are not UTF-8.

    Only the text columns are read (image columns stay on disk); arrow stores text unchecked, so a bad
    caption would otherwise surface as a ``UnicodeDecodeError`` when its row is first read.
    """
    names = [fld.name for fld in schema if pa.types.is_string(fld.type) or pa.types.is_large_string(fld.type)]
    if not names:
        return
    table = pq.read_table(file, columns=names)
    for name in names:
        column = table.column(name)
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            row = _first_invalid_utf8(column)
            raise DataError(f"{file}: column {name!r} row {row} is not UTF-8 text "
                            f"({column.cast(pa.large_binary())[row].as_py()[:40]!r}): expected UTF-8 strings") from None


def _first_invalid_utf8(column) -> int:
    """Index of the first value of an arrow text column that is not valid UTF-8 (-1 if none)."""
    for i, value in enumerate(column.cast(pa.large_binary()).to_pylist()):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return i
    return -1


def check_columns(column_names, source: str = "dataset") -> None:
    """Fail at once when a required Pick-a-Pic column is missing, naming it and the expected schema."""
    if column_names is None:  # a stream whose features are unknown: checked on the first row instead
        return
    missing = [c for c in REQUIRED_COLUMNS if c not in column_names]
    if missing:
        schema = schema_text()
        raise DataError(f"{source} is missing required column(s) {missing} (has {list(column_names)}). "
                        f"Expected the Pick-a-Pic v2 schema; required: {list(REQUIRED_COLUMNS)}; full: {schema}")


def pair_order(label_0) -> str:
    """``'0'`` when image 0 won, ``'1'`` when image 1 won, ``'tie'`` for 0.5, ``'invalid'`` otherwise.

    Labels strictly between 0 and 1 (averaged votes) go to the larger side; NaN, None or values outside
    [0, 1] are invalid.
    """
    if label_0 is None or isinstance(label_0, (str, bytes)):
        return "invalid"
    try:
        label = float(label_0)
    except (TypeError, ValueError):
        return "invalid"
    if math.isnan(label) or not 0.0 <= label <= 1.0:
        return "invalid"
    if label == 0.5:
        return "tie"
    return "0" if label > 0.5 else "1"


def winner_first(label_0) -> tuple[int, int]:
    """``(winner, loser)``: the indices of a row's two images, the preferred one first (``(0, 1)`` when image 0 won).

    The one rule that orders a pair, for images and for the latent cache alike. Raises :class:`SkipRow`
    (``tie`` or ``invalid``) for a label that names no winner (:func:`pair_order`).
    """
    order = pair_order(label_0)
    if order in ("tie", "invalid"):
        raise SkipRow(order)
    return (0, 1) if order == "0" else (1, 0)


def winners_then_losers(winners: list[torch.Tensor], losers: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``B`` winner and ``B`` loser tensors into the ``(2B, ...)`` layout: winners first, then the losers
    in the same pair order (row ``i`` and row ``i + B`` are one pair)."""
    return torch.cat([torch.stack(winners), torch.stack(losers)])


# ---------------------------------------------------------------------------------------- decoding
def decode_image(data) -> Image.Image:
    """JPEG, PNG or WebP bytes (or a PIL image) -> the RGB PIL image a viewer shows.

    Grayscale, CMYK, palette and RGBA are converted to RGB; a 16-bit PNG is scaled to 8 bits and an EXIF
    orientation is applied (:func:`as_displayed`). Only :data:`IMAGE_FORMATS` are opened (an EPS, PDF or GIF
    row never reaches another decoder), and the size is checked (:func:`check_image_size`) before any pixel
    is decoded. A ``{"bytes": ..., "path": ...}`` dict (an image feature as stored) gives its bytes; a path
    alone is never opened. Raises :class:`SkipRow`: ``missing_image`` for None, ``not_bytes`` for a string
    or other type, ``image_path`` for a dict with a path but no bytes, ``undecodable`` for empty, corrupt or
    other-format bytes, ``oversized`` for an extreme shape.
    """
    if isinstance(data, Image.Image):
        check_image_size(data.size)
        return as_displayed(data)
    if isinstance(data, dict):  # an image feature as stored: {"bytes": ..., "path": ...}
        if data.get("bytes") is None and data.get("path"):
            raise SkipRow("image_path", f"{str(data['path'])[:100]!r}: images are read from the dataset's bytes only")
        data = data.get("bytes")
    if data is None:
        raise SkipRow("missing_image")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SkipRow("not_bytes", type(data).__name__)
    if not data:
        raise SkipRow("undecodable", "empty image bytes")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            check_image_size(img.size)
            img.load()
            return as_displayed(img)
    except SkipRow:
        raise
    except Exception as err:  # PIL raises several types for truncated, corrupt or unsupported data
        raise SkipRow("undecodable", f"{type(err).__name__}: {str(err)[:100]}") from err


EXIF_ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 mirrored and/or rotated by 90/180/270 degrees


def as_displayed(img: Image.Image) -> Image.Image:
    """The RGB image a viewer shows: EXIF orientation applied, 16-bit greyscale scaled to 8 bits.

    A 16-bit value ``v`` in ``[0, 65535]`` becomes ``round(v / 257)`` (the inverse of the usual 8 -> 16 bit
    expansion ``v8 * 257``), so 30% grey stays 30% grey instead of clipping to white. The orientation tag
    (JPEG, PNG or WebP EXIF) turns a portrait photo stored sideways upright; an unreadable EXIF block
    counts as upright, as in most viewers.
    """
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block is ignored, not fatal
        orientation = 1
    if orientation in range(2, 9):
        img = ImageOps.exif_transpose(img)
    if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit greyscale PNG: (H, W) values in [0, 65535]
        grey = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.rint(np.clip(grey, 0, 65535) / 257).astype(np.uint8), "L")
    return img.convert("RGB")


def check_image_size(size: tuple[int, int]) -> None:
    """Raise ``SkipRow('oversized')`` for an image too large or too elongated to resize cheaply.

    A 1 x 2,000,000 px PNG is 2 KB but resizing its short side to 512 px asks for ~25 GB.
    """
    w, h = size
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO or w * h > MAX_IMAGE_PIXELS:
        raise SkipRow("oversized", f"{w}x{h} px (at most {MAX_ASPECT_RATIO:g}:1 and {MAX_IMAGE_PIXELS} px)")


@dataclass
class PairTransform:
    """Resize (shorter side), crop and flip applied *identically* to both images of a pair."""

    resolution: int
    random_crop: bool = False
    random_flip: bool = True

    def transform_image(self, img: Image.Image, fx: float, fy: float, flip: bool):
        """One image: shorter side resized to ``resolution``, cropped at relative ``(fx, fy)``, maybe flipped.

        Returns ``(x, (h, w), (top, left))``: ``(3, H, W)`` pixels in [-1, 1], the size before resizing and
        the crop window's top-left (SDXL micro-conditioning).
        """
        w, h = img.size
        check_image_size((w, h))  # bounds the resize below to MAX_ASPECT_RATIO * resolution**2 pixels
        scale = self.resolution / min(w, h)
        new_w, new_h = max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))
        img = img.resize((new_w, new_h), Image.BILINEAR)
        left = round(fx * (new_w - self.resolution))
        top = round(fy * (new_h - self.resolution))
        img = img.crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            left = new_w - left - self.resolution  # the window's top-left in the flipped frame
        array = np.asarray(img, dtype=np.float32)  # (H, W, 3) in [0, 255]
        x = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        return x, (h, w), (top, left)

    def decide(self, rng: random.Random) -> tuple[float, float, bool]:
        """The pair's crop window (relative x, y in [0, 1]) and flip, drawn once for both images."""
        fx, fy = (rng.random(), rng.random()) if self.random_crop else (0.5, 0.5)
        return fx, fy, self.random_flip and rng.random() < 0.5

    def __call__(self, img_a: Image.Image, img_b: Image.Image, rng: random.Random):
        """Transform both images with one crop window (relative position) and one flip decision."""
        fx, fy, flip = self.decide(rng)
        return self.transform_image(img_a, fx, fy, flip), self.transform_image(img_b, fx, fy, flip)


def drop_caption(caption: str | None, rng: random.Random, empty_prompt_prob: float) -> str:
    """The caption, or ``""`` with probability ``empty_prompt_prob`` (the official code uses 0.2)."""
    if empty_prompt_prob > 0 and rng.random() < empty_prompt_prob:
        return ""
    return caption or ""


@dataclass
class PairExample:
    """One preference pair, ready for collation: the winner ``x_w`` and the loser ``x_l``."""

    caption: str
    x_w: torch.Tensor  # (3, H, W) in [-1, 1]
    x_l: torch.Tensor  # (3, H, W) in [-1, 1]
    original_size_w: tuple[int, int]  # (height, width) before resizing: SDXL micro-conditioning
    original_size_l: tuple[int, int]
    crop_top_left_w: tuple[int, int]  # (top, left) of the crop window
    crop_top_left_l: tuple[int, int]


def make_example(row: dict, transform: PairTransform, rng: random.Random,
                 empty_prompt_prob: float = 0.0) -> PairExample:
    """Turn one dataset row into a winner-first :class:`PairExample`.

    Raises :class:`SkipRow` for ties, invalid labels, a caption that is not text, or images that are
    missing, not bytes, undecodable or oversized (callers skip and count by reason).
    """
    winner, loser = winner_first(row["label_0"])
    if row["caption"] is not None and not isinstance(row["caption"], str):
        raise SkipRow("bad_caption", type(row["caption"]).__name__)
    img_w, img_l = decode_image(row[f"jpg_{winner}"]), decode_image(row[f"jpg_{loser}"])
    (x_w, size_w, crop_w), (x_l, size_l, crop_l) = transform(img_w, img_l, rng)
    caption = drop_caption(row["caption"], rng, empty_prompt_prob)
    return PairExample(caption, x_w, x_l, size_w, size_l, crop_w, crop_l)


def collate_pairs(examples: list[PairExample]) -> dict:
    """Stack ``B`` pairs into the ``2B`` winners-then-losers layout.

    Returns ``pixel_values`` ``(2B, 3, H, W)``, ``captions`` (``B`` strings, one per pair),
    ``original_sizes`` and ``crop_top_lefts`` ``(2B, 2)`` (winners then losers).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of pairs")
    def pair(w, l) -> torch.Tensor:
        return winners_then_losers([torch.as_tensor(getattr(e, w)) for e in examples],
                                   [torch.as_tensor(getattr(e, l)) for e in examples])

    return {
        "pixel_values": pair("x_w", "x_l"),  # (2B, 3, H, W)
        "captions": [e.caption for e in examples],
        "original_sizes": pair("original_size_w", "original_size_l").long(),  # (2B, 2)
        "crop_top_lefts": pair("crop_top_left_w", "crop_top_left_l").long(),  # (2B, 2)
    }


# ------------------------------------------------------------------------------------- iteration
def usable_rows(labels) -> tuple[list[int], Counter]:
    """The indices of the rows whose ``label_0`` names a winner, and the count of every :func:`pair_order`; raises
    :class:`DataError` when no row is usable (all ties or invalid labels)."""
    orders = [pair_order(label) for label in labels]
    counts = Counter(orders)
    keep = [i for i, o in enumerate(orders) if o in ("0", "1")]
    if not keep:
        raise DataError(f"no usable pairs: {len(orders)} rows, {counts['tie']} ties, {counts['invalid']} invalid "
                        "labels (label_0 must be 0, 1 or in between)")
    return keep, counts


@dataclass
class PairStream:
    """Endless, seeded, resumable stream of batches of winner-first pairs.

    Each epoch visits the non-tie rows in a fresh seeded order (``datasets.Dataset``) or a seeded
    shuffle buffer (``IterableDataset``). Ties, invalid labels and undecodable images are skipped and
    counted once each in ``skipped`` — a bad row never stops training. ``state_dict()`` / ``load_state_dict()``
    record the epoch and position so a resumed run sees exactly the pairs it would have seen.
    """

    dataset: object
    transform: PairTransform
    batch_size: int
    seed: int = 0
    empty_prompt_prob: float = 0.0
    max_pairs: int | None = None
    make: object = None  # (row, rng) -> example; default: decode and transform (make_example)
    collate: object = collate_pairs
    rank: int = 0  # map-style data: this process takes every world_size-th pair of the shared order
    world_size: int = 1
    epoch: int = 0
    position: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.streaming = not hasattr(self.dataset, "__len__")
        self.first_captions: list[str] = []  # captions of the first batch (for the sample grid)
        self.ties = self.invalid_labels = 0  # counted up front for map-style data, in `skipped` when streamed
        self._indices = None if self.streaming else self._valid_indices()

    def _valid_indices(self) -> list[int]:
        """Row indices with a usable label (ties and invalid labels counted, once)."""
        keep, counts = usable_rows(self.dataset["label_0"])
        self.ties, self.invalid_labels = counts["tie"], counts["invalid"]
        return keep[: self.max_pairs] if self.max_pairs else keep

    def __len__(self) -> int:
        """Number of usable pairs per epoch (non-streaming datasets only)."""
        if self._indices is None:
            raise TypeError("a streamed dataset has no length")
        return len(self._indices)

    def _rows(self):
        """Yield ``(key, row)`` for the current epoch, starting at ``self.position``."""
        if self.streaming:
            ds = self.dataset.shuffle(seed=self.seed, buffer_size=1000)
            ds.set_epoch(self.epoch)
            usable = 0  # rows with a winner, as max_pairs counts them for a loaded dataset (_valid_indices)
            for i, row in enumerate(ds):
                if self.max_pairs and usable >= self.max_pairs:
                    return
                usable += pair_order(row.get("label_0")) in ("0", "1")
                if i >= self.position:
                    yield i, row
            return
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self._indices), generator=g).tolist()[self.rank::self.world_size]
        for i in range(self.position, len(order)):
            yield i, self.dataset[self._indices[order[i]]]

    def _examples(self):
        while True:
            whole_pass, produced, seen = self.position == 0, False, Counter()
            for i, row in self._rows_checked():
                self.position = i + 1
                rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
                try:
                    example = (self.make(row, rng) if self.make else
                               make_example(row, self.transform, rng, self.empty_prompt_prob))
                except KeyError as err:
                    check_columns(list(row), "streamed dataset")
                    raise DataError(f"row {i} has no column {err}") from err
                except SkipRow as skip:
                    seen[skip.reason] += 1
                    if self.epoch == 0:  # later epochs meet the same bad rows again: count each once
                        self.skipped[skip.reason] += 1
                    continue
                produced = True
                yield example
            if not produced and whole_pass:
                raise DataError(self._nothing_usable(seen))
            self.epoch, self.position = self.epoch + 1, 0

    def _rows_checked(self):
        """:meth:`_rows`; a row whose text is not UTF-8 (a hub dataset, unchecked up front) is a :class:`DataError`."""
        try:
            yield from self._rows()
        except UnicodeDecodeError as err:
            raise DataError(f"row {self.position} of the dataset holds text that is not UTF-8 ({err}): expected "
                            "UTF-8 strings") from err

    def _nothing_usable(self, seen: Counter) -> str:
        """``'0 of 16 rows usable: 16 undecodable'``: why a whole pass gave no pair, by cause."""
        seen = seen + Counter({"tie": self.ties, "invalid": self.invalid_labels})
        causes = ", ".join(f"{n} {reason}" for reason, n in seen.most_common() if n)
        return (f"0 of {sum(seen.values())} rows usable: {causes or 'no rows'} (expected label_0 in [0, 1] "
                "but not 0.5, a text caption and JPEG/PNG/WebP bytes in jpg_0 and jpg_1)")

    def __iter__(self):
        """Yield collated batches of ``batch_size`` pairs forever (epochs roll over)."""
        buffer = []
        for example in self._examples():
            buffer.append(example)
            if len(buffer) == self.batch_size:
                self.first_captions = self.first_captions or [e.caption for e in buffer]
                yield self.collate(buffer)
                buffer = []

    def state_dict(self) -> dict:
        """Where the stream is, so a resumed run continues with the very next pair."""
        return {"epoch": self.epoch, "position": self.position, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = Counter(state.get("skipped", {}))
