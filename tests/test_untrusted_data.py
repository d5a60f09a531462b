"""Hostile or damaged datasets (docs/THREAT_MODEL.md, "Datasets"): images are decoded by the project only, a
16-bit or EXIF-rotated image decodes to what a viewer shows, and text the project cannot read is one line."""
import io
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_rows
from PIL import Image, ImageFile

from dpo_tutorial import data
from dpo_tutorial.cli import main
from dpo_tutorial.data import DataError, PairStream, PairTransform, SkipRow, decode_image, load_pickapic
from dpo_tutorial.pickapic import pickapic_arrow_schema


def image_bytes(array: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **save)
    return buf.getvalue()


def image_features(**extra) -> datasets.Features:
    """The Pick-a-Pic v2 columns with ``jpg_0`` / ``jpg_1`` declared as ``datasets`` Image features."""
    features = datasets.Features.from_arrow_schema(pickapic_arrow_schema())
    features["jpg_0"] = features["jpg_1"] = datasets.Image()
    features.update(extra)
    return features


def as_feature(rows: list[dict], **extra) -> list[dict]:
    """Pick-a-Pic rows with each image as an Image feature stores it: ``{"bytes": ..., "path": ...}``."""
    wrap = (lambda v: v if isinstance(v, dict) else {"bytes": v, "path": None})
    return [{**r, "jpg_0": wrap(r["jpg_0"]), "jpg_1": wrap(r["jpg_1"]), **extra} for r in rows]


def feature_parquet(path, rows: list[dict]):
    """A parquet file whose schema metadata declares ``jpg_0`` / ``jpg_1`` as Image features (what
    ``Dataset.to_parquet`` writes for a dataset with Image columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(as_feature(rows), schema=image_features().arrow_schema), path)
    return path


def skips_after_one_epoch(dataset, n_good: int):
    """The skip counts of a :class:`PairStream` over ``dataset`` once its first epoch has been read through."""
    stream = PairStream(dataset, PairTransform(16), batch_size=1, seed=0)
    batches = iter(stream)
    for _ in range(n_good + 1):  # the last batch comes from the second epoch: the first was read to its end
        next(batches)
    return stream.skipped


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model starts loading: every error below must come first."""
    monkeypatch.setattr(sys.modules["dpo_tutorial.train"], "load_parts",
                        lambda *a, **k: pytest.fail("a model was loaded"))


# ------------------------------------------------------------------------ images: decoded by the project only
@pytest.fixture
def outside_png(tmp_path):
    """A PNG outside every dataset folder (a file the dataset must not make training read)."""
    path = tmp_path / "elsewhere" / "private.png"
    path.parent.mkdir()
    path.write_bytes(image_bytes(np.full((16, 16, 3), (200, 0, 0), np.uint8)))
    return path


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("where", ["outside", "inside", "url"])
def test_an_image_feature_path_is_never_opened_but_counted(where, streaming, tmp_path, outside_png):
    folder = tmp_path / "pairs"
    folder.mkdir()
    inside = folder / "inside.png"
    inside.write_bytes(outside_png.read_bytes())
    path = {"outside": str(outside_png), "inside": str(inside), "url": "https://example.invalid/x.png"}[where]
    rows = make_rows(4)[:4]
    rows[2]["jpg_0"] = {"bytes": None, "path": path}  # label_0 = 1: the winner is the path
    feature_parquet(folder / "train.parquet", rows)
    dataset = load_pickapic(str(folder), streaming=streaming)
    row = next(r for i, r in enumerate(dataset) if i == 2)
    assert row["jpg_0"] == {"bytes": None, "path": path}  # handed over as stored: datasets opened nothing
    with pytest.raises(SkipRow) as skip:
        decode_image(row["jpg_0"])
    assert skip.value.reason == "image_path" and path[:40] in str(skip.value)
    assert skips_after_one_epoch(dataset, 3) == {"image_path": 1}


@pytest.mark.slow
def test_training_on_a_dataset_pointing_outside_counts_the_row_and_reads_nothing(sd_dir, tmp_path, outside_png):
    """The attack end to end: ``train`` used to learn from the outside file with ``undecodable_skipped: 0``."""
    from dpo_tutorial.config import TrainConfig
    from dpo_tutorial.train import train

    rows = make_rows(4)[:2]
    rows[1]["jpg_0"] = {"bytes": None, "path": str(outside_png)}
    path = feature_parquet(tmp_path / "pairs" / "train.parquet", rows)
    config = TrainConfig(pretrained=str(sd_dir), dataset=str(path), output_dir=str(tmp_path / "run"), resolution=32,
                         batch_size=1, max_steps=2, rank=4, sample_grid=False)  # 2 steps: both rows are met
    with pytest.warns(UserWarning, match=r"skipped 0 pair\(s\) whose images did not decode .*, 1 image_path"):
        history = train(config)
    assert history.data_summary == {"ties_dropped": 0, "invalid_labels": 0, "undecodable_skipped": 0,
                                    "image_path_skipped": 1}


@pytest.mark.parametrize("streaming", [False, True])
def test_image_feature_bytes_decode_like_plain_bytes(streaming, tmp_path):
    rows = make_rows(4)[:4]
    for r in rows:  # a path next to the bytes (the file name an Image feature keeps) is ignored, never opened
        r["jpg_1"] = {"bytes": r["jpg_1"], "path": str(tmp_path / "missing.jpg")}
    plain = make_rows(4)[:4]
    dataset = load_pickapic(str(feature_parquet(tmp_path / "train.parquet", rows)), streaming=streaming)
    for row, expected in zip(dataset, plain):
        for key in ("jpg_0", "jpg_1"):
            np.testing.assert_array_equal(np.asarray(decode_image(row[key])), np.asarray(decode_image(expected[key])))
    assert skips_after_one_epoch(dataset, 4) == {}


def test_gif_wrapped_in_an_image_feature_is_still_refused(tmp_path):
    rows = make_rows(4)[:4]
    gif = image_bytes(np.full((16, 16, 3), 90, np.uint8), "GIF")
    with pytest.raises(SkipRow, match="undecodable"):  # as plain bytes: refused by the allow-list
        decode_image(gif)
    rows[1]["jpg_1"] = gif
    dataset = load_pickapic(str(feature_parquet(tmp_path / "train.parquet", rows)))
    assert dataset[1]["jpg_1"] == {"bytes": gif, "path": None}
    assert skips_after_one_epoch(dataset, 3) == {"undecodable": 1}


def test_oversized_image_in_a_feature_is_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    """The size check comes before decoding for feature images too (a 9000 x 9000 PNG, scaled down here)."""
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 150 * 150)
    loaded = []
    original = ImageFile.ImageFile.load

    def spy(img):
        loaded.append(img.size)
        return original(img)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    rows = make_rows(4)[:4]
    rows[0]["jpg_0"] = image_bytes(np.zeros((200, 200, 3), np.uint8))
    dataset = load_pickapic(str(feature_parquet(tmp_path / "train.parquet", rows)))
    assert skips_after_one_epoch(dataset, 3) == {"oversized": 1}
    assert (200, 200) not in loaded and loaded  # the others were decoded, the big one never


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_dataset_declaring_image_features_is_read_as_bytes(streaming, monkeypatch, outside_png):
    """The hub route (network replaced): declared Image features, nested ones included, are not decoded."""
    rows = make_rows(4)[:4]
    rows[3]["jpg_1"] = {"bytes": None, "path": str(outside_png)}
    features = image_features(extra={"thumb": datasets.Image()})
    hub = datasets.Dataset.from_list(as_feature(rows, extra={"thumb": {"bytes": None, "path": str(outside_png)}}),
                                     features=features)
    asked = []

    def fake_load_dataset(source, split, streaming):
        asked.append(source)
        return hub.to_iterable_dataset() if streaming else hub

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "check_hub_reachable", lambda what: None)
    dataset = load_pickapic("someone/hostile-pairs", streaming=streaming)
    assert asked == ["someone/hostile-pairs"]
    last = list(dataset)[3]
    assert last["jpg_1"] == {"bytes": None, "path": str(outside_png)}
    assert last["extra"] == {"thumb": {"bytes": None, "path": str(outside_png)}}
    assert skips_after_one_epoch(dataset, 3) == {"image_path": 1}


# ----------------------------------------------------------------------------- decoding: what a viewer shows
@pytest.mark.parametrize("grey", [0, 1, 77, 128, 254, 255])
def test_16_bit_png_decodes_to_its_8_bit_grey(grey):
    png = image_bytes(np.full((4, 6), grey * 257, np.uint16))  # the usual 8 -> 16 bit expansion
    with Image.open(io.BytesIO(png)) as img:
        assert img.mode.startswith("I")  # PIL's 16-bit greyscale: the case that clipped to white
    out = decode_image(png)
    assert out.mode == "RGB" and out.size == (6, 4)
    assert (np.asarray(out) == grey).all()


def test_16_bit_values_round_to_the_nearest_8_bit_grey():
    values = np.array([[0, 128, 129, 19661, 65406, 65407, 65535]], np.uint16)  # 19661: 30% grey
    expected = [0, 0, 1, 77, 254, 255, 255]  # round(v / 257): 0.498, 0.502, 76.502, 254.498, 254.502
    np.testing.assert_array_equal(np.asarray(decode_image(image_bytes(values)))[0, :, 0], expected)
    as_int = Image.fromarray(values.astype(np.int32), "I")  # PIL's other 16-bit mode, handed over as an image
    np.testing.assert_array_equal(np.asarray(decode_image(as_int))[0, :, 0], expected)


def stored_sideways() -> np.ndarray:
    """(20, 40, 3): a landscape image with four distinct corner marks, as a camera stores it."""
    img = np.zeros((20, 40, 3), np.uint8)
    img[:5, :5], img[:5, -5:] = (255, 0, 0), (0, 255, 0)
    img[-5:, :5], img[-5:, -5:] = (0, 0, 255), (255, 255, 255)
    return img


# what each EXIF orientation asks a viewer to do to the stored pixels (EXIF 2.3, tag 0x0112: where the stored
# row 0 and column 0 are shown): 2 mirror, 3 half turn, 4 upside-down mirror, 5 transpose (row 0 left, column 0
# top), 6 quarter turn clockwise (row 0 right, column 0 top), 7 transverse (row 0 right, column 0 bottom),
# 8 quarter turn anticlockwise (row 0 left, column 0 bottom)
ORIENTED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
            7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_a_viewer(orientation):
    stored = stored_sideways()
    exif = Image.Image().getexif()
    exif[0x0112] = orientation  # the EXIF orientation tag
    png = image_bytes(stored, "PNG", exif=exif.tobytes())
    np.testing.assert_array_equal(np.asarray(decode_image(png)), ORIENTED[orientation](stored))


def test_a_portrait_jpeg_stored_sideways_trains_upright():
    stored = stored_sideways()
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a portrait photo
    out = np.asarray(decode_image(image_bytes(stored, "JPEG", quality=95, exif=exif.tobytes())))
    assert out.shape == (40, 20, 3)  # portrait, as shown
    np.testing.assert_allclose(out[1, -2], (255, 0, 0), atol=12)  # the red corner: top-left stored, top-right shown
    np.testing.assert_allclose(out[-2, -2], (0, 255, 0), atol=12)  # JPEG tolerance: a few levels at the corners
    _, size, _ = PairTransform(16, random_flip=False).transform_image(decode_image(
        image_bytes(stored, "JPEG", quality=95, exif=exif.tobytes())), 0.5, 0.5, False)
    assert size == (40, 20)  # (height, width) before resizing: SDXL's micro-conditioning sees a portrait too


def test_a_damaged_exif_block_counts_as_upright():
    stored = stored_sideways()
    png = image_bytes(stored, "PNG", exif=b"Exif\x00\x00MM\x00*garbage")
    np.testing.assert_array_equal(np.asarray(decode_image(png)), stored)


# ------------------------------------------------------------------------------------ text: one line, not a traceback
def not_utf8_parquet(path, rows: list[dict], row: int = 1):
    """Pick-a-Pic rows whose caption ``row`` holds latin-1 bytes (not UTF-8) in a string column."""
    table = pa.Table.from_pylist(rows, schema=pickapic_arrow_schema())
    captions = [c.encode() for c in table.column("caption").to_pylist()]
    captions[row] = b"a caf\xe9 square"
    offsets = np.cumsum([0] + [len(c) for c in captions]).astype(np.int32)
    column = pa.Array.from_buffers(pa.string(), len(captions),
                                   [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(captions))])
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption", column), path)
    return path


def two_captions_parquet(path, rows: list[dict]):
    table = pa.Table.from_pylist(rows, schema=pickapic_arrow_schema())
    pq.write_table(table.append_column("caption", pa.array(["another caption"] * len(rows))), path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("not_utf8", "column 'caption' row 1 is not UTF-8 text (b'a caf\\xe9 square')"),
    ("two_captions", "has 1 duplicate column(s) named 'caption': expected each column once"),
])
def test_unreadable_text_and_twin_columns_are_one_line_before_any_model(kind, message, sd_dir, tmp_path, capsys,
                                                                       no_model_load):
    make = not_utf8_parquet if kind == "not_utf8" else two_captions_parquet
    path = make(tmp_path / "d.parquet", make_rows(4))
    argv = ["train", "--pretrained", str(sd_dir), "--dataset", str(path), "--output-dir", str(tmp_path / "o"),
            "--resolution", "32", "--max-steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dpo-tutorial train: error:") and str(path) in err[0]
    assert message in err[0]


def test_text_that_is_not_utf8_in_an_unchecked_dataset_is_one_line(tmp_path):
    """A hub dataset is not checked up front: the row that holds the text is a DataError, not a traceback."""
    path = not_utf8_parquet(tmp_path / "d.parquet", make_rows(4)[:4], row=0)
    unchecked = datasets.load_dataset("parquet", data_files=str(path), split="train")  # no check_parquet_files
    stream = PairStream(unchecked, PairTransform(16), batch_size=4, seed=0)
    with pytest.raises(DataError, match="holds text that is not UTF-8") as err:
        next(iter(stream))
    assert "\n" not in str(err.value)
