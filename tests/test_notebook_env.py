"""The notebooks' device, dtype, runs folder and claims."""
import gc
import importlib

import pytest
import torch

import dpo_tutorial
from dpo_tutorial.evaluate import eval_batch_pairs
from dpo_tutorial.notebook_env import (checkout_root, claim, notebook_config, notebook_device, notebook_dtype,
                                      notebook_setup, runs_folder, shared_toy_config, toy_run_dir)
from dpo_tutorial.testing.device_guard import GuardDevice


def test_device_is_cpu_here_and_dtype_halves_only_on_a_gpu():
    assert notebook_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not isinstance(notebook_device(), GuardDevice)  # the guard is off outside the test kernels
    assert notebook_dtype("cpu") == torch.float32 and notebook_dtype("cuda") == torch.float16


def test_runs_folder_moves_relative_runs_under_dpo_tutorial_runs(monkeypatch, tmp_path):
    monkeypatch.delenv("DPO_TUTORIAL_RUNS", raising=False)
    monkeypatch.delenv("DPO_TUTORIAL_FAST", raising=False)  # full mode: `make test` runs the suite in fast mode
    assert runs_folder("runs/sd15") == "runs/sd15"
    monkeypatch.setenv("DPO_TUTORIAL_RUNS", str(tmp_path / "drive"))
    assert runs_folder("runs/sd15") == str(tmp_path / "drive" / "sd15")
    assert runs_folder("mine") == str(tmp_path / "drive" / "mine")
    assert runs_folder("/abs/run") == "/abs/run"
    monkeypatch.setenv("DPO_TUTORIAL_PRESET", "toy")
    assert notebook_config().output_dir == str(tmp_path / "drive" / "toy")


def _fake_checkout(tmp_path):
    root = tmp_path / "repo"
    (root / "dpo_tutorial").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'dpo-tutorial'\n")
    return root


def test_the_shared_toy_run_is_make_trains_folder_in_full_mode_only(monkeypatch, tmp_path):
    root = _fake_checkout(tmp_path)
    monkeypatch.chdir(root / "notebooks")
    for name in ("DPO_TUTORIAL_RUNS", "DPO_TUTORIAL_FAST"):
        monkeypatch.delenv(name, raising=False)
    assert checkout_root() == root.resolve()
    assert toy_run_dir() == str(root.resolve() / "runs" / "toy")  # where `make train` (run at the root) writes
    assert toy_run_dir("toy-sft") == str(root.resolve() / "runs" / "toy-sft")
    monkeypatch.setenv("DPO_TUTORIAL_FAST", "1")  # a short CI run must never take the full run's folder
    assert toy_run_dir() == str(root.resolve() / "runs" / "fast" / "toy")
    monkeypatch.delenv("DPO_TUTORIAL_FAST")
    monkeypatch.setenv("DPO_TUTORIAL_RUNS", str(tmp_path / "drive"))
    assert toy_run_dir() == str(tmp_path / "drive" / "toy")
    monkeypatch.delenv("DPO_TUTORIAL_RUNS")
    elsewhere = tmp_path / "colab"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert checkout_root() is None and toy_run_dir() == "runs/toy"


def test_make_trains_run_is_the_notebooks_shared_run(monkeypatch, tmp_path):
    """`make train` (the CLI with no flags, run at the checkout's root) and the notebooks' shared toy run have
    the same settings and folder, so a finished `make train` run is reused by 03/04/06/07, not retrained."""
    from dpo_tutorial.cli import build_parser, config_from_args
    from dpo_tutorial.run_dir import resume_differences

    root = _fake_checkout(tmp_path)
    for name in ("DPO_TUTORIAL_RUNS", "DPO_TUTORIAL_FAST", "DPO_TUTORIAL_OVERRIDES", "DPO_TUTORIAL_PRESET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(root)
    cli = config_from_args(build_parser().parse_args(["train", "--evaluate"]))
    saved = {**cli.to_dict(), "output_dir": str(root.resolve() / cli.output_dir)}  # its config.json, path resolved
    monkeypatch.chdir(root / "notebooks")
    notebook = shared_toy_config()  # as notebooks 03, 04, 06, 07 and the solutions build it
    assert notebook.output_dir == saved["output_dir"] and notebook.max_steps == cli.max_steps
    assert resume_differences({"step": cli.max_steps, "config": saved}, notebook) == []
    monkeypatch.setenv("DPO_TUTORIAL_FAST", "1")  # CI's short run: its own folder, 10 steps of 8 pairs, a 16-pair check
    fast = shared_toy_config()
    assert (fast.output_dir, fast.max_steps, fast.batch_size, fast.heldout_pairs) == (
        str(root.resolve() / "runs" / "fast" / "toy"), 10, 8, 16)
    assert fast.replace(max_steps=cli.max_steps, batch_size=cli.batch_size, heldout_pairs=cli.heldout_pairs,
                        sample_grid=True, output_dir=cli.output_dir) == cli


def test_eval_batch_fits_a_t4_at_512_px_and_keeps_the_toy_at_64():
    assert eval_batch_pairs(32) == 64 and eval_batch_pairs(512) == 8 and eval_batch_pairs(1024) == 2
    with pytest.raises(ValueError, match="resolution=0"):
        eval_batch_pairs(0)


def test_notebook_setup_freezes_what_was_imported_and_importing_leaves_the_collector_as_found(capsys):
    """A kernel that imported the package spends ~2 s in Python's final collection unless the setup freezes those
    objects; the package's own import pauses the collector and must hand it back in the state it found it."""
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        preset, _, _ = notebook_setup()
        assert gc.get_freeze_count() > 100_000, "the imported modules' objects are frozen"
        assert preset in capsys.readouterr().out
    finally:
        gc.unfreeze()
    for collecting in (True, False):  # the package's __init__ run again, with the collector on, then off
        gc.enable() if collecting else gc.disable()
        try:
            importlib.reload(dpo_tutorial)
            assert gc.isenabled() == collecting, f"importing dpo_tutorial left the collector {gc.isenabled()}"
        finally:
            gc.enable()


def test_a_claim_is_checked_where_it_is_made_and_only_a_full_size_one_waits_for_the_full_run(monkeypatch, capsys):
    monkeypatch.delenv("DPO_TUTORIAL_FAST", raising=False)
    claim(1 + 1 == 2, "one plus one is two")
    assert capsys.readouterr().out == "✓ one plus one is two\n"
    for full_size in (False, True):  # in full mode every claim is checked
        with pytest.raises(AssertionError, match="the notebook claims: the tuned model wins; this run does not show it"):
            claim(False, "the tuned model wins", full_size=full_size)
    monkeypatch.setenv("DPO_TUTORIAL_FAST", "1")
    claim(False, "the tuned model wins", full_size=True)  # a short run cannot show it: said, not raised
    assert capsys.readouterr().out == "(fast mode, small counts: not checked) the tuned model wins\n"
    with pytest.raises(AssertionError, match="the two shapes agree"):
        claim(False, "the two shapes agree")  # an identity holds at any size: checked in fast mode too
