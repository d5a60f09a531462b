"""Bad data, killed runs, numerical faults, user errors and several processes: nothing lost, clear errors."""
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_rows, solid
from dpo_tutorial import checkpoint as ckpt
from dpo_tutorial import files
from dpo_tutorial.cli import main
from dpo_tutorial.config import TrainConfig, get_preset
from dpo_tutorial.data import PairStream, PairTransform, load_pickapic
from dpo_tutorial.pickapic import encode_image, pickapic_row, write_pickapic_parquet
from dpo_tutorial.run_dir import History
from dpo_tutorial.train import make_stream, train


def base_config(pipe, data, out, **kw):
    return TrainConfig(**{**dict(pretrained=str(pipe), dataset=str(data), output_dir=str(out), resolution=32,
                                 batch_size=4, max_steps=4, lr=1e-3, beta=500.0, rank=4, sample_grid=False), **kw})


@pytest.fixture(scope="module")
def bad_parquet(tmp_path_factory):
    """Every kind of bad row, each with a named behaviour (see the asserts below)."""
    red, blue = encode_image(solid("red")), encode_image(solid("blue"))
    rows = make_rows(8)  # good pairs + a tie, a corrupt JPEG, grayscale, CMYK, PNG, mixed sizes
    k = 100
    rows += [pickapic_row("a red square", b"", blue, 1.0, k),                       # empty bytes: skipped
             pickapic_row("a red square", red[: len(red) // 2], blue, 1.0, k + 1),  # truncated: skipped
             pickapic_row("a red square", red, blue, 0.7, k + 2),                   # soft label: jpg_0 wins
             pickapic_row("a red square", red, blue, 1.5, k + 3),                   # outside [0, 1]: skipped
             pickapic_row("a red square", red, blue, float("nan"), k + 4),          # NaN: skipped
             pickapic_row("", red, blue, 1.0, k + 5),                               # empty caption: used
             pickapic_row("a red square " * 200, red, blue, 1.0, k + 6)]            # too long: truncated
    return write_pickapic_parquet(tmp_path_factory.mktemp("bad") / "train.parquet", rows)


@pytest.mark.slow
def test_bad_rows_are_used_or_skipped_and_counted(sd_dir, bad_parquet, tmp_path):
    with pytest.warns(UserWarning, match=r"skipped 3 pair\(s\) whose images did not decode and 2 with an invalid"):
        history = train(base_config(sd_dir, bad_parquet, tmp_path, max_steps=6))
    assert history.data_summary == {"ties_dropped": 1, "invalid_labels": 2, "undecodable_skipped": 3}
    assert all(math.isfinite(v) for v in history["loss"]) and len(history) == 6
    assert history.records[-1]["skipped_pairs"] == 3  # undecodable rows, counted as they were met
    assert (tmp_path / "data_summary.json").exists()


@pytest.mark.slow
def test_interrupted_save_leaves_previous_checkpoint(sd_dir, pairs_parquet, tmp_path, monkeypatch):
    train(base_config(sd_dir, pairs_parquet, tmp_path, max_steps=2, checkpoint_every=1))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train(base_config(sd_dir, pairs_parquet, tmp_path, max_steps=3, resume="latest", checkpoint_every=1))
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    resumed = train(base_config(sd_dir, pairs_parquet, tmp_path, max_steps=3, resume="latest"))
    assert [r["step"] for r in resumed.records] == [1, 2, 3]
    assert not list(tmp_path.glob(".tmp-checkpoint-*"))


def _save_tiny(output_dir, step, limit=None):
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return ckpt.save_checkpoint(output_dir, step, trainable=dict(layer.named_parameters()), optimizer=optimizer,
                                lr_scheduler=scheduler, generator=torch.Generator(), data_state={}, extra={},
                                limit=limit)


def _killed_after_one_file(path, ignore_errors=False):
    """Stands in for shutil.rmtree in a process killed after deleting the first file of a folder."""
    path = Path(path)
    if path.exists():
        sorted(path.iterdir())[0].unlink()
        raise KeyboardInterrupt("killed while deleting")


@pytest.mark.parametrize("kill_during", ["pruning", "dropping newer checkpoints"])
def test_a_kill_while_deleting_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch, kill_during):
    """Regression: pruning used rmtree in place, so a SIGKILL mid-delete left checkpoint-N without its weights."""
    for step in (1, 2):
        _save_tiny(tmp_path, step)
    monkeypatch.setattr(files.shutil, "rmtree", _killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        if kill_during == "pruning":
            _save_tiny(tmp_path, 3, limit=2)
        else:
            ckpt.remove_after(tmp_path, 1)
    monkeypatch.undo()
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == (["checkpoint-2", "checkpoint-3"] if kill_during == "pruning"
                                       else ["checkpoint-1"])
    for path in found:
        _assert_complete(path)
    files.clean_partial(tmp_path)  # the hidden half-deleted folder goes at the next start
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in found]


def _assert_complete(path):
    assert (path / "state.json").exists()
    assert load_file(str(path / "trainable.safetensors"))
    assert torch.load(path / "training_state.pt", weights_only=True)["optimizer"]
    assert torch.load(path / "process_0.pt", weights_only=True)["rng"]


def latest_step(output_dir) -> int:
    found = ckpt.list_checkpoints(output_dir)
    return int(found[-1].name.split("-")[1]) if found else 0


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(sd_dir, pairs_parquet, tmp_path):
    """Kill a real training process (checkpointing every step) at random moments, three times."""
    cmd = [sys.executable, "-m", "dpo_tutorial.cli", "train", "--pretrained", str(sd_dir), "--dataset",
           str(pairs_parquet), "--output-dir", str(tmp_path), "--resolution", "32", "--batch-size", "2",
           "--rank", "4", "--checkpoint-every", "1", "--checkpoints-total-limit", "3", "--no-sample-grid",
           "--max-steps", "100000", "--resume", "latest", "--num-threads", "1", "--lr-scheduler", "constant",
           "--lr-warmup-steps", "0"]
    rng = random.Random(0)
    for _ in range(3):
        before = latest_step(tmp_path)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while latest_step(tmp_path) < before + 2 and time.time() < deadline:
            time.sleep(0.05)
        assert latest_step(tmp_path) >= before + 2, "the training process did not checkpoint"
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = ckpt.list_checkpoints(tmp_path)
        assert found, "no complete checkpoint after the kill"
        for path in found:
            _assert_complete(path)
    step = latest_step(tmp_path)
    resumed = train(base_config(sd_dir, pairs_parquet, tmp_path, batch_size=2, max_steps=step + 2,  # a constant lr:
                                checkpoint_every=1, resume="latest",  # another max_steps may continue it
                                lr_scheduler="constant", lr_warmup_steps=0,
                                **{k: getattr(get_preset("toy"), k) for k in ("lr", "beta")}))
    assert [r["step"] for r in resumed.records] == list(range(1, step + 3))  # logs survive the kills


@pytest.mark.slow
def test_non_finite_updates_are_skipped_counted_then_stop(sd_dir, pairs_parquet, tmp_path):
    """lr=1e30 makes the weights overflow: updates are skipped and logged, K=3 in a row stop the run."""
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row.*learning rate"):
        train(base_config(sd_dir, pairs_parquet, tmp_path, max_steps=30, lr=1e30, max_grad_norm=0,
                          max_nonfinite_steps=3))
    records = History.load(tmp_path).records
    assert [r["skipped_update"] for r in records[-3:]] == [True, True, True]
    assert ckpt.list_checkpoints(tmp_path)[-1].name == f"checkpoint-{records[-1]['step']}"


@pytest.mark.slow
def test_fp16_gradient_overflow_is_left_to_the_grad_scaler(sd_dir, pairs_parquet, tmp_path):
    """With fp16 on a GPU, accelerate scales the loss, and overflowing gradients are routine early on.

    The scaler skips those updates and halves its scale. They must not count towards the non-finite stop
    (three in a row would end an SD 1.5 run at step 3). Accelerate sets up no GradScaler on CPU, so the
    test installs one where accelerate would. It then poisons two steps' gradients with inf.
    """
    from dpo_tutorial.train import optimizer_step, setup_run

    run = setup_run(base_config(sd_dir, pairs_parquet, tmp_path, max_steps=10, lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    run.accelerator.scaler = scaler  # then wrap the optimizer again, as prepare() does when it has a scaler
    run.accelerator._optimizers.clear()
    run.optimizer = run.accelerator.prepare(run.optimizer.optimizer)
    poisoned_steps = [True, True, False, False]
    run.params[0].register_hook(lambda grad: grad * float("inf") if poisoned_steps[0] else grad)
    batches, seen = iter(run.stream), []
    while poisoned_steps:
        before = [p.detach().clone() for p in run.params]
        _, updated, finite = optimizer_step(run, batches)
        moved = any(not torch.equal(b, p) for b, p in zip(before, run.params))
        seen.append((updated, finite, moved, scaler.get_scale()))
        poisoned_steps.pop(0)
    assert [s[:3] for s in seen] == [(False, True, False), (False, True, False), (True, True, True),
                                     (True, True, True)]
    assert [s[3] for s in seen] == [2.0 ** 15, 2.0 ** 14, 2.0 ** 14, 2.0 ** 14]


@pytest.mark.parametrize("argv,message", [
    (["--preset", "toy", "--beta", "-1"], "invalid beta=-1.0"),
    (["--pretrained", "/no/such/folder"], "model folder '/no/such/folder' does not exist"),
    (["--pretrained", "stabilityai/not-a-real-model"], "Offline?"),
    (["--dataset", "/no/such.parquet"], "does not exist"),
])
def test_user_errors_are_one_line(argv, message, capsys, sd_dir, pairs_parquet, tmp_path):
    defaults = ["--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--output-dir", str(tmp_path),
                "--resolution", "32", "--max-steps", "1"]
    assert main(["train", *defaults, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert message in err.splitlines()[-1] and err.splitlines()[-1].startswith("dpo-tutorial train: error:")


def test_unknown_preset_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "sd3"])
    assert exc.value.code == 2 and "invalid choice: 'sd3'" in capsys.readouterr().err


def test_map_style_shards_are_disjoint_and_cover_the_epoch(pairs_parquet):
    ds = load_pickapic(str(pairs_parquet))
    seen = []
    for rank in (0, 1):
        stream = PairStream(ds, PairTransform(32), batch_size=1, seed=3, rank=rank, world_size=2)
        caps = []
        for batch in stream:
            if stream.epoch > 0:
                break
            caps.append((batch["captions"][0], batch["pixel_values"].sum().item()))
        seen.append(caps)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == 15  # 16 usable rows minus the corrupt one


def test_streamed_data_is_split_across_processes(pairs_parquet, tmp_path):
    cfg = TrainConfig(pretrained="x", dataset=str(pairs_parquet), streaming=True, resolution=32, batch_size=1)
    ranks = []
    for rank in (0, 1):
        stream = make_stream(cfg, rank, 2)
        ids = [row["ranking_id"] for row in stream.dataset]
        ranks.append(ids)
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 17
