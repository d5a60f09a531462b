"""Committed notebooks: outputs and execution counts stripped, the standard python3 kernel, package imported;
the install cell and the Open-in-Colab badges name pyproject's repository; offline, the install cell says what
to do instead of showing a traceback."""
import json
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


NUMBERED = [p for p in NOTEBOOKS if p.stem[:2].isdigit()]


def test_the_notebooks_exist_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["00_derivation", "01_pickapic_layout", "02_shared_noise", "03_model_diff_geometry",
                     "04_logsigmoid_loss", "05_one_training_step", "06_train_lora", "07_evaluate", "08_your_taste",
                     "solutions"]


def _markdown(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("path", NUMBERED, ids=lambda p: p.stem)
def test_numbered_notebook_has_its_scaffolding(path):
    """"You will learn" near the top, 2-3 exercises pointing at the solutions, "Takeaways" last, and links to
    the previous and next notebooks."""
    cells = json.loads(path.read_text())["cells"]
    assert any("**You will learn**" in "".join(c["source"]) for c in cells[:3] if c["cell_type"] == "markdown")
    assert cells[-1]["cell_type"] == "markdown" and "".join(cells[-1]["source"]).startswith("## Takeaways")
    exercises = [m for m in _markdown(path) if m.startswith("## Exercises")]
    assert len(exercises) == 1 and "(solutions.ipynb)" in exercises[0]
    assert 2 <= sum(line.startswith(f"{n}. **") for n in range(1, 10) for line in exercises[0].splitlines()) <= 3
    i = NUMBERED.index(path)
    text = "\n".join(_markdown(path))
    for neighbour in NUMBERED[max(0, i - 1):i] + NUMBERED[i + 1:i + 2]:
        assert f"]({neighbour.name})" in text, f"{path.name} does not link to {neighbour.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_uses_python3_and_imports_the_package(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for cell in code:
        assert cell.get("outputs", []) == [], f"{path.name}: a cell has outputs"
        assert cell.get("execution_count") is None, f"{path.name}: a cell has an execution count"
    setup = "".join(code[0]["source"])
    assert "pip" in setup and "from dpo_tutorial.notebook_env import budget" in setup
    assert "DEVICE = notebook_device()" in setup and "DTYPE = notebook_dtype(DEVICE)" in setup
    assert len(nb["cells"]) <= 30


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_installs_from_the_repository_named_in_pyproject(path):
    pyproject = tomllib.loads((path.parents[1] / "pyproject.toml").read_text())
    url = pyproject["project"]["urls"]["Repository"]
    cells = json.loads(path.read_text())["cells"]
    setup = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
    assert f'REPOSITORY = "{url}"' in setup and 'f"dpo-tutorial @ git+{REPOSITORY}"' in setup
    owner_repo = url.removeprefix("https://github.com/")
    badge = f"(https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name})"
    assert cells[0]["cell_type"] == "markdown" and badge in "".join(cells[0]["source"]).splitlines()[0]


def test_every_notebook_has_the_same_setup_cell():
    setups = {"".join(next(c for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code")["source"])
              for p in NOTEBOOKS}
    assert len(setups) == 1


# the kernel cannot see the package: no PYTHONPATH entry or editable-install finder that holds dpo_tutorial
HIDE_PACKAGE = """import pathlib, sys
sys.path[:] = [p for p in sys.path if not (pathlib.Path(p or ".") / "dpo_tutorial").is_dir()]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


def test_offline_the_install_cell_prints_what_to_do_and_no_traceback(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    setup = "".join(next(c for c in json.loads(NOTEBOOKS[0].read_text())["cells"] if c["cell_type"] == "code")["source"])
    bogus = "file:///nonexistent/dpo-tutorial"
    setup = setup.replace('REPOSITORY = "https://', f'REPOSITORY = "{bogus}"  # "https://')
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-hide-package.py").write_text(HIDE_PACKAGE)
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PIP_TARGET", str(tmp_path / "pip-target"))  # should pip succeed after all, not here
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    workdir = tmp_path / "content"  # like Colab's /content: no checkout, no upload
    workdir.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup)])
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    outputs = nb.cells[0].outputs
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    error = next(o for o in outputs if o.output_type == "error")
    shown = "\n".join(error.traceback)
    assert f"installing dpo-tutorial from dpo-tutorial @ git+{bogus}" in printed and "that failed:" in printed
    assert error.ename == "SetupError" and "Traceback" not in shown and 'File "' not in shown
    assert f"git clone {bogus}" in shown and str(workdir) in shown and "make install" in shown
    assert "CalledProcessError" not in printed + shown
    assert not (tmp_path / "pip-target").exists()


def test_readme_links_every_notebook_in_colab():
    root = NOTEBOOKS[0].parents[1]
    url = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    readme = (root / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/main/notebooks/{path.name}" in readme
