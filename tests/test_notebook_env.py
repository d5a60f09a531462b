"""The notebooks' device, dtype and runs folder."""
import pytest
import torch

from dpo_tutorial.device_guard import GuardDevice
from dpo_tutorial.evaluate import eval_batch_pairs
from dpo_tutorial.notebook_env import notebook_config, notebook_device, notebook_dtype, runs_folder


def test_device_is_cpu_here_and_dtype_halves_only_on_a_gpu():
    assert notebook_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not isinstance(notebook_device(), GuardDevice)  # the guard is off outside the test kernels
    assert notebook_dtype("cpu") == torch.float32 and notebook_dtype("cuda") == torch.float16


def test_runs_folder_moves_relative_runs_under_dpo_tutorial_runs(monkeypatch, tmp_path):
    monkeypatch.delenv("DPO_TUTORIAL_RUNS", raising=False)
    assert runs_folder("runs/sd15") == "runs/sd15"
    monkeypatch.setenv("DPO_TUTORIAL_RUNS", str(tmp_path / "drive"))
    assert runs_folder("runs/sd15") == str(tmp_path / "drive" / "sd15")
    assert runs_folder("mine") == str(tmp_path / "drive" / "mine")
    assert runs_folder("/abs/run") == "/abs/run"
    monkeypatch.setenv("DPO_TUTORIAL_PRESET", "toy")
    assert notebook_config().output_dir == str(tmp_path / "drive" / "toy")


def test_eval_batch_fits_a_t4_at_512_px_and_keeps_the_toy_at_64():
    assert eval_batch_pairs(32) == 64 and eval_batch_pairs(512) == 8 and eval_batch_pairs(1024) == 2
    with pytest.raises(ValueError, match="resolution=0"):
        eval_batch_pairs(0)
