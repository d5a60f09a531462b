"""The latent cache: same losses as training from images, and a cache for another setup is refused."""
import numpy as np
import pytest

from dpo_tutorial.cache import build_cache, check_cache
from dpo_tutorial.cli import main
from dpo_tutorial.config import TrainConfig
from dpo_tutorial.data import DataError
from dpo_tutorial.train import train


def cfg(pipe, data, out, **kw):
    return TrainConfig(**{**dict(pretrained=str(pipe), dataset=str(data), output_dir=str(out), resolution=32,
                                 batch_size=4, max_steps=5, lr=1e-2, beta=500.0, rank=4, sample_grid=False,
                                 random_flip=True, empty_prompt_prob=0.3, seed=11), **kw})


@pytest.mark.parametrize("fixture", ["sd_dir", "sdxl_dir"])
def test_training_from_cache_gives_the_same_losses(fixture, request, pairs_parquet, tmp_path):
    pipe = request.getfixturevalue(fixture)
    base = cfg(pipe, pairs_parquet, tmp_path / "images")
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
