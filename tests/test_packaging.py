"""environment.yml and pyproject.toml name the same dependencies; no torchvision anywhere."""
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def names(specs):
    return {re.split(r"[<>=!~\[ ]", s.strip(), maxsplit=1)[0].lower() for s in specs if s.strip()}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # environment.yml pins python=3.11, so a requirement only for older Pythons (tomli) is not listed there
    for_311 = [s for s in extras["dev"] if "python_version < '3.11'" not in s]
    wanted = names(project["dependencies"]) | names(for_311) | names(extras["notebooks"])
    env = (ROOT / "environment.yml").read_text()
    pip_section = env.split("- pip:", 1)[1]
    listed = names(m for m in re.findall(r"^\s+- ([A-Za-z][^\s#]*)", pip_section, flags=re.M))
    assert listed == wanted
    assert "torchvision" not in wanted


def test_torch_is_a_range_so_a_preinstalled_torch_is_kept():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_spec = next(s for s in project["dependencies"] if s.startswith("torch"))
    assert ">=" in torch_spec and "==" not in torch_spec


def test_runtime_dependencies_are_what_the_package_imports():
    """Colab's runtime is left alone: Jupyter and widgets come with the `notebooks` extra, not the package."""
    import ast

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = names(project["dependencies"])
    assert not runtime & {"jupyterlab", "ipywidgets", "notebook", "jupyter"}
    imported, where = set(), {}
    for path in (ROOT / "dpo_tutorial").rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            found = set()
            if isinstance(node, ast.Import):
                found = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found = {node.module.split(".")[0]}
            imported |= found
            for name in found:
                where.setdefault(name, []).append((path.relative_to(ROOT).as_posix(), id(node) in top_level))
    assert "jupyterlab" not in imported
    # notebook 08's labelling widget is the one user of ipywidgets: imported inside the widget's constructor, so
    # the package imports and trains without it (it comes with Colab and with the `notebooks` extra)
    assert where.get("ipywidgets", []) == [("dpo_tutorial/toy/labelling.py", False)]
    imported.discard("ipywidgets")
    dist_names = {"pillow": "PIL", "pyarrow": "pyarrow", "safetensors": "safetensors"}
    unused = {n for n in runtime if dist_names.get(n, n) not in imported}
    assert unused == set(), f"runtime dependencies the package never imports: {unused}"
