"""The latent cache: same losses as training from images, a cache for another setup refused, a damaged one one line."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_tutorial.cache import AUTO_CACHE_MAX_BYTES, auto_cache, auto_cache_skip_reason, build_cache, check_cache
from dpo_tutorial.cli import main
from dpo_tutorial.config import TrainConfig
from dpo_tutorial.data import DataError, load_pickapic
from dpo_tutorial.pickapic import write_pickapic_parquet
from conftest import make_rows
from dpo_tutorial.train import train


def cfg(pipe, data, out, **kw):
    return TrainConfig(**{**dict(pretrained=str(pipe), dataset=str(data), output_dir=str(out), resolution=32,
                                 batch_size=4, max_steps=5, lr=1e-2, beta=500.0, rank=4, sample_grid=False,
                                 random_flip=True, empty_prompt_prob=0.3, seed=11), **kw})


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["sd_dir", "sdxl_dir"])
def test_training_from_cache_gives_the_same_losses(fixture, request, pairs_parquet, tmp_path):
    pipe = request.getfixturevalue(fixture)
    base = cfg(pipe, pairs_parquet, tmp_path / "images", cache_latents=False)
    build_cache(base, tmp_path / "cache", batch_size=5, shard_size=7)  # several shards and batches
    from_images = train(base)
    from_cache = train(base.replace(output_dir=str(tmp_path / "cached"), cache=str(tmp_path / "cache")))
    assert len(set(from_images["loss"])) > 1
    np.testing.assert_allclose(from_cache["loss"], from_images["loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(from_cache["raw_model_loss"], from_images["raw_model_loss"], rtol=1e-4)
    assert from_cache.data_summary == from_images.data_summary  # same ties / undecodable rows skipped


@pytest.mark.slow
def test_cache_for_another_model_or_resolution_is_refused(sd_dir, sdxl_dir, pairs_parquet, tmp_path):
    base = cfg(sd_dir, pairs_parquet, tmp_path / "run")
    build_cache(base, tmp_path / "cache")
    check_cache(tmp_path / "cache", base)
    with pytest.raises(DataError, match="resolution: cache 32 vs run 64"):
        check_cache(tmp_path / "cache", base.replace(resolution=64))
    with pytest.raises(DataError, match="pretrained: cache"):
        check_cache(tmp_path / "cache", base.replace(pretrained=str(sdxl_dir)))
    build_cache(base.replace(random_flip=False), tmp_path / "noflip")
    with pytest.raises(DataError, match="no flipped latents"):
        check_cache(tmp_path / "noflip", base)
    with pytest.raises(DataError, match="not a latent cache"):
        check_cache(tmp_path, base)


@pytest.mark.slow
def test_cli_cache_then_train(sd_dir, pairs_parquet, tmp_path, capsys):
    common = ["--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--resolution", "32"]
    assert main(["cache", "--out", str(tmp_path / "c"), *common]) == 0
    assert "dpo-tutorial train --cache" in capsys.readouterr().out
    assert main(["train", *common, "--cache", str(tmp_path / "c"), "--output-dir", str(tmp_path / "r"),
                 "--max-steps", "2", "--batch-size", "2", "--rank", "4", "--no-sample-grid"]) == 0
    assert main(["train", *common, "--resolution", "64", "--cache", str(tmp_path / "c"), "--output-dir",
                 str(tmp_path / "r2"), "--max-steps", "1"]) == 2
    assert "rebuild it" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_that_draws_its_data_again_builds_its_own_cache_with_the_same_losses(sd_dir, pairs_parquet, tmp_path):
    rows = len(load_pickapic(str(pairs_parquet)))
    steps = 2 * rows // 4 + 2  # more pairs drawn than the 2 x rows encodings a cache with flips costs
    from_images = train(cfg(sd_dir, pairs_parquet, tmp_path / "images", max_steps=steps, cache_latents=False))
    auto = cfg(sd_dir, pairs_parquet, tmp_path / "auto", max_steps=steps)
    from_cache = train(auto)
    assert (tmp_path / "auto" / "latent-cache" / "manifest.json").exists()
    assert not (tmp_path / "images" / "latent-cache").exists()
    np.testing.assert_allclose(from_cache["loss"], from_images["loss"], rtol=1e-4, atol=1e-6)
    assert from_cache.data_summary == from_images.data_summary
    short = train(cfg(sd_dir, pairs_parquet, tmp_path / "short", max_steps=2))  # 8 pairs: not worth a cache
    assert len(short["loss"]) == 2 and not (tmp_path / "short" / "latent-cache").exists()


@pytest.mark.slow
def test_the_automatic_cache_is_rebuilt_when_its_source_changes(sd_dir, pairs_parquet, tmp_path):
    import shutil

    from dpo_tutorial.models import load_parts

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(pairs_parquet, data / "train.parquet")
    config = cfg(sd_dir, data, tmp_path / "run", max_steps=50)
    parts = load_parts(config.pretrained)
    folder = auto_cache(config, parts, load_pickapic(str(data)))
    manifest = folder / "manifest.json"
    first = manifest.stat().st_mtime_ns
    assert auto_cache(config, parts, load_pickapic(str(data))) == folder and manifest.stat().st_mtime_ns == first
    rows = make_rows(n_good=20, seed=3)
    write_pickapic_parquet(data / "train.parquet", rows)  # the user edits the data between two runs
    assert auto_cache(config, parts, load_pickapic(str(data))) == folder and manifest.stat().st_mtime_ns != first
    assert check_cache(folder, config)["num_rows"] == len(rows)


def test_when_a_run_reads_images_instead_of_building_a_cache(sd_dir, pairs_parquet):
    c = cfg(sd_dir, pairs_parquet, "unused", max_steps=100, batch_size=4)  # 400 pairs drawn
    assert auto_cache_skip_reason(c, 18, 1000) is None
    cases = [(dict(cache="somewhere"), "a cache folder is given"), (dict(cache_latents=False), "cache_latents is off"),
             (dict(streaming=True), "not a local"), (dict(dataset="yuvalkirstain/pickapic_v2"), "not a local"),
             (dict(random_crop=True), "random_crop needs the images"),
             (dict(max_steps=9), "draws 36 pairs, not more than the 36 encodings")]
    for change, reason in cases:
        assert reason in auto_cache_skip_reason(c.replace(**change), 18, 1000)
    assert "would take" in auto_cache_skip_reason(c, 18, AUTO_CACHE_MAX_BYTES // 10)


# ------------------------------------------------------------------ a cache is checked when read back
@pytest.fixture(scope="module")
def built_cache(sd_dir, pairs_parquet, tmp_path_factory):
    """A cache of the 17-row test parquet, 5 rows per shard (4 shards), both orientations."""
    out = tmp_path_factory.mktemp("cache")
    build_cache(cfg(sd_dir, pairs_parquet, "unused"), out / "c", shard_size=5)
    return out / "c"


@pytest.fixture
def cache_copy(built_cache, tmp_path):
    import shutil

    return Path(shutil.copytree(built_cache, tmp_path / "c"))


@pytest.mark.slow
def test_a_cache_for_other_data_or_another_split_is_refused_naming_both(sd_dir, pairs_parquet, built_cache, tmp_path,
                                                                         capsys):
    other = write_pickapic_parquet(tmp_path / "other.parquet", make_rows(4))
    common = ["train", "--pretrained", str(sd_dir), "--resolution", "32", "--cache", str(built_cache),
              "--output-dir", str(tmp_path / "r"), "--max-steps", "1"]
    assert main([*common, "--dataset", str(other)]) == 2
    line = capsys.readouterr().err.strip()
    assert f"dataset: cache '{pairs_parquet}' vs run '{other}'" in line and len(line.splitlines()) == 1
    assert main([*common, "--dataset", str(pairs_parquet), "--split", "validation"]) == 2
    assert "split: cache 'train' vs run 'validation'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cache_encodes_images_in_chunks_of_the_vae_batch_with_the_same_latents(sd_dir, pairs_parquet, tmp_path):
    """Rows are read 64 at a time (x 2 images x 2 flips = 256 images); the VAE must see at most
    vae_encode_batch_size of them per call (256 at 512 px would not fit a 16 GB GPU)."""
    from safetensors.torch import load_file

    from dpo_tutorial.models import load_parts

    parts = load_parts(str(sd_dir))
    sizes, real = [], parts.vae.encode
    parts.vae.encode = lambda x, *a, **k: (sizes.append(x.shape[0]), real(x, *a, **k))[1]
    build_cache(cfg(sd_dir, pairs_parquet, "unused", vae_encode_batch_size=3), tmp_path / "small", parts=parts)
    assert sizes and max(sizes) == 3 and sum(sizes) == 17 * 2 * 2
    sizes.clear()
    build_cache(cfg(sd_dir, pairs_parquet, "unused", vae_encode_batch_size=100), tmp_path / "big", parts=parts)
    assert sizes == [68]
    small, big = load_file(str(tmp_path / "small" / "shard-00000.safetensors")), load_file(
        str(tmp_path / "big" / "shard-00000.safetensors"))
    for name in ("mean", "std"):  # the same latents up to float rounding: on one CPU thread the convolutions
        # sum in another order for a batch of 3 than for 68 (differences up to 1e-6 where the values are ~0.1-1)
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-5)


def _damage(cache_dir: Path, kind: str, shard_index: int = 1) -> None:
    from safetensors.torch import load_file, save_file

    shard = cache_dir / f"shard-{shard_index:05d}.safetensors"
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    if kind == "small latents":  # 2x2 where the model makes 16x16: shards and manifest agree, the model does not
        for path in cache_dir.glob("shard-*.safetensors"):
            t = load_file(str(path))
            save_file({**t, "mean": t["mean"][..., :2, :2].contiguous(), "std": t["std"][..., :2, :2].contiguous()},
                      str(path))
        manifest["latent_shape"] = [4, 2, 2]
    elif kind == "shard shape":
        t = load_file(str(shard))
        save_file({**t, "mean": t["mean"][..., :2, :2].contiguous()}, str(shard))
    elif kind == "cut manifest":
        (cache_dir / "manifest.json").write_text(json.dumps(manifest)[:100])
        return
    elif kind == "more rows":
        manifest["num_rows"] += 10
        manifest["label_0"] += [1.0] * 10
    elif kind == "shard size 0":
        manifest["shard_size"] = 0
    elif kind == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:200])
    elif kind == "nan latents":
        t = load_file(str(shard))
        save_file({**t, "mean": t["mean"] * float("nan")}, str(shard))
    elif kind == "caption id":
        t = load_file(str(shard))
        save_file({**t, "caption_id": t["caption_id"] + 1000}, str(shard))
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind,message", [
    ("small latents", "latent shape: cache (4, 2, 2) vs the model's (4, 16, 16)"),
    ("shard shape", "shard-00001.safetensors: mean is (5, 2, 2, 4, 2, 2)"),
    ("cut manifest", "manifest.json is damaged"),
    ("more rows", "needs 6"),
    ("shard size 0", "do not fit together"),
    ("truncated shard", "shard-00001.safetensors is damaged"),
    ("nan latents", "shard-00001.safetensors holds non-finite latents"),
    ("caption id", "caption ids outside"),
])
@pytest.mark.slow
def test_a_damaged_cache_is_one_line_naming_the_file(kind, message, sd_dir, pairs_parquet, cache_copy, tmp_path, capsys):
    _damage(cache_copy, kind)
    assert main(["train", "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--resolution", "32",
                 "--cache", str(cache_copy), "--output-dir", str(tmp_path / "r"), "--max-steps", "1", "--rank", "4",
                 "--no-sample-grid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


@pytest.mark.slow
def test_a_runs_own_damaged_cache_is_rebuilt_when_it_resumes(sd_dir, pairs_parquet, tmp_path):
    config = cfg(sd_dir, pairs_parquet, tmp_path / "run", max_steps=12, checkpoint_every=10, lr_scheduler="constant")
    first = train(config.replace(max_steps=10))  # 10 x 4 pairs > 2 x 17 encodings: the run builds its own cache
    folder = tmp_path / "run" / "latent-cache"
    assert (folder / "manifest.json").exists() and len(first) == 10
    _damage(folder, "nan latents", shard_index=0)  # the run's cache: one shard
    resumed = train(config.replace(resume="latest"))
    assert [r["step"] for r in resumed.records] == list(range(1, 13))
    check_cache(folder, config)  # rebuilt: passes every check again
