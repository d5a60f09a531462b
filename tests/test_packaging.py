"""environment.yml and pyproject.toml name the same dependencies; no torchvision anywhere."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def names(specs):
    return {re.split(r"[<>=!~\[ ]", s.strip(), maxsplit=1)[0].lower() for s in specs if s.strip()}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = names(project["dependencies"]) | names(project["optional-dependencies"]["dev"])
    env = (ROOT / "environment.yml").read_text()
    pip_section = env.split("- pip:", 1)[1]
    listed = names(m for m in re.findall(r"^\s+- ([A-Za-z][^\s#]*)", pip_section, flags=re.M))
    assert listed == wanted
    assert "torchvision" not in wanted


def test_torch_is_a_range_so_a_preinstalled_torch_is_kept():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_spec = next(s for s in project["dependencies"] if s.startswith("torch"))
    assert ">=" in torch_spec and "==" not in torch_spec
