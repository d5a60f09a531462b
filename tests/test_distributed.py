"""Several processes (gloo on CPU): one log and one export, and decisions every process takes together.

A GPU run in fp16 under several processes is what these stand in for: the processes must skip the same
updates, keep the same loss scale and lr schedule, and stop together, or their weights drift apart and a
process waits forever in a collective the others never enter.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from dpo_tutorial import checkpoint as ckpt
from dpo_tutorial.run_dir import History

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


class Ranks(typing.NamedTuple):
    """What the processes of one launch printed and returned, rank by rank."""
    returncodes: list[int]
    stdout: list[str]
    stderr: list[str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stacks(procs: list[subprocess.Popen]) -> str:
    """The Python stacks of the processes still running (py-spy, where installed): what a hung run was doing."""
    if not shutil.which("py-spy"):
        return "(py-spy is not installed: no stacks)"
    return "\n".join(f"rank {rank}:\n" + subprocess.run(["py-spy", "dump", "--pid", str(proc.pid)], capture_output=True,
                                                       text=True, timeout=60, check=False).stdout
                     for rank, proc in enumerate(procs) if proc.poll() is None)


def _launch(folder: Path, *args, timeout=150) -> Ranks:
    """``python *args`` as 2 processes of one gloo group, set up as ``torchrun`` / ``accelerate launch`` set up
    their workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), without their
    supervising agent: what is tested is the training's own processes, each with its own output
    (``folder/rank-<r>.out``/``.err``). A process still running after ``timeout`` seconds fails the test with the
    stacks of the processes still running, and every process is killed."""
    port, procs, logs = _free_port(), [], []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        out, err = (open(folder / f"rank-{rank}.{kind}", "w") for kind in ("out", "err"))
        logs += [out, err]
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err, text=True))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        if any(p.poll() is None for p in procs):
            stacks = _stacks(procs)
            tails = "".join(f"\n--- rank {r} stderr\n{(folder / f'rank-{r}.err').read_text()[-2000:]}" for r in (0, 1))
            pytest.fail(f"still running after {timeout} s (returncodes {[p.poll() for p in procs]})\n{stacks}{tails}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for log in logs:
            log.close()
    return Ranks([p.returncode for p in procs], *([(folder / f"rank-{r}.{kind}").read_text() for r in (0, 1)]
                                                  for kind in ("out", "err")))


def _train_args(sd_dir, data, out, *extra) -> list[str]:
    return ["--pretrained", str(sd_dir), "--dataset", str(data), "--output-dir", str(out), "--resolution", "32",
            "--batch-size", "2", "--rank", "4", "--no-sample-grid", "--num-processes", "2", *extra]


def test_two_cpu_processes_on_gloo_train_log_and_export_once(sd_dir, pairs_parquet, tmp_path):
    out = tmp_path / "run"
    ranks = _launch(tmp_path, "-m", "dpo_tutorial.cli", "train", *_train_args(sd_dir, pairs_parquet, out, "--max-steps",
                                                                          "4", "--checkpoint-every", "2"))
    assert ranks.returncodes == [0, 0], ranks.stderr[0][-2000:] + ranks.stderr[1][-2000:]
    assert "done: 4 steps" in ranks.stdout[0] and ranks.stdout[1] == "", ranks.stdout  # process 0 speaks for the run
    records = History.load(out).records
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # logged once, not once per process
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / "process_1.pt").exists()
    assert len(list(out.glob("*.safetensors"))) == 1
    saved = json.loads((out / "config.json").read_text())
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
    procs = _launch(tmp_path, str(HERE / "distributed_run.py"), str(tmp_path), "2,4,5", "--",
                    "train", *_train_args(sd_dir, pairs_parquet, out, "--max-steps", "8", "--max-nonfinite-steps", "2",
                                          "--lr-scheduler", "linear", "--lr", "1e-2", "--max-grad-norm", "0"))
    assert procs.returncodes == [1, 1], procs.stderr[0][-3000:] + procs.stderr[1][-3000:]
    stops = [[line for line in err.splitlines() if line.startswith("dpo-tutorial train: stopped:")]
             for err in procs.stderr]
    assert len(stops[0]) == 1 and "2 optimizer steps in a row" in stops[0][0] and stops[1] == [], procs.stderr
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 5  # both stopped after step 5
    for r in ranks:  # the group (its worker threads) was freed while the final barrier was held (no exit hang)
        assert r["release"]["barrier_held"] and r["release"]["threads_joined"] >= 2, r["release"]
    assert ranks[0]["lr"] == ranks[1]["lr"] and ranks[0]["scale"] == ranks[1]["scale"] == 2.0 ** 16
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], value, rtol=0, atol=0)
    records = History.load(out).records
    assert [r["skipped_update"] for r in records] == [False, True, False, True, True]
    assert records[1]["lr"] == records[0]["lr"]  # the schedule did not move on the skipped step
