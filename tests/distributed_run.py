"""Run by ``tests/test_distributed.py`` as 2 processes: a tiny training in which ONE process meets a non-finite loss.

``python tests/distributed_run.py OUT STEPS -- TRAIN_ARGS...`` in each process, with the environment ``torchrun`` gives
its workers (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...); ``torchrun --nproc_per_node 2 tests/distributed_run.py
...`` runs it the same way.

Rank 1 (only) turns its loss into NaN at the optimizer steps listed in ``STEPS`` (comma-separated). A GradScaler
is installed where accelerate would install one for fp16 on a GPU (accelerate installs none on a CPU), because a
scaler is where the processes' states drifted apart: a process that skipped its update also skipped the scaler's
update and the lr schedule's step. The run goes through ``dpo-tutorial train`` (``dpo_tutorial.cli.main``); then
every process writes its trainable weights, learning rate and loss scale to ``OUT/rank-<r>.pt``.
"""
import os
import sys

import torch

import dpo_tutorial.train  # noqa: F401  (the module; the package's name `train` is the function)
from dpo_tutorial.cli import main

train_module = sys.modules["dpo_tutorial.train"]


def install_scaler(run) -> None:
    """What ``accelerator.prepare`` does with fp16 on a GPU: a GradScaler, and the optimizer wrapped with it."""
    run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    run.accelerator._optimizers.clear()
    run.optimizer = run.accelerator.prepare(run.optimizer.optimizer)


def main_under_test(out: str, nan_steps: set[int], argv: list[str]) -> int:
    rank = int(os.environ["RANK"])
    captured, calls = {}, [0]

    def setup(config):
        run = real_setup(config)
        install_scaler(run)
        captured["run"] = run
        return run

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls[0] += 1  # one micro-batch per optimizer step here (grad_accum 1)
        if rank == 1 and calls[0] in nan_steps:
            result.loss = result.loss * float("nan")  # still in the graph: this process backprops as the others do
        return result

    def release(run, last_barrier):
        threads = len(os.listdir("/proc/self/task"))  # gloo's worker threads are among them until the group is freed
        real_release(run, last_barrier)
        captured["release"] = {"barrier_held": last_barrier is not None,
                               "threads_joined": threads - len(os.listdir("/proc/self/task"))}

    real_setup, real_step, real_release = train_module.setup_run, train_module.dpo_step, train_module.release_process_group
    train_module.setup_run, train_module.dpo_step, train_module.release_process_group = setup, step, release
    code = main(argv)
    run = captured["run"]
    unet = run.parts.unet  # the model the prepared (DDP) one wrapped
    torch.save({"params": {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad},
                "lr": run.lr_scheduler.get_last_lr()[0], "scale": run.accelerator.scaler.get_scale(),
                "steps": calls[0], "code": code, "release": captured.get("release")},
               os.path.join(out, f"rank-{rank}.pt"))
    return code


if __name__ == "__main__":
    out_dir, steps, sep, *train_argv = sys.argv[1:]
    assert sep == "--", "usage: distributed_run.py OUT STEPS -- TRAIN_ARGS..."
    sys.exit(main_under_test(out_dir, {int(s) for s in steps.split(",") if s}, train_argv))
