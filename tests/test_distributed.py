"""Several processes (torchrun, gloo on CPU): one log and one export, and decisions every process takes together.

A GPU run in fp16 under several processes is what these stand in for: the processes must skip the same
updates, keep the same loss scale and lr schedule, and stop together, or their weights drift apart and a
process waits forever in a collective the others never enter.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_tutorial import checkpoint as ckpt
from dpo_tutorial.run_dir import History

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def _torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _train_args(sd_dir, data, out, *extra) -> list[str]:
    return ["--pretrained", str(sd_dir), "--dataset", str(data), "--output-dir", str(out), "--resolution", "32",
            "--batch-size", "2", "--rank", "4", "--no-sample-grid", "--num-processes", "2", *extra]


def test_two_cpu_processes_on_gloo_train_log_and_export_once(sd_dir, pairs_parquet, tmp_path):
    proc = _torchrun("-m", "dpo_tutorial.cli", "train", *_train_args(sd_dir, pairs_parquet, tmp_path, "--max-steps", "4",
                                                                    "--checkpoint-every", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = History.load(tmp_path).records
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # logged once, not once per process
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "process_1.pt").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["world_size"] == 2 and saved["effective_batch_pairs"] == 4
    single = [sys.executable, "-m", "dpo_tutorial.cli", "train",
              *_train_args(sd_dir, pairs_parquet, tmp_path / "single", "--max-steps", "1")]
    proc = subprocess.run(single, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "expected 2 processes but this run has 1" in proc.stderr


def test_a_non_finite_loss_on_one_process_is_skipped_by_all_and_a_blow_up_stops_all_together(sd_dir, pairs_parquet,
                                                                                           tmp_path):
    """Rank 1 alone meets NaN at step 2 (one skipped update), then at steps 4 and 5 (two in a row: the stop).

    Every process must skip step 2 (its weights, loss scale and lr schedule stay identical across processes),
    and at step 5 every process must stop, saying so once, without a hang (the timeout bounds it)."""
    out = tmp_path / "run"
    proc = _torchrun(str(HERE / "distributed_run.py"), str(tmp_path), "2,4,5", "--",
                     "train", *_train_args(sd_dir, pairs_parquet, out, "--max-steps", "8", "--max-nonfinite-steps", "2",
                                           "--lr-scheduler", "linear", "--lr", "1e-2", "--max-grad-norm", "0"),
                     timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    stops = [line for line in proc.stderr.splitlines() if line.startswith("dpo-tutorial train: stopped:")]
    assert len(stops) == 1 and "2 optimizer steps in a row" in stops[0], proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 5  # both stopped after step 5
    assert ranks[0]["lr"] == ranks[1]["lr"] and ranks[0]["scale"] == ranks[1]["scale"] == 2.0 ** 16
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], value, rtol=0, atol=0)
    records = History.load(out).records
    assert [r["skipped_update"] for r in records] == [False, True, False, True, True]
    assert records[1]["lr"] == records[0]["lr"]  # the schedule did not move on the skipped step
