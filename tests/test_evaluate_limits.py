"""`dpo-tutorial evaluate` within bounds: counts refused beyond a stated cost, progress shown, a diverged LoRA
refused."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from dpo_tutorial.cli import main
from dpo_tutorial.config import get_preset
from dpo_tutorial.toy import PIPELINE_DIR

toy_only = pytest.mark.skipif(not (PIPELINE_DIR / "model_index.json").exists(), reason="toy assets not built")
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory):
    """A toy LoRA after 2 training steps (its B matrices are no longer zero)."""
    from dpo_tutorial.train import train

    out = tmp_path_factory.mktemp("toy-lora")
    train(get_preset("toy", max_steps=2, lr_warmup_steps=0, output_dir=str(out), sample_grid=False,
                     checkpoint_every=0, heldout_split=None))
    return out


@pytest.mark.parametrize("flags, message", [
    (["--per-caption", "100000000"], ("--per-caption 100000000 would sample 2,400,000,000 images (12 captions x 2 "
                                      "models x 100000000), about")),
    (["--num-draws", "1000000000"], ("--num-draws 1000000000 would score 600 test pairs 1,000,000,000 times "
                                     "(2,400,000,000,000 UNet passes), about")),
    (["--per-caption", "1001"], "expected at most 1000"),
    (["--num-draws", "257"], "expected at most 256"),
    (["--num-draws", "0"], "invalid --num-draws 0: expected an integer >= 1"),
])
def test_counts_beyond_their_bound_are_one_line_errors_naming_the_cost(flags, message, tmp_path, capsys, monkeypatch):
    import dpo_tutorial.cli as cli

    (tmp_path / LORA_FILE).write_bytes(b"not read before the bounds are checked")

    def evaluation_started(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(cli, "print_toy_evaluation", evaluation_started)
    assert main(["evaluate", "--lora", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("dpo-tutorial evaluate: error: ") and err.count("\n") == 1, err


def test_durations_read_at_a_sensible_unit():
    from dpo_tutorial.evaluate import approx_duration

    assert [approx_duration(s) for s in (40, 720, 3.5 * 3600, 2.1 * 86400, 4000 * 365.25 * 86400)] == [
        "40 s", "12 min", "3.5 h", "2.1 days", "4,000 years"]


@pytest.mark.slow
@toy_only
@pytest.mark.slow
def test_evaluate_shows_progress_on_stderr_and_keeps_stdout_one_json_line(toy_lora, capsys):
    import json

    assert main(["evaluate", "--lora", str(toy_lora), "--per-caption", "1", "--num-draws", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert "sampling 2 x 12 images: 100%" in captured.err and "24/24" in captured.err
    assert "implicit-reward accuracy: 100%" in captured.err
    assert json.loads(captured.out)["n"] == 12  # stdout: exactly one JSON object


def _poisoned_copy(lora_dir, target, value):
    tensors = load_file(str(lora_dir / LORA_FILE))
    name = sorted(tensors)[3]
    tensors[name] = torch.full_like(tensors[name], value)
    target.mkdir()
    save_file(tensors, str(target / LORA_FILE))
    return name


@pytest.mark.slow
@toy_only
@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_lora_with_non_finite_tensors_is_refused_in_one_line(toy_lora, tmp_path, capsys, value):
    name = _poisoned_copy(toy_lora, tmp_path / "bad", value)
    assert main(["evaluate", "--lora", str(tmp_path / "bad"), "--per-caption", "1", "--num-draws", "1", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or infinite values in 1 of its" in err and name in err, err


@pytest.mark.slow
def test_load_with_lora_refuses_a_nan_lora_and_accepts_a_finite_one(sd_dir, pairs_parquet, tmp_path):
    from dpo_tutorial.config import TrainConfig
    from dpo_tutorial.evaluate import load_with_lora
    from dpo_tutorial.models import ModelError
    from dpo_tutorial.train import train

    train(TrainConfig(pretrained=str(sd_dir), dataset=str(pairs_parquet), output_dir=str(tmp_path / "run"),
                      resolution=32, batch_size=2, max_steps=1, rank=4, sample_grid=False))
    pipe, _ = load_with_lora(str(sd_dir), tmp_path / "run")
    assert all(torch.isfinite(p).all() for n, p in pipe.unet.named_parameters() if "lora_" in n)
    _poisoned_copy(tmp_path / "run", tmp_path / "nan", float("nan"))
    with pytest.raises(ModelError, match="NaN or infinite"):
        load_with_lora(str(sd_dir), tmp_path / "nan")
