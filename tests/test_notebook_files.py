"""Committed notebooks: outputs and execution counts stripped, the standard python3 kernel, package imported."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_seven_notebooks_exist_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_pickapic_layout", "02_shared_noise", "03_model_diff_geometry", "04_logsigmoid_loss",
                     "05_one_training_step", "06_train_lora", "07_evaluate"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_uses_python3_and_imports_the_package(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for cell in code:
        assert cell.get("outputs", []) == [], f"{path.name}: a cell has outputs"
        assert cell.get("execution_count") is None, f"{path.name}: a cell has an execution count"
    setup = "".join(code[0]["source"])
    assert "pip" in setup and "from dpo_tutorial.notebook_env import budget" in setup and "cuda.is_available" in setup
    assert len(nb["cells"]) <= 30


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_installs_from_the_repository_named_in_pyproject(path):
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((path.parents[1] / "pyproject.toml").read_text())
    url = pyproject["project"]["urls"]["Repository"]
    setup = "".join(next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")["source"])
    assert f'"dpo-tutorial @ git+{url}"' in setup
