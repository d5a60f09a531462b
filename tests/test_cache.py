"""The latent cache: same losses as training from images, and a cache for another setup is refused."""
import numpy as np
import pytest

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


def test_cli_cache_then_train(sd_dir, pairs_parquet, tmp_path, capsys):
    common = ["--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--resolution", "32"]
    assert main(["cache", "--out", str(tmp_path / "c"), *common]) == 0
    assert "dpo-tutorial train --cache" in capsys.readouterr().out
    assert main(["train", *common, "--cache", str(tmp_path / "c"), "--output-dir", str(tmp_path / "r"),
                 "--max-steps", "2", "--batch-size", "2", "--rank", "4", "--no-sample-grid"]) == 0
    assert main(["train", *common, "--resolution", "64", "--cache", str(tmp_path / "c"), "--output-dir",
                 str(tmp_path / "r2"), "--max-steps", "1"]) == 2
    assert "rebuild it" in capsys.readouterr().err


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


def test_the_automatic_cache_is_rebuilt_when_its_source_changes(sd_dir, pairs_parquet, tmp_path):
    import shutil

    from dpo_tutorial.models import load_parts

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(pairs_parquet, data / "train.parquet")
    config = cfg(sd_dir, data, tmp_path / "run", max_steps=50)
    parts = load_parts(config.pretrained)
    folder = auto_cache(config, parts)
    manifest = folder / "manifest.json"
    first = manifest.stat().st_mtime_ns
    assert auto_cache(config, parts) == folder and manifest.stat().st_mtime_ns == first  # reused as it is
    rows = make_rows(n_good=20, seed=3)
    write_pickapic_parquet(data / "train.parquet", rows)  # the user edits the data between two runs
    assert auto_cache(config, parts) == folder and manifest.stat().st_mtime_ns != first
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
