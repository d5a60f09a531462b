"""A run's output folder: whose it is, what a rerun or a resume may do with it, and checkpoints read back checked.

Each test here is one attack or one rule: a folder the package did not make, a checkpoint whose metadata lies,
a resume that would change the lr schedule, a crash right after a resume, a full disk.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from dpo_tutorial import checkpoint as ckpt
from dpo_tutorial import files
from dpo_tutorial.cli import main
from dpo_tutorial.config import ConfigError
from dpo_tutorial.errors import FolderError
from dpo_tutorial.run_dir import History, plan_rerun
from dpo_tutorial.train import train

pytestmark = pytest.mark.slow  # most tests here train a few steps on the tiny stand-in


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model starts loading: the refusals below must come first."""
    monkeypatch.setattr(sys.modules["dpo_tutorial.train"], "load_parts", lambda *a, **k: pytest.fail("a model was loaded"))


def _argv(sd_dir, data, out, *extra):
    return ["train", "--pretrained", str(sd_dir), "--dataset", str(data), "--output-dir", str(out), "--resolution",
            "32", "--batch-size", "2", "--rank", "4", "--max-steps", "2", "--no-sample-grid", *extra]


def _one_line(capsys) -> str:
    """The one line the command printed about its error (progress bars on stderr aside), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dpo-tutorial ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------- whose folder it is
def test_train_refuses_a_folder_of_the_users_own_files_and_touches_nothing(sd_dir, pairs_parquet, tmp_path, capsys,
                                                                          no_model_load):
    mine = {"config.json": '{"mine": 1}', "summary.json": "{}", "history.jsonl": "my notes\n",
            "data_summary.json": "[]"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    assert main(_argv(sd_dir, pairs_parquet, tmp_path)) == 2
    line = _one_line(capsys)
    assert "holds files dpo-tutorial did not write" in line and str(tmp_path) in line
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == mine  # not one byte written


def test_cache_refuses_a_folder_of_the_users_own_files(sd_dir, pairs_parquet, tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"my": "manifest"}')
    (tmp_path / "text.safetensors").write_bytes(b"my bytes")
    assert main(["cache", "--out", str(tmp_path), "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet),
                 "--resolution", "32"]) == 2
    assert "holds files dpo-tutorial did not write" in _one_line(capsys)
    assert (tmp_path / "manifest.json").read_text() == '{"my": "manifest"}'
    assert (tmp_path / "text.safetensors").read_bytes() == b"my bytes"


@pytest.mark.parametrize("command", ["cache", "figures"])
def test_an_output_folder_that_is_a_file_is_one_line(command, sd_dir, pairs_parquet, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    argv = {"cache": ["cache", "--out", str(target), "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet),
                      "--resolution", "32"],
            "figures": ["figures", "--out", str(target)]}[command]
    assert main(argv) == 2
    assert "is a file" in _one_line(capsys) and target.read_text() == "mine"


def test_pruning_deletes_only_checkpoints_the_run_made(sd_dir, pairs_parquet, tmp_path):
    files.claim_folder(tmp_path, "run")
    notes = tmp_path / "checkpoint-0"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    train(tiny_config(sd_dir, pairs_parquet, tmp_path, max_steps=3, checkpoint_every=1, checkpoints_total_limit=1))
    assert (notes / "notes.txt").read_text() == "my notes"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3"]


def test_a_run_folder_of_an_older_version_is_still_ours(finished_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    (old / files.MARKER).unlink()  # written before folders were marked: a lock file and checkpoints
    assert files.claim_folder(old, "run", legacy=lambda f: (f / ".lock").exists() and ckpt.list_checkpoints(f)) == old
    assert (old / files.MARKER).read_text().strip() == "run"
    with pytest.raises(FolderError, match="holds a dpo-tutorial run output, not a cache"):
        files.claim_folder(old, "cache")


# ------------------------------------------------------------------------------- checkpoints read back
def _state(run, step) -> dict:
    return json.loads((run / f"checkpoint-{step}" / "state.json").read_text())


@pytest.mark.parametrize("lie", ["step 50", "step -4", "a list", "world_size 0"])
def test_a_checkpoint_whose_state_lies_is_skipped_for_the_next_good_one(lie, sd_dir, pairs_parquet, run_copy):
    state = _state(run_copy, 3)
    bad = {"step 50": {**state, "step": 50}, "step -4": {**state, "step": -4}, "a list": [state],
           "world_size 0": {**state, "world_size": 0}}[lie]
    (run_copy / "checkpoint-3" / "state.json").write_text(json.dumps(bad))
    with pytest.warns(UserWarning, match="skipping unusable checkpoint .*checkpoint-3.*state.json"):
        resumed = train(tiny_config(sd_dir, pairs_parquet, run_copy, max_steps=3, checkpoint_every=1,
                                    resume="latest"))
    assert [r["step"] for r in resumed.records] == [1, 2, 3]  # continued from checkpoint-2, step 3 done again
    assert _state(run_copy, 3)["step"] == 3 and not list(run_copy.glob("checkpoint--*"))


def test_a_checkpoint_of_another_lora_rank_is_one_line(sd_dir, pairs_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(sd_dir, pairs_parquet, out, max_steps=1, rank=4))
    state = _state(out, 1)
    del state["config"]  # an older checkpoint that carried no settings: only the tensors can tell
    (out / "checkpoint-1" / "state.json").write_text(json.dumps(state))
    assert main(_argv(sd_dir, pairs_parquet, out, "--rank", "8", "--resume", "latest", "--max-steps", "2")) == 2
    assert "holds weights of other shapes than this model's" in _one_line(capsys)


def test_non_finite_weights_in_a_checkpoint_are_refused(run_copy):
    path = run_copy / "checkpoint-3" / "trainable.safetensors"
    weights = load_file(str(path))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(path))
    params = {n: torch.nn.Parameter(w.clone()) for n, w in load_file(str(run_copy / "checkpoint-2" /
                                                                            "trainable.safetensors")).items()}
    with pytest.raises(ckpt.CheckpointError, match="non-finite weights"):
        ckpt.read_checkpoint(run_copy / "checkpoint-3", params)


def test_a_linked_temporary_checkpoint_folder_is_replaced_not_followed(sd_dir, pairs_parquet, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    out = tmp_path / "run"
    files.claim_folder(out, "run")
    os.symlink(elsewhere, out / ".tmp-checkpoint-2")
    train(tiny_config(sd_dir, pairs_parquet, out, max_steps=2, checkpoint_every=1))
    assert (elsewhere / "keep.txt").read_text() == "keep" and ckpt.list_checkpoints(out)[-1].name == "checkpoint-2"


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(sd_dir, pairs_parquet, run_copy,
                                                                                      monkeypatch, capsys):
    real = ckpt.torch.save

    def full(obj, path, *a, **k):
        if "checkpoint-4" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0; "
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full)
    argv = _argv(sd_dir, pairs_parquet, run_copy, "--max-steps", "4", "--checkpoint-every", "1", "--resume", "latest",
                 "--lr-scheduler", "constant", "--lr-warmup-steps", "0", "--beta", "500", "--lr", "1e-3")
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "could not write checkpoint" in line and "the disk is full" in line and "previous checkpoint is intact" in line
    assert ckpt.list_checkpoints(run_copy)[-1].name == "checkpoint-3" and not list(run_copy.glob(".tmp-*"))


def _tiny_checkpoint_args():
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    return layer, dict(trainable=dict(layer.named_parameters()), optimizer=optimizer,
                       lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                       generator=torch.Generator(), data_state={}, extra={})


def test_a_checkpoint_another_process_cannot_write_fails_on_every_process_and_none_waits(tmp_path, monkeypatch):
    """Every stage ends in a vote: the main process raises when another one failed (it used to wait at a barrier
    for ever when the main process failed, or the others did), and votes False itself when its own write fails."""
    _, args = _tiny_checkpoint_args()
    ckpt.save_checkpoint(tmp_path, 1, **args)
    votes = []

    def other_process_fails_its_part(ok):  # this process's vote ANDed with the other's: False at the second stage
        votes.append(ok)
        return ok and len(votes) != 2

    with pytest.raises(ckpt.CheckpointError, match="another process could not write its part"):
        ckpt.save_checkpoint(tmp_path, 2, agree=other_process_fails_its_part, **args)
    assert votes == [True, True] and [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]

    real, votes[:] = ckpt.torch.save, []

    def full_for_rank_1(obj, path, *a, **k):
        if "process_1" in str(path):
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full_for_rank_1)
    with pytest.raises(ckpt.CheckpointError, match="the disk is full"):
        ckpt.save_checkpoint(tmp_path, 2, rank=1, world_size=2, agree=lambda ok: votes.append(ok) or ok, **args)
    assert votes == [True, False]                       # rank 1 had nothing to do in stage 1, then failed


def test_a_checkpoint_one_process_cannot_read_is_refused_by_all(tmp_path):
    layer, args = _tiny_checkpoint_args()
    path = ckpt.save_checkpoint(tmp_path, 1, **args)
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    with pytest.raises(ckpt.CheckpointError, match="unusable on another process"):
        ckpt.load_checkpoint(path, layer, args["optimizer"], args["lr_scheduler"], torch.Generator(),
                             agree=lambda ok: False)
    assert torch.equal(layer.weight, before + 1.0)      # nothing was loaded
    votes = []
    with pytest.raises(ckpt.CheckpointError):            # its own file missing: it votes False, then raises
        ckpt.load_checkpoint(path, layer, args["optimizer"], args["lr_scheduler"], torch.Generator(), rank=1,
                             agree=lambda ok: votes.append(ok) or ok)
    assert votes == [False]


# ------------------------------------------------------------------------------- rerun and resume rules
def test_resuming_a_cosine_run_with_another_max_steps_is_refused_a_constant_one_continues(sd_dir, pairs_parquet,
                                                                                          tmp_path):
    cosine = tiny_config(sd_dir, pairs_parquet, tmp_path / "cos", max_steps=2, lr_scheduler="cosine",
                         lr_warmup_steps=1)
    train(cosine)
    with pytest.raises(ConfigError, match=r"max_steps: checkpoint 2 vs now 4 \(its cosine lr schedule was laid out "
                                          r"for 2 steps\)"):
        train(cosine.replace(max_steps=4, resume="latest"))
    constant = tiny_config(sd_dir, pairs_parquet, tmp_path / "const", max_steps=2)
    first = train(constant)
    longer = train(constant.replace(max_steps=4, resume="latest"))
    assert [r["step"] for r in longer.records] == [1, 2, 3, 4] and longer["lr"] == [constant.lr] * 4
    assert longer.records[:2] == first.records


def test_a_crash_before_the_first_resumed_step_loses_nothing(sd_dir, pairs_parquet, run_copy, monkeypatch):
    """Resuming an older checkpoint abandons the newer ones only once the resumed run has made a step."""
    history = (run_copy / "history.jsonl").read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed in the first step")

    monkeypatch.setattr(sys.modules["dpo_tutorial.train"], "dpo_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(sd_dir, pairs_parquet, run_copy, max_steps=3, resume=str(run_copy / "checkpoint-1")))
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert (run_copy / "history.jsonl").read_text() == history


def test_a_rerun_judges_the_checkpoints_own_settings_not_config_json(sd_dir, pairs_parquet, run_copy, capsys):
    """A deleted or garbled config.json (or summary.json) neither hides a run with other settings nor breaks the
    report of a finished one."""
    finished = tiny_config(sd_dir, pairs_parquet, run_copy, max_steps=3, checkpoint_every=1)
    (run_copy / "config.json").unlink()
    plan = plan_rerun(finished.replace(lr=2e-3))
    assert plan.action == "train" and plan.config.output_dir == f"{run_copy}-2"
    assert "lr: checkpoint 0.001 vs now 0.002" in plan.message
    (run_copy / "config.json").write_text("{garbled")
    (run_copy / "summary.json").write_text("{garbled")
    assert plan_rerun(finished).action == "finished"
    with pytest.warns(UserWarning, match="summary.json is damaged"):
        summary = History.load(run_copy).summary
    assert summary["tail_steps"] == 1


def test_a_report_is_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    files.write_json(target, {"loss": 0.5})

    def killed(*args):
        raise KeyboardInterrupt("killed while renaming")

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(target, {"loss": 0.4})
    assert json.loads(target.read_text()) == {"loss": 0.5}  # the old report, whole


def test_when_every_numbered_folder_holds_another_run_the_cli_says_so_in_one_line(sd_dir, pairs_parquet, tmp_path,
                                                                                monkeypatch, capsys):
    """``run``, ``run-2`` ... ``run-999`` all hold a checkpoint this run cannot continue (here: none is readable)."""
    monkeypatch.setattr(ckpt, "list_checkpoints", lambda folder: [Path(folder) / "checkpoint-1"])
    assert main(_argv(sd_dir, pairs_parquet, tmp_path / "run")) == 2
    assert "all hold runs with other settings" in _one_line(capsys)


def test_replace_block_rewrites_only_what_lies_between_its_markers(tmp_path):
    """How the measuring scripts write the README's numbers: the text around the block stays byte for byte; a file
    without exactly one well-ordered block is refused, never half-written."""
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- t:start -->\nold\n<!-- t:end -->\noutro <!-- u:start -->\n")
    files.replace_block(doc, "t", "new\nlines\n")
    assert doc.read_text() == "intro\n<!-- t:start -->\nnew\nlines\n<!-- t:end -->\noutro <!-- u:start -->\n"
    for broken in ("u", "v"):  # a start without an end; no block at all
        with pytest.raises(ValueError, match=f"no single <!-- {broken}:start -->"):
            files.replace_block(doc, broken, "x")
    doc.write_text("<!-- t:end -->\n<!-- t:start -->\n")
    with pytest.raises(ValueError, match="no single"):
        files.replace_block(doc, "t", "x")
    assert doc.read_text() == "<!-- t:end -->\n<!-- t:start -->\n"


def test_shown_path_is_what_a_reader_finds_from_where_they_are(tmp_path, monkeypatch):
    """A notebook prints ``../runs/toy``, never the machine's absolute path (it once did, and in 08's saved widget
    state after that); a path two folders up or more is left as given."""
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert files.shown_path(tmp_path / "runs" / "toy") == os.path.join("..", "runs", "toy")
    assert files.shown_path(tmp_path / "notebooks" / "x.parquet") == "x.parquet"
    far = tmp_path.parent / "elsewhere"
    assert files.shown_path(far) == str(far)


def test_train_on_labels_reads_the_run_marker_as_claim_folder_does(tmp_path):
    """One rule for "this folder is the package's run": a marker that is a link (a user's folder could point it at
    a file saying "run") is no marker, so a folder holding one and a photo is refused, not emptied."""
    from dpo_tutorial.toy.your_taste import train_on_labels

    decoy = tmp_path / "says-run.txt"
    decoy.write_text("run\n")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"x")
    (folder / files.MARKER).symlink_to(decoy)
    assert files.marker_kind(folder) is None
    with pytest.raises(FileExistsError, match="holds no dpo-tutorial run"):
        train_on_labels(tmp_path / "labels", folder)
    assert (folder / "holiday.jpg").exists()
