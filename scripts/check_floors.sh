#!/usr/bin/env bash
# Proves pyproject.toml's lower bounds: a fresh venv gets torch, diffusers, peft, transformers,
# accelerate and datasets at exactly their declared floors (each "NAME>=X" installed as "NAME==X"), the
# other dependencies and the dev and notebooks extras (as `make test`) as pip resolves them; then the fast
# tests run (tests/ without @slow, no notebooks).
#   make floors                                   (= bash scripts/check_floors.sh)
#   make floors TORCH_INDEX=https://download.pytorch.org/whl/cpu   CPU torch wheel instead of PyPI's
# PyPI's Linux x86_64 torch is the CUDA build (+ nvidia-* packages, ~2.5 GB); it runs on a CPU too.
# Env: PYTHON (base interpreter, default python3), FLOORS_VENV (default .venv-floors/, made anew),
# TORCH_INDEX (index for torch alone), FLOORED (the packages installed at their floor).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOORS_VENV:-.venv-floors}
FLOORED=${FLOORED:-"torch diffusers peft transformers accelerate datasets"}
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q "tomli; python_version < '3.11'"

# pyproject's dependencies and dev and notebooks extras, one a line, with ">=" turned into "==" for $FLOORED
mapfile -t REQS < <(FLOORED="$FLOORED" "$PY" - <<'PYEOF'
import os, re
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
floored = os.environ["FLOORED"].split()
extras = project["optional-dependencies"]  # notebooks: tests/test_notebooks_sd15.py runs cells that import ipywidgets
for spec in project["dependencies"] + extras["dev"] + extras["notebooks"]:
    name = re.match(r"[A-Za-z0-9_.-]+", spec)[0].lower()
    print(spec.replace(">=", "==", 1) if name in floored else spec)
PYEOF
)
echo "installing: ${REQS[*]}"
if [ -n "${TORCH_INDEX:-}" ]; then   # torch alone from that index, then kept by the install below
    "$PY" -m pip install "$(printf '%s\n' "${REQS[@]}" | grep '^torch==')" --index-url "$TORCH_INDEX"
fi
"$PY" -m pip install "${REQS[@]}"
"$PY" -m pip install --no-deps -e .
"$PY" -m pip list 2>/dev/null | grep -Ei "^(${FLOORED// /|}|huggingface.hub|numpy|tokenizers) "
"$PY" -m pytest -q -m "not slow" "${@:-tests}"   # arguments: other test paths, e.g. tests/test_models.py
