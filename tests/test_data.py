"""Pick-a-Pic loading: schema check, ties, winner-first layout, decoding, identical paired transforms."""
import random

import numpy as np
import pytest
import torch

from conftest import make_rows, solid
from dpo_tutorial.data import (DataError, PairStream, PairTransform, collate_pairs, decode_image, load_pickapic,
                               make_example, pair_order)
from dpo_tutorial.pickapic import encode_image, pickapic_arrow_schema, pickapic_row, write_pickapic_parquet


def mean_rgb(x):
    """Mean colour of the central square of a (3, H, W) tensor in [-1, 1], as 0..255."""
    h, w = x.shape[1:]
    return ((x[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean(dim=(1, 2)) + 1) * 127.5).tolist()


def test_parquet_has_exact_pickapic_schema(pairs_parquet):
    import pyarrow.parquet as pq

    assert pq.read_schema(pairs_parquet).equals(pickapic_arrow_schema())
    ds = load_pickapic(str(pairs_parquet))
    assert ds.features["label_0"].dtype == "float64" and ds.features["jpg_0"].dtype == "binary"


def test_loads_file_folder_and_split_layouts(pairs_parquet, tmp_path):
    rows = make_rows(4)
    write_pickapic_parquet(tmp_path / "flat" / "validation.parquet", rows)
    write_pickapic_parquet(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet", rows)
    assert len(load_pickapic(str(pairs_parquet))) == 17
    assert len(load_pickapic(str(tmp_path / "flat"), split="validation")) == len(rows)
    assert len(load_pickapic(str(tmp_path / "hub"), split="validation")) == len(rows)
    streamed = load_pickapic(str(tmp_path / "flat"), split="validation", streaming=True)
    assert sum(1 for _ in streamed) == len(rows)
    with pytest.raises(DataError, match="no parquet files for split 'test'"):
        load_pickapic(str(tmp_path / "flat"), split="test")


def test_missing_column_fails_at_once_naming_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"caption": "a red square", "jpg_0": b"x", "jpg_1": b"y"}])
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"missing required column\(s\) \['label_0'\].*Pick-a-Pic v2 schema"):
        load_pickapic(str(tmp_path / "bad.parquet"))


def test_missing_path_and_offline_hub_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_pickapic(str(tmp_path / "nope.parquet"))
    with pytest.raises(DataError, match="Offline"):
        load_pickapic("yuvalkirstain/pickapic_v2", split="validation_unique")


@pytest.mark.parametrize("label,expected", [(1.0, "0"), (0.0, "1"), (0.5, "tie"), (0.7, "0"), (0.2, "1"),
                                            (float("nan"), "invalid"), (None, "invalid"), (1.5, "invalid")])
def test_pair_order(label, expected):
    assert pair_order(label) == expected


def test_winner_first_from_both_label_orders():
    red, blue = encode_image(solid("red")), encode_image(solid("blue"))
    transform = PairTransform(32, random_flip=False)
    for row in (pickapic_row("a red square", red, blue, 1.0), pickapic_row("a red square", blue, red, 0.0)):
        ex = make_example(row, transform, random.Random(0))
        assert mean_rgb(ex.x_w)[0] > 180 and mean_rgb(ex.x_l)[2] > 180  # winner red, loser blue
    batch = collate_pairs([make_example(pickapic_row("a red square", red, blue, 1.0), transform, random.Random(0)),
                           make_example(pickapic_row("a blue square", red, blue, 0.0), transform, random.Random(0))])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    winners = [mean_rgb(x) for x in batch["pixel_values"][:2]]
    losers = [mean_rgb(x) for x in batch["pixel_values"][2:]]
    assert winners[0][0] > 180 and winners[1][2] > 180  # red won pair 0, blue won pair 1
    assert losers[0][2] > 180 and losers[1][0] > 180
    assert batch["captions"] == ["a red square", "a blue square"]


def test_stream_drops_ties_skips_corrupt_and_counts_it_once(pairs_parquet):
    ds = load_pickapic(str(pairs_parquet))
    stream = PairStream(ds, PairTransform(32), batch_size=4, seed=0)
    assert stream.ties == 1 and len(stream) == 16
    batches = []
    for batch in stream:
        batches.append(batch)
        if stream.epoch == 3:  # three passes over the data meet the corrupt JPEG three times
            break
    assert stream.skipped["undecodable"] == 1  # skipped, not a crash, and counted once, not once per epoch
    seen = sum(b["pixel_values"].shape[0] // 2 for b in batches)
    assert seen >= 3 * 12 and all(b["pixel_values"].shape == (8, 3, 32, 32) for b in batches)


def test_grayscale_cmyk_png_decode_to_rgb():
    gray = decode_image(encode_image(solid("green"), mode="L"))
    cmyk = decode_image(encode_image(solid("yellow"), mode="CMYK"))
    png = decode_image(encode_image(solid("red"), fmt="PNG"))
    assert gray.mode == cmyk.mode == png.mode == "RGB"
    assert np.asarray(png)[16, 16, 0] > 180
    for bad in (b"", b"\xff\xd8\xff\xe0garbage", encode_image(solid("red"))[:100]):
        with pytest.raises(ValueError):
            decode_image(bad)


def test_identical_crop_and_flip_for_both_images():
    """An image paired with itself stays identical through any random crop/flip; sizes may differ."""
    rng = np.random.default_rng(0)
    img = decode_image(encode_image(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), fmt="PNG"))
    transform = PairTransform(32, random_crop=True, random_flip=True)
    for seed in range(20):
        (xa, size_a, crop_a), (xb, size_b, crop_b) = transform(img, img, random.Random(seed))
        assert torch.equal(xa, xb) and crop_a == crop_b and size_a == (40, 56)
    other = decode_image(encode_image(solid("red", size=(64, 48))))
    (xa, size_a, _), (xb, size_b, _) = transform(img, other, random.Random(1))
    assert xa.shape == xb.shape == (3, 32, 32) and size_b == (64, 48)


def test_flip_is_shared_and_happens():
    left_red = np.zeros((32, 32, 3), dtype=np.uint8)
    left_red[:, :16, 0] = 255
    img = decode_image(encode_image(left_red, fmt="PNG"))
    transform = PairTransform(32, random_flip=True)
    flipped = []
    for seed in range(30):
        (xa, _, _), (xb, _, _) = transform(img, img, random.Random(seed))
        assert torch.equal(xa, xb)
        flipped.append(xa[0, :, 24:].mean().item() > 0)  # red on the right: flipped
    assert 5 < sum(flipped) < 25


def test_empty_prompt_dropout():
    row = pickapic_row("a red square", encode_image(solid("red")), encode_image(solid("blue")), 1.0)
    t = PairTransform(32)
    caps = [make_example(row, t, random.Random(s), empty_prompt_prob=0.5).caption for s in range(200)]
    assert 60 < caps.count("") < 140
    assert all(make_example(row, t, random.Random(s), 1.0).caption == "" for s in range(5))
    assert all(make_example(row, t, random.Random(s), 0.0).caption == "a red square" for s in range(5))


def test_stream_resume_continues_with_the_same_pairs(pairs_parquet):
    ds = load_pickapic(str(pairs_parquet))
    full = PairStream(ds, PairTransform(32), batch_size=3, seed=5)
    it = iter(full)
    reference = [next(it) for _ in range(7)]  # crosses an epoch boundary
    first = PairStream(ds, PairTransform(32), batch_size=3, seed=5)
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = PairStream(ds, PairTransform(32), batch_size=3, seed=5)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for expected in reference[3:]:
        got = next(it)
        assert got["captions"] == expected["captions"]
        assert torch.equal(got["pixel_values"], expected["pixel_values"])


def test_all_ties_is_a_clear_error(tmp_path):
    row = pickapic_row("a red square", encode_image(solid("red")), encode_image(solid("blue")), 0.5)
    ds = load_pickapic(str(write_pickapic_parquet(tmp_path / "t.parquet", [row, row])))
    with pytest.raises(DataError, match="no usable pairs: 2 rows, 2 ties"):
        PairStream(ds, PairTransform(32), batch_size=1)
