"""The committed notebooks: executed top to bottom in full mode (a reader on GitHub sees every output), the same
five-line set-up cell, the scaffolding a learner relies on, exercises they write themselves, links that build in
order, and the repository named where pyproject names it."""
import json
import sys
from pathlib import Path

import nbformat
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from execute_notebooks import drop_progress_bars  # noqa: E402  (a script, not a module of the package)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NUMBERED = [p for p in NOTEBOOKS if p.stem[:2].isdigit()]
ORDER = ["00_derivation", "01_pickapic_layout", "02_loss_and_beta", "03_one_training_step", "04_train_lora",
         "05_shared_noise", "06_model_diff_geometry", "07_evaluate", "08_your_taste", "solutions"]
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
SETUP = f'''import importlib.util, subprocess, sys  # set-up: the installed package, or installed now from GitHub (Colab)
if importlib.util.find_spec("dpo_tutorial") is None and subprocess.run([sys.executable, "-m", "pip", "install", "-q", "dpo-tutorial @ git+{REPOSITORY}"]).returncode:
    raise SystemExit("Could not install dpo-tutorial. Offline? Put the repository (a clone, or its zip unpacked) next to this notebook, run `pip install ./dpo-tutorial` in a terminal, then run this cell again.")
from dpo_tutorial.notebook_env import budget, claim, check_exercise, notebook_config, notebook_setup
PRESET, DEVICE, DTYPE = notebook_setup()'''


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _markdown(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in _cells(path) if c["cell_type"] == "markdown"]


def _code(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in _cells(path) if c["cell_type"] == "code"]


def test_the_notebooks_exist_in_an_order_that_builds():
    assert [p.stem for p in NOTEBOOKS] == ORDER


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_starts_with_the_same_five_line_setup(path):
    code = _code(path)
    assert code[0] == SETUP
    assert len(code[0].splitlines()) == 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_committed_notebook_ran_top_to_bottom_in_full_mode(path):
    """Committed executed: every code cell ran once, in order, in one fresh kernel, in full mode, without an error;
    the first cell says where the outputs came from."""
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert [c.get("execution_count") for c in code] == list(range(1, len(code) + 1))
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    run = nb["metadata"].get("dpo_tutorial_run", {})
    assert run.get("mode") == "full" and run.get("machine") and run.get("date")
    assert "*The outputs below come from one full run of this notebook" in "".join(nb["cells"][0]["source"])
    printed = "".join("".join(o.get("text", "")) for c in code for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "mode: full" in printed and "fast mode, small counts" not in printed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_committed_output_is_a_progress_bar_stuck_at_its_first_frame(path):
    """A tqdm bar in a kernel is a live widget; saved, it shows 0% for ever on GitHub. `make executed` drops the bars
    and the widget state only they used (they were committed once, in six notebooks)."""
    nb = json.loads(path.read_text())
    views = [o["data"] for c in nb["cells"] for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not [v["text/plain"] for v in views if "%|" in "".join(v.get("text/plain", ""))]
    state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    shown = {v["application/vnd.jupyter.widget-view+json"]["model_id"] for v in views}
    assert shown <= set(state) and len(state) <= 40 * len(shown), "widget state of models no output shows"


def test_make_executed_drops_progress_bars_and_only_the_widget_state_they_used():
    """Both kinds of bar a kernel shows (tqdm's with a percentage, `datasets`' counter without one) go, with the
    models they used; a widget a learner works with (08's labelling box) stays, with the models it holds."""
    def view(model, text):
        return nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": model, "version_major": 2, "version_minor": 0},
            "text/plain": text})

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[
        view("a1", "Diffusion-DPO:   0%|          | 0/30 [00:00<?, ?it/s]"),
        view("b1", "Generating train split: 0 examples [00:00, ? examples/s]"),
        view("c1", "VBox(children=(HTML(value='<b>click the image</b>'),))"),
        nbformat.v4.new_output("stream", name="stdout", text="✓ 0%| in a printed line stays\n")])]
    state = {"a1": {"state": {"layout": "IPY_MODEL_a2"}}, "a2": {}, "b1": {}, "c1": {"state": {"children": [
        "IPY_MODEL_c2"]}}, "c2": {"state": {"layout": "IPY_MODEL_c3"}}, "c3": {}}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state, "version_major": 2}}
    drop_progress_bars(nb)
    kept = nb.cells[0].outputs
    assert [o.get("data", {}).get("text/plain", o.get("text")) for o in kept][0].startswith("VBox") and len(kept) == 2
    assert set(nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]) == {"c1", "c2", "c3"}


def test_the_readme_gives_the_times_the_committed_notebooks_record():
    """The README's notebook-times block is `make executed`'s own record of the run whose outputs are committed: the
    same machine and date, and each notebook's seconds as its metadata holds them."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- notebook-times:start -->")[1].split("<!-- notebook-times:end -->")[0]
    runs = {p.stem: json.loads(p.read_text())["metadata"]["dpo_tutorial_run"] for p in NOTEBOOKS}
    header, _, row = [line.strip("| ").split(" | ") for line in block.splitlines() if line.startswith("|")]
    order = [n for n in ORDER if n != "solutions"] + ["solutions"]
    assert header == [n if n == "solutions" else n[:2] for n in order]
    assert row == [f"{runs[n]['seconds']:.0f} s" for n in order]
    assert f": {sum(r['seconds'] for r in runs.values()):.0f} s," in block
    assert all(f"{r['machine']}, {r['date']}" in block for r in runs.values())


def test_the_executed_notebooks_stay_small():
    assert sum(p.stat().st_size for p in NOTEBOOKS) <= 8 * 2**20


@pytest.mark.parametrize("path", NUMBERED, ids=lambda p: p.stem)
def test_numbered_notebook_has_its_scaffolding(path):
    """"You will learn" near the top, 2-3 exercises pointing at the solutions (one at least written by the learner
    into a stub that a checking cell compares with the package), "Takeaways" last, and links to the previous and
    next notebooks."""
    cells = _cells(path)
    assert any("**You will learn**" in "".join(c["source"]) for c in cells[:3] if c["cell_type"] == "markdown")
    assert cells[-1]["cell_type"] == "markdown" and "".join(cells[-1]["source"]).startswith("## Takeaways")
    exercises = [m for m in _markdown(path) if m.startswith("## Exercises")]
    assert len(exercises) == 1 and "(solutions.ipynb)" in exercises[0]
    assert 2 <= sum(line.startswith(f"{n}. **") for n in range(1, 10) for line in exercises[0].splitlines()) <= 3
    code = _code(path)
    stubs = [i for i, c in enumerate(code) if "raise NotImplementedError" in c]
    assert stubs and any("check_exercise(" in c for c in code[stubs[0] + 1:])
    i = NUMBERED.index(path)
    text = "\n".join(_markdown(path))
    for neighbour in NUMBERED[max(0, i - 1):i] + NUMBERED[i + 1:i + 2]:
        assert f"]({neighbour.name})" in text, f"{path.name} does not link to {neighbour.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_python3_and_its_colab_badge_names_the_repository(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    owner_repo = REPOSITORY.removeprefix("https://github.com/")
    badge = f"(https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name})"
    assert nb["cells"][0]["cell_type"] == "markdown" and badge in "".join(nb["cells"][0]["source"]).splitlines()[0]
    assert len(nb["cells"]) <= (40 if path.stem == "solutions" else 30)  # the solutions: three exercises x nine notebooks


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebooks_speak_about_the_method_not_about_how_the_project_is_built(path):
    text = "\n".join(_markdown(path) + _code(path)).lower()
    for phrase in ("the issue", "main job", "this project's own", "fast_mode(", "if fast", "in_fast_mode", "the lead",
                   "ci run"):
        assert phrase not in text, f"{path.name}: {phrase!r}"


# the kernel cannot see the package: no PYTHONPATH entry or editable-install finder that holds dpo_tutorial
HIDE_PACKAGE = """import pathlib, sys
sys.path[:] = [p for p in sys.path if not (pathlib.Path(p or ".") / "dpo_tutorial").is_dir()]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""


@pytest.mark.slow
def test_offline_the_setup_cell_says_what_to_do_and_shows_no_traceback(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    bogus = "file:///nonexistent/dpo-tutorial"
    setup = SETUP.replace(f"git+{REPOSITORY}", f"git+{bogus}")
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
    error = next(o for o in nb.cells[0].outputs if o.output_type == "error")
    shown = "\n".join(error.traceback)
    assert error.ename == "SystemExit" and "Could not install dpo-tutorial" in error.evalue
    assert "pip install ./dpo-tutorial" in error.evalue and 'File "' not in shown
    assert not (tmp_path / "pip-target").exists()


def test_readme_links_every_notebook_in_colab():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert (f"https://colab.research.google.com/github/{REPOSITORY.removeprefix('https://github.com/')}/blob/main/"
                f"notebooks/{path.name}") in readme
