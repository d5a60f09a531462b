"""House rules that a reader relies on: no private names across modules, imports at the top, test support apart."""
import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source(path: Path) -> str:
    """A Python file's text, or a notebook's code cells joined (IPython magics dropped)."""
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def _private_imports(path: Path) -> list[str]:
    """``from x import _name`` and ``module._name`` uses of *our* modules in one file or notebook."""
    tree = ast.parse(_source(path))
    own = {p.stem for p in (ROOT / "dpo_tutorial").rglob("*.py")} | {"dpo_tutorial", "toy"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dpo_tutorial")):
            found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in own):
            found.append(f"{path.name}: {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    files = [*(ROOT / "dpo_tutorial").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "notebooks").glob("*.ipynb")]
    offenders = [hit for f in files for hit in _private_imports(f)]
    assert offenders == []


def test_the_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from dpo_tutorial.train import _finish\nfrom .data import _rows\nimport train\ntrain._setup()\n")
    assert len(_private_imports(bad)) == 3


def test_the_package_loaders_raise_no_warnings_and_drop_only_known_notices(tmp_path, sd_dir, pairs_parquet):
    """What a learner sees: the package's own loads are warning-free (no torch_dtype deprecation), and the
    third-party notices it triggers are dropped by message, not by silencing whole loggers."""
    import logging
    import warnings

    from dpo_tutorial.models import load_parts
    from dpo_tutorial.notices import KNOWN_NOTICES
    from dpo_tutorial.sample import load_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(sd_dir)
        load_parts(str(sd_dir))
    assert [str(w.message) for w in caught] == []
    for name, fragment in KNOWN_NOTICES:
        logger = logging.getLogger(name)
        record = lambda msg: logging.LogRecord(name, logging.WARNING, "", 0, msg, None, None)  # noqa: E731
        assert not logger.filter(record(f"`X` {fragment}, etc.")), name  # dropped
        assert logger.filter(record("something else entirely")), name  # everything else still shows


@pytest.mark.slow
def test_a_fresh_process_loading_a_pipeline_with_a_lora_prints_no_known_notice(sd_dir, pairs_parquet, tmp_path):
    """The notices fire once per process (``warning_once``), so only a fresh process can show them."""
    import subprocess
    import sys

    from dpo_tutorial.config import TrainConfig
    from dpo_tutorial.notices import KNOWN_NOTICES
    from dpo_tutorial.train import train

    train(TrainConfig(pretrained=str(sd_dir), dataset=str(pairs_parquet), output_dir=str(tmp_path), resolution=32,
                      batch_size=2, max_steps=1, rank=4, sample_grid=False))
    code = ("from dpo_tutorial.evaluate import load_with_lora; import sys; "
            f"load_with_lora({str(sd_dir)!r}, {str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = [fragment for _, fragment in KNOWN_NOTICES if fragment in done.stdout + done.stderr]
    assert shown == []


PRODUCT = [p for p in (ROOT / "dpo_tutorial").rglob("*.py") if "testing" not in p.relative_to(ROOT).parts]
OPTIONAL = {"ipywidgets", "bitsandbytes"}  # imported where used: a run needs neither


def _local_imports(path: Path) -> list[str]:
    """Modules a file imports inside functions (``name`` of ``import name`` / ``from name import x``)."""
    tree = ast.parse(path.read_text())
    found = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    found += [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append("." * node.level + (node.module or ""))
    return found


def test_imports_sit_at_the_top_except_the_optional_ones():
    """The real import graph is visible at the top of each module; only optional dependencies are imported where
    they are used (a learner without them can still import and train)."""
    offenders = {p.relative_to(ROOT).as_posix(): names for p in PRODUCT
                 if (names := [n for n in _local_imports(p) if n.split(".")[0] not in OPTIONAL])}
    assert offenders == {}


def test_the_local_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import json\n    from .data import load_pickapic\n    import ipywidgets\n")
    assert _local_imports(bad) == ["json", ".data", "ipywidgets"]


@pytest.mark.slow
def test_a_run_never_imports_the_test_support():
    """``dpo_tutorial.testing`` (stand-in pipelines, the device guard) is not part of what a run or a notebook loads."""
    import subprocess
    import sys

    static = [p.relative_to(ROOT).as_posix() for p in PRODUCT
              if any("testing" in (n or "") for n in _local_imports(p) + _top_imports(p))]
    assert static == []
    code = ("import sys, dpo_tutorial.cli, dpo_tutorial.notebook_env, dpo_tutorial.toy.labelling, "
            "dpo_tutorial.toy.your_taste; print(sorted(m for m in sys.modules if m.startswith('dpo_tutorial.testing')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def _top_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names
