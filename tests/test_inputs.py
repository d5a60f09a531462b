"""Every input a run needs is checked before its first step; nothing the end of a run needs can fail after training."""
import json
import sys

import pytest

from conftest import make_rows, tiny_config
from dpo_tutorial.cli import main
from dpo_tutorial.data import PairStream, PairTransform, load_pickapic
from dpo_tutorial.pickapic import write_pickapic_parquet
from dpo_tutorial.train import check_inputs


@pytest.fixture
def train_only(tmp_path):
    """A user's own dataset: a folder with a train split and nothing else."""
    folder = tmp_path / "mine"
    write_pickapic_parquet(folder / "train.parquet", make_rows(8))
    return folder


def test_a_missing_heldout_split_is_a_notice_before_any_model_loads(sd_dir, train_only, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["dpo_tutorial.train"], "load_parts", lambda *a, **k: pytest.fail("loaded"))
    config = tiny_config(sd_dir, train_only, tmp_path / "run", heldout_split="validation")
    with pytest.warns(UserWarning, match=r"no held-out score at the end of this run: split 'validation' .*no parquet "
                                         r"files for split 'validation'.*--heldout-split ''"):
        inputs = check_inputs(config)
    assert "no parquet files for split 'validation'" in inputs.heldout_skipped


@pytest.mark.slow
def test_the_default_run_on_a_users_own_data_finishes_and_says_why_it_has_no_heldout_score(sd_dir, train_only, tmp_path,
                                                                                          capsys):
    """The toy preset scores its 'validation' split at the end; a dataset without one used to train every step, save
    the LoRA, then exit 2 (and a rerun then reported the run as finished, hiding the failure)."""
    out = tmp_path / "run"
    argv = ["train", "--pretrained", str(sd_dir), "--dataset", str(train_only), "--output-dir", str(out),
            "--resolution", "32", "--max-steps", "2", "--batch-size", "2", "--rank", "4", "--no-sample-grid"]
    with pytest.warns(UserWarning, match="no held-out score"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "done: 2 steps" in printed and "no held-out score: split 'validation'" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert "no parquet files for split 'validation'" in summary["heldout_skipped"]
    assert "heldout_implicit_acc" not in summary and (out / "pytorch_lora_weights.safetensors").exists()


def test_max_train_pairs_counts_pairs_with_a_winner_in_a_stream_as_in_a_loaded_dataset(tmp_path):
    """A cap of 4 pairs: ties before them do not use it up, streamed or not (it counted raw rows when streaming)."""
    rows = make_rows(8)
    tie = rows[8]  # make_rows puts its tie right after the 8 good pairs
    path = write_pickapic_parquet(tmp_path / "d.parquet", [tie] * 20 + rows[:8])
    seen = {}
    for streaming in (False, True):
        stream = PairStream(load_pickapic(str(path), streaming=streaming), PairTransform(32, random_flip=False), 1,
                            seed=0, max_pairs=4)
        captions = []
        for batch in stream:
            if stream.epoch > 0:
                break
            captions += batch["captions"]
        seen[streaming] = len(captions)
    assert seen == {False: 4, True: 4}
