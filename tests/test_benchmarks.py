"""The benchmark scripts' own arithmetic and code paths, at tiny sizes (they measure nothing here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402
import bench_vs_diffusers as bvd  # noqa: E402
import step_roofline  # noqa: E402
import toy_seeds  # noqa: E402


def test_step_seconds_are_differences_of_consecutive_step_ends_after_the_warm_up():
    ends = [1.0, 3.0, 6.0, 10.0, 15.0]  # steps 1..5 end here: steps 2..5 took 2, 3, 4, 5 s
    assert bvd.step_seconds(ends, warmup_steps=2) == [3.0, 4.0, 5.0]  # steps 3, 4, 5
    assert bvd.step_seconds(ends, warmup_steps=0) == [2.0, 3.0, 4.0, 5.0]  # step 1's start is never logged
    assert bvd.step_seconds(ends, warmup_steps=5) == []


def test_summarise_steps_median_and_percentiles():
    summary = bvd.summarise_steps([0.5, 0.1, 0.3, 0.2, 0.4])
    assert summary["median_s"] == pytest.approx(0.3)
    assert summary["p10_s"] == pytest.approx(0.14)  # numpy's linear interpolation: 0.1 + 0.4 * (0.2 - 0.1)
    assert summary["steps_timed"] == 5


def test_read_jsonl_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"bar": 1, "t": 0.5}\n{"bar": 2, "t": 0.9}\n{"bar": 3, "t"')
    assert bvd.read_jsonl(path) == [{"bar": 1, "t": 0.5}, {"bar": 2, "t": 0.9}]
    assert bvd.read_jsonl(tmp_path / "absent.jsonl") == []


FAKE_SCRIPT = '''"""A stand-in training script: one progress bar updated per step, another bar that must not be timed."""
import sys
import time
from tqdm.auto import tqdm

steps = int(sys.argv[1])
for _ in tqdm(range(2), desc="Loading"):
    pass
bar = tqdm(range(steps), desc=sys.argv[2])
for _ in range(steps):
    time.sleep(0.01)
    bar.update(1)
for _ in tqdm(range(steps), desc=sys.argv[2] + " iterated"):
    time.sleep(0.01)
'''


@pytest.mark.parametrize("bar", ["Steps", "Steps iterated"])
def test_the_timed_launcher_records_one_time_per_step_of_the_named_bar(tmp_path, bar):
    """Both ways a program advances its bar (``update`` and iterating it) give one record per step, in order, and
    only for the bar named; the stand-ins go on the path only for packages that are missing."""
    launcher = bvd.write_timed_launcher(tmp_path / "launcher")
    (tmp_path / "fake_script.py").write_text(FAKE_SCRIPT)
    log = tmp_path / "steps.jsonl"
    env = {**os.environ, "BENCH_STEP_LOG": str(log), "BENCH_STEP_BAR": bar,
           "BENCH_STANDINS": str(launcher.parent), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(launcher), str(tmp_path / "fake_script.py"), "5", "Steps"], env=env,
                   check=True, capture_output=True, timeout=300)
    records = bvd.read_jsonl(log)
    found = records[0]
    steps = [r for r in records if "bar" in r]
    assert [r["bar"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(b["t"] - a["t"] >= 0.01 for a, b in zip(steps, steps[1:]))  # each step slept 10 ms
    for package, standin in (("torchvision.transforms", "torchvision-pil"), ("wandb", "wandb-empty")):
        try:
            __import__(package)
            expected = "real"
        except ImportError:
            expected = standin
        assert found[package.split(".")[0]] == expected


def test_parse_variant_reads_storage_options_and_refuses_unknown_ones():
    spec = bench_gpu.parse_variant("cached-fp16+cl+nopeftcast+pairs16", default_pairs=8)
    assert (spec["step"], spec["half"], spec["frozen"], spec["lora"], spec["autocast"]) == (
        "cached", torch.float16, torch.float16, torch.float32, True)
    assert spec["channels_last"] and spec["nopeftcast"] and not spec["compile"] and spec["pairs"] == 16
    pure = bench_gpu.parse_variant("pure-bf16+cudnn-attn", default_pairs=8)
    assert (pure["lora"], pure["autocast"], pure["attention"], pure["pairs"]) == (
        torch.bfloat16, False, "CUDNN_ATTENTION", 8)
    with pytest.raises(ValueError, match="unknown variant 'cached'"):
        bench_gpu.parse_variant("cached", 8)
    with pytest.raises(ValueError, match=r"unknown option \+fast"):
        bench_gpu.parse_variant("cached-bf16+fast", 8)


def test_the_roofline_tracer_counts_flops_as_torch_does_and_bytes_of_inputs_and_outputs():
    a = torch.zeros(64, 32, device="meta", dtype=torch.bfloat16)
    b = torch.zeros(32, 16, device="meta", dtype=torch.bfloat16)
    traffic = step_roofline.Traffic()
    with traffic:
        (a @ b).t()  # a matmul, then a view that moves nothing
    rows = {name: (flops, moved) for name, flops, moved in traffic.rows}
    assert rows["aten::mm"] == (2 * 64 * 32 * 16, 2 * (64 * 32 + 32 * 16 + 64 * 16))
    assert rows["aten::t"] == (0, 0)


def test_emulated_autocast_runs_norms_in_fp32_and_matmuls_in_the_half_type():
    x = torch.zeros(2, 8, 4, 4, device="meta", dtype=torch.bfloat16)
    w = torch.zeros(8, 8, 3, 3, device="meta")  # fp32, as a frozen weight left in fp32
    with step_roofline.EmulatedAutocast(torch.bfloat16):
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.float32
        assert torch.nn.functional.conv2d(x.float(), w).dtype == torch.bfloat16
        assert torch.nn.functional.silu(x).dtype == torch.bfloat16  # on neither list: the input's type


@pytest.mark.slow
def test_the_roofline_step_counts_torchs_flops_in_every_precision_and_fewer_bytes_without_autocast():
    """The FLOPs of a step do not depend on how its weights are stored, and equal an independent count
    (``FlopCounterMode`` over the same step); the casts autocast adds do cost bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = step_roofline.meta_unet(tiny=True)
    rows = {m: step_roofline.trace_step(unet, m, pairs=1) for m in ("autocast-bf16", "bf16")}
    flops = {m: sum(f for _, f, _ in r) for m, r in rows.items()}
    moved = {m: sum(b for _, _, b in r) for m, r in rows.items()}
    counter = FlopCounterMode(display=False)
    step_roofline.trace_step(unet, "bf16", pairs=1, recorder=counter)
    assert flops["autocast-bf16"] == flops["bf16"] == counter.get_total_flops() > 0
    assert moved["bf16"] < moved["autocast-bf16"]


@pytest.mark.slow
def test_bench_gpu_tiny_counts_one_step_of_flops_per_batch_size(tmp_path):
    out = tmp_path / "rows.json"
    bench_gpu.main(["--tiny", "--iters", "1", "--warmup", "0", "--arch", "sd15", "--variants", "recipe", "cached-bf16",
                    "pure-bf16+nopeftcast", "cached-bf16+cudnn-attn", "--json", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert rows["cached-bf16"]["tflop_per_step"] == rows["pure-bf16+nopeftcast"]["tflop_per_step"] > 0
    assert rows["recipe"]["tflop_per_step"] > rows["cached-bf16"]["tflop_per_step"]  # + VAE and text encoder
    assert "needs CUDA" in rows["cached-bf16+cudnn-attn"]["error"]  # a failing variant is a row, not a crash


@pytest.mark.slow
def test_profile_step_torch_profiler_reports_every_stage_of_the_projects_step(tmp_path, sd_dir, pairs_parquet):
    """Run as its command (a process of its own: accelerate's state is per process)."""
    import profile_step

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--torch-profiler",
                           "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--resolution", "32",
                           "--batch-size", "2", "--steps", "1", "--warmup", "1", "--top", "5"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for stage in (profile_step.DATA, "VAE encoder", "text encoder", "UNet forward: policy (LoRA on)",
                  "UNet forward: reference (no grad)", "the rest: loss, backward"):
        assert stage in done.stdout
    assert "convolution" in done.stdout and "top 5 by self CPU time" in done.stdout


@pytest.mark.slow
def test_train_check_trains_the_fp16_lora_case_on_the_tiny_work_in_its_own_process(tmp_path):
    import train_check

    train_check.main(["--tiny", "--out", str(tmp_path), "--cases", "fp16-lora"])
    (row,) = json.loads((tmp_path / "train_check.json").read_text())
    assert row["ok"], row.get("error")
    assert len(row["losses"]) == 2 and row["losses_finite"]
    assert row["settings"]["mixed_precision"] == "fp16" and not row["settings"]["full_finetune"]
    assert not (tmp_path / "fp16-lora").exists()  # the run folder is removed unless --keep-runs


def test_toy_seeds_writes_its_table_into_the_readme_from_a_finished_sweep(tmp_path, capsys):
    """The README's seed table is the script's own output (``--from-json`` re-reads a sweep, trains nothing), and
    its header says how many threads each run had: seed 0 there differs a little from `make train`'s run."""
    row = {"seed": 0, "train_seconds": 1.0}
    for name, win in (("seen", 0.74), ("unseen", 0.65)):
        row[name] = {"base_accuracy": 0.48, "dpo_accuracy": 0.92, "win_rate": win, "win_rate_ci_low": win - 0.05,
                     "win_rate_ci_high": win + 0.05, "implicit_acc": 0.74, "n": 360, "implicit_pairs": 443}
    sweep = tmp_path / "seeds.json"
    sweep.write_text(json.dumps({"cpu": "Some CPU", "cores": 2, "threads": 1, "train_args": [], "rows": [row]}))
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- toy-seeds:start -->\nold\n<!-- toy-seeds:end -->\nbottom\n")
    assert toy_seeds.main(["--from-json", str(sweep), "--write-readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("top\n<!-- toy-seeds:start -->\n1 seeds on Some CPU, 1 CPU thread per run (")
    assert "| 0 | 0.740 [0.690, 0.790] |" in text and text.endswith("<!-- toy-seeds:end -->\nbottom\n")
    assert "old" not in text and "1 seeds on Some CPU, 1 CPU thread per run" in capsys.readouterr().out
