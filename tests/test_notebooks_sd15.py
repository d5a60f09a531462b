"""The notebooks' ``sd15`` cells (the Colab GPU path), executed on CPU against local stand-ins.

``DPO_TUTORIAL_PRESET=sd15`` selects the GPU preset's branches; ``DPO_TUTORIAL_OVERRIDES`` points its hub
ids at a tiny SD pipeline folder and a Pick-a-Pic-format parquet folder (``train`` and
``validation_unique`` splits, streamed as the preset does); ``DPO_TUTORIAL_PICKSCORE`` at a tiny PickScore
folder. The hub stays offline (conftest), so any cell that still reaches for it fails here.

The kernels run under :mod:`dpo_tutorial.testing.device_guard` (installed by an IPython startup file): the CPU
plays both "host" and the notebooks' ``DEVICE``, so a batch a cell forgets to move to ``DEVICE`` fails
here as it would on a GPU. Not covered: CUDA itself and fp16 (this machine has no GPU), and the real
models' sizes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_tutorial.testing.fixtures import build_tiny_pickscore
from dpo_tutorial.pickapic import write_pickapic_parquet
from conftest import make_rows

# the notebooks whose cells differ on the GPU preset: one step, the training run, the evaluation with PickScore. The
# others run the same package functions (covered here through these three) or the toy world whatever the preset.
SD15_NOTEBOOKS = ("03_one_training_step", "04_train_lora", "07_evaluate")
NOTEBOOKS = [Path(__file__).resolve().parents[1] / "notebooks" / f"{name}.ipynb" for name in SD15_NOTEBOOKS]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15_env(tmp_path_factory, sd_dir):
    """Environment variables that run the notebooks' sd15 branches on the stand-ins."""
    root = tmp_path_factory.mktemp("sd15-standins")
    for split in ("train", "validation_unique"):
        write_pickapic_parquet(root / "pickapic" / f"{split}.parquet", make_rows(n_good=24, seed=len(split)))
    overrides = {"pretrained": str(sd_dir), "dataset": str(root / "pickapic"), "resolution": 32,
                 "mixed_precision": "no", "batch_size": 2, "grad_accum": 2, "sample_steps": 2,
                 "output_dir": str(root / "runs" / "sd15")}
    # datasets sleeps 5 s whenever a stream's reader threads shut down (an arrow workaround); a 29-row
    # stand-in ends or abandons its stream dozens of times, so the test kernels skip that sleep
    startup = root / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-no-stream-sleep.py").write_text(
        "import datasets.config\ndatasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0\n")
    (startup / "01-device-guard.py").write_text("from dpo_tutorial.testing.device_guard import install\ninstall()\n")
    return {"DPO_TUTORIAL_PRESET": "sd15", "DPO_TUTORIAL_FAST": "1",
            "DPO_TUTORIAL_RUNS": str(root / "runs"),  # the toy cells' runs too: never the checkout's runs/fast
            "DPO_TUTORIAL_OVERRIDES": json.dumps(overrides),
            "DPO_TUTORIAL_PICKSCORE": str(build_tiny_pickscore(root / "pickscore")),
            "IPYTHONDIR": str(root / "ipython")}


def _text_outputs(nb) -> str:
    return "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_its_sd15_cells_on_standins(path, sd15_env, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    for key, value in sd15_env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    if path.stem == "07_evaluate":
        # a learner who opens 07 first has no LoRA from notebook 06 in runs/sd15: 07 trains a short one itself
        # (that branch once raised NameError: `train` was never imported, hidden while 06 ran first here)
        overrides = {**json.loads(sd15_env["DPO_TUTORIAL_OVERRIDES"]), "output_dir": str(tmp_path / "runs" / "sd15")}
        monkeypatch.setenv("DPO_TUTORIAL_OVERRIDES", json.dumps(overrides))
    nb = nbformat.read(str(path), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = _text_outputs(nb)
    assert "preset: sd15" in printed and "| device: cpu" in printed
    if path.stem == "07_evaluate":  # the PickScore comparison ran and printed its numbers
        assert "SD 1.5 on 4 prompts: mean PickScore" in printed and "nan" not in printed.split("SD 1.5 on")[1]
        assert not (tmp_path / "runs" / "sd15").exists()  # its short run went to a temporary folder, not runs/sd15
