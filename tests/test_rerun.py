"""``dpo-tutorial train`` run again into the same output folder (``make train`` twice)."""
import json
import shutil

from dpo_tutorial import checkpoint as ckpt
from dpo_tutorial.cli import main
from dpo_tutorial.config import get_preset
from dpo_tutorial.run_dir import plan_rerun


def _argv(sd_dir, pairs_parquet, out, *extra) -> list[str]:
    return ["train", "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--output-dir", str(out),
            "--max-steps", "2", "--batch-size", "2", "--resolution", "32", "--rank", "4", "--checkpoint-every", "1",
            "--no-sample-grid", "--num-threads", "1", *extra]


def test_second_identical_run_reports_the_finished_one(sd_dir, pairs_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(sd_dir, pairs_parquet, out)) == 0
    history = (out / "history.jsonl").read_text()
    capsys.readouterr()
    assert main(_argv(sd_dir, pairs_parquet, out)) == 0
    printed = capsys.readouterr().out
    assert f"{out} already holds this run, finished (2 steps" in printed and "another run" not in printed
    assert (out / "history.jsonl").read_text() == history  # nothing was trained again
    assert not (tmp_path / "run-2").exists()


def test_other_settings_go_to_a_numbered_folder_and_interrupted_runs_resume(sd_dir, pairs_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(sd_dir, pairs_parquet, out)) == 0
    capsys.readouterr()
    assert main(_argv(sd_dir, pairs_parquet, out, "--lr", "2e-3")) == 0
    printed = capsys.readouterr().out
    assert f"holds a run with other settings (lr: checkpoint {get_preset('toy').lr!r} vs now 0.002)" in printed
    assert f"this run goes to {out}-2" in printed
    assert json.loads((tmp_path / "run-2" / "config.json").read_text())["lr"] == 2e-3
    # an interrupted run with the same settings resumes from its latest checkpoint
    for path in ckpt.list_checkpoints(tmp_path / "run-2")[1:]:
        shutil.rmtree(path)
    (tmp_path / "run-2" / "pytorch_lora_weights.safetensors").unlink()
    plan = plan_rerun(get_preset("toy", pretrained=str(sd_dir), dataset=str(pairs_parquet), output_dir=str(out),
                                 max_steps=2, batch_size=2, resolution=32, rank=4, lr=2e-3))
    assert (plan.action, plan.config.output_dir, plan.config.resume) == ("resume", f"{out}-2", "latest")
    assert main(_argv(sd_dir, pairs_parquet, out, "--lr", "2e-3")) == 0
    assert "resuming the interrupted run" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run-2")][-1] == "checkpoint-2"


def test_another_max_steps_is_another_run_not_an_extension(sd_dir, pairs_parquet, tmp_path, capsys):
    """A short (fast-mode) run must not be extended into a long one: max_steps shapes the lr schedule."""
    out = tmp_path / "run"
    assert main(_argv(sd_dir, pairs_parquet, out)) == 0
    capsys.readouterr()
    steps = json.loads((out / "config.json").read_text())["max_steps"]
    assert main(_argv(sd_dir, pairs_parquet, out, "--max-steps", str(steps + 1))) == 0
    printed = capsys.readouterr().out
    assert f"max_steps: checkpoint {steps} vs now {steps + 1}" in printed and f"this run goes to {out}-2" in printed
