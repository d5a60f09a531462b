"""The Pick-a-Pic v2 format (Kirstain et al. 2023, ``yuvalkirstain/pickapic_v2``): schema, rows, files.

One row is one human judgement: a ``caption``, two generated images as JPEG bytes (``jpg_0``,
``jpg_1``) and ``label_0`` (1: image 0 preferred, 0: image 1 preferred, 0.5: a tie;
``label_1 = 1 - label_0``), plus bookkeeping columns. Everything that *writes* this format — the toy
pairs, notebook 08's labelling, the tests' stand-ins — builds rows with :func:`pickapic_row` and files
with :func:`write_pickapic_parquet`, so a file written here is read by ``load_pickapic`` exactly like
the hub's parquet shards.
"""
from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from . import files

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def pickapic_arrow_schema():
    """The pyarrow schema of Pick-a-Pic v2's parquet files (column order as on the hub)."""
    s, b, i = pa.string(), pa.bool_(), pa.int64()
    return pa.schema([("are_different", b), ("best_image_uid", s), ("caption", s),
                      ("created_at", pa.timestamp("ns")), ("has_label", b), ("image_0_uid", s),
                      ("image_0_url", s), ("image_1_uid", s), ("image_1_url", s), ("jpg_0", pa.binary()),
                      ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("label_1", pa.float64()),
                      ("model_0", s), ("model_1", s), ("ranking_id", i), ("user_id", i),
                      ("num_example_per_prompt", i)])


def schema_text() -> str:
    """``"are_different: bool, best_image_uid: string, ..."``: the schema for error messages."""
    return ", ".join(f"{f.name}: {f.type}" for f in pickapic_arrow_schema())


def encode_image(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as image bytes (JPEG quality 95 by default; ``mode`` e.g. 'L')."""
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def pickapic_row(caption: str, jpg_0: bytes, jpg_1: bytes, label_0: float, ranking_id: int = 0, *,
                 uids: tuple[str, str] | None = None, created_at=None, model: str = "tiny",
                 user_id: int | None = None, num_example_per_prompt: int = 1,
                 url: str = "https://example.invalid/{}.jpg") -> dict:
    """One row in the exact Pick-a-Pic v2 schema; ``best_image_uid`` follows ``label_0`` ("" for a tie).

    Unless given, the uids derive from ``ranking_id``, ``created_at`` is 2023-01-01 and ``user_id`` is
    ``ranking_id % 7``.
    """
    uid0, uid1 = uids or (f"{ranking_id:08d}-0", f"{ranking_id:08d}-1")
    label_0 = float(label_0)
    best = "" if label_0 == 0.5 else (uid0 if label_0 > 0.5 else uid1)
    return {"are_different": jpg_0 != jpg_1, "best_image_uid": best, "caption": caption,
            "created_at": datetime(2023, 1, 1) if created_at is None else created_at, "has_label": True,
            "image_0_uid": uid0, "image_0_url": url.format(uid0), "image_1_uid": uid1,
            "image_1_url": url.format(uid1), "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label_0,
            "label_1": 1.0 - label_0, "model_0": model, "model_1": model, "ranking_id": int(ranking_id),
            "user_id": int(ranking_id % 7 if user_id is None else user_id),
            "num_example_per_prompt": int(num_example_per_prompt)}


def write_pickapic_parquet(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` (dicts from :func:`pickapic_row`) as one Pick-a-Pic v2 parquet file; return its path.

    Written under a temporary name of its own, flushed to disk and renamed into place, so a reader (or a
    machine that lost power) sees the old file or the new one, never half a file, and two writers never
    share a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=pickapic_arrow_schema()), str(tmp))
    return path
