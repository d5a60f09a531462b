"""Execute every notebook top to bottom in full mode and save it with its outputs (``make executed``).

The notebooks are committed executed, so a reader on GitHub sees every figure and number before running
anything. Each notebook runs in a fresh kernel, in order (00, 01, ..., 08, then the solutions), from the
``notebooks/`` folder, with ``DPO_TUTORIAL_FAST`` unset; its metadata records where the outputs came from
(machine, date, package and torch versions, seconds) and its first cell says so in one line.

    python scripts/execute_notebooks.py                  # all of them
    python scripts/execute_notebooks.py 04_train_lora    # some (names without .ipynb)

Prints each notebook's wall time and the total; exits non-zero if a notebook fails (the file is then left
as it was).
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from dpo_tutorial.files import atomic

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PROVENANCE = re.compile(r"^\*The outputs below come from .*\*$", re.M)


def machine() -> str:
    """``'AMD EPYC, 2 cores'``: the CPU's model name (from /proc/cpuinfo where there is one) and the core count."""
    name = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        name = found.group(1).strip() if found else name
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def versions() -> dict:
    """The package and torch versions the outputs were made with (read in a child process: this one stays light)."""
    code = "import dpo_tutorial, torch; print(dpo_tutorial.__version__, torch.__version__)"
    package, torch_version = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split()
    return {"dpo_tutorial": package, "torch": torch_version}


def provenance_line(record: dict) -> str:
    """The line under a notebook's title that says where its outputs came from."""
    return (f"*The outputs below come from one full run of this notebook (`make executed`) on {record['machine']}, "
            f"{record['date']}, dpo-tutorial {record['dpo_tutorial']}, torch {record['torch']}; your numbers may "
            f"differ a little (another CPU rounds differently).*")


def stamp(nb, record: dict) -> None:
    """Record the run in the notebook's metadata and as the last line of its first (title) cell."""
    nb.metadata["dpo_tutorial_run"] = record
    first = nb.cells[0]
    text = PROVENANCE.sub("", first.source).rstrip()
    first.source = f"{text}\n\n{provenance_line(record)}"


def execute(path: Path, record: dict) -> float:
    """Run ``path`` in a fresh kernel in full mode and save it executed; return the seconds it took."""
    nb = nbformat.read(str(path), as_version=4)
    stamp(nb, record)
    env_fast = os.environ.pop("DPO_TUTORIAL_FAST", None)
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=3600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        if env_fast is not None:
            os.environ["DPO_TUTORIAL_FAST"] = env_fast
    seconds = time.perf_counter() - start
    nb.metadata["dpo_tutorial_run"]["seconds"] = round(seconds, 1)
    with atomic(path) as tmp:  # a killed run leaves the committed notebook as it was
        nbformat.write(nb, str(tmp))
    return seconds


def main(names: list[str]) -> int:
    """Execute the notebooks named (all when none), the solutions last; print each one's time and the total."""
    os.environ["TQDM_DISABLE"] = "1"  # a progress bar saved mid-way reads as stuck on GitHub; the numbers stay
    paths = sorted(p for p in NOTEBOOKS.glob("*.ipynb") if not names or p.stem in names)
    paths = [p for p in paths if p.stem != "solutions"] + [p for p in paths if p.stem == "solutions"]
    record = {"mode": "full", "machine": machine(), "date": date.today().isoformat(), **versions()}
    total = 0.0
    for path in paths:
        print(f"{path.name} ...", end=" ", flush=True)
        seconds = execute(path, dict(record))
        total += seconds
        print(f"{seconds:.0f} s", flush=True)
    print(f"{len(paths)} notebooks in {total:.0f} s ({total / 60:.1f} min) on {record['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
