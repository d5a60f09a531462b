"""Execute every notebook top to bottom in full mode and save it with its outputs (``make executed``).

The notebooks are committed executed, so a reader on GitHub sees every figure and number before running
anything. Each notebook runs in a fresh kernel, in order (00, 01, ..., 08, then the solutions), from the
``notebooks/`` folder, with ``DPO_TUTORIAL_FAST`` unset; its metadata records where the outputs came from
(machine, date, package and torch versions, seconds) and its first cell says so in one line.

    python scripts/execute_notebooks.py                  # all of them
    python scripts/execute_notebooks.py 04_train_lora    # some (names without .ipynb)
    python scripts/execute_notebooks.py --readme README.md   # all, and their times into the README

Prints each notebook's wall time and the total; exits non-zero if a notebook fails (the file is then left
as it was). ``--readme`` replaces the README's ``notebook-times`` block with those times, after a run of all
of them, and says which runs ``runs/`` already held: a notebook that finds its runs there reuses them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from dpo_tutorial.files import atomic, replace_block
from dpo_tutorial.threads import cpu_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RUNS = ROOT / "runs"
PROVENANCE = re.compile(r"^\*The outputs below come from .*\*$", re.M)


def machine() -> str:
    """``'AMD EPYC, 2 cores'``: the CPU's model name and the core count."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


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


def is_progress_bar(output: dict) -> bool:
    """A tqdm bar shown as a live widget (``tqdm.auto`` in a kernel, which ignores ``TQDM_DISABLE``): saved, only
    its first frame remains, a bar stuck at 0%."""
    data = output.get("data", {})
    text = "".join(data.get("text/plain", ""))  # "x:  0%|   | 0/30 [00:00<?, ?it/s]", "x: 0 examples [00:00, ? …"
    return ("application/vnd.jupyter.widget-view+json" in data
            and re.search(r"\d+%\||\[\d\d:\d\d[<,]", text) is not None)


def drop_progress_bars(nb) -> None:
    """Remove every progress-bar widget from the notebook's outputs (the numbers the cells print stay), and from
    the saved widget state every model that no remaining output shows (a bar's models, its layout and style)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not is_progress_bar(o)]
    widgets = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json")
    if not widgets:
        return
    view = "application/vnd.jupyter.widget-view+json"
    shown = [o["data"][view]["model_id"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if view in o.get("data", {})]
    keep, todo = set(), list(shown)
    while todo:  # a model refers to the models it holds as "IPY_MODEL_<id>"
        model = todo.pop()
        if model in keep or model not in widgets["state"]:
            continue
        keep.add(model)
        todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(widgets["state"][model]))
    widgets["state"] = {k: v for k, v in widgets["state"].items() if k in keep}
    if not keep:
        del nb.metadata["widgets"]


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
    drop_progress_bars(nb)
    with atomic(path) as tmp:  # a killed run leaves the committed notebook as it was
        nbformat.write(nb, str(tmp))
    return seconds


def times_block(record: dict, seconds: dict[str, float], runs_before: list[str]) -> str:
    """The README's notebook-times block: the total, the machine, what ``runs/`` held, one column per notebook."""
    held = ", ".join(f"`{name}`" for name in runs_before) or "nothing"
    names = [name if name == "solutions" else name[:2] for name in seconds]
    return (f"Time to run them all in full mode (`make executed`, {record['machine']}, {record['date']}): "
            f"{sum(seconds.values()):.0f} s, starting with `runs/` holding {held}.\n\n"
            f"| {' | '.join(names)} |\n|{'---|' * len(names)}\n"
            f"| {' | '.join(f'{s:.0f} s' for s in seconds.values())} |")


def main(argv: list[str] | None = None) -> int:
    """Execute the notebooks named (all when none), the solutions last; print each one's time and the total."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run, without .ipynb (default: all)")
    parser.add_argument("--readme", help="after a run of all of them, write their times into this file's block")
    args = parser.parse_args(argv)
    if args.readme and args.names:
        parser.error("--readme records a run of every notebook: name none")
    os.environ["TQDM_DISABLE"] = "1"  # a progress bar saved mid-way reads as stuck on GitHub (widgets: see above)
    paths = sorted(p for p in NOTEBOOKS.glob("*.ipynb") if not args.names or p.stem in args.names)
    paths = [p for p in paths if p.stem != "solutions"] + [p for p in paths if p.stem == "solutions"]
    record = {"mode": "full", "machine": machine(), "date": date.today().isoformat(), **versions()}
    runs_before = sorted(p.name for p in RUNS.iterdir() if p.is_dir() and p.name != "fast") if RUNS.is_dir() else []
    seconds = {}
    for path in paths:
        print(f"{path.name} ...", end=" ", flush=True)
        seconds[path.stem] = round(execute(path, dict(record)), 1)   # as the notebook's metadata records it
        print(f"{seconds[path.stem]:.0f} s", flush=True)
    total = sum(seconds.values())
    print(f"{len(paths)} notebooks in {total:.0f} s ({total / 60:.1f} min) on {record['machine']}")
    if args.readme:
        replace_block(args.readme, "notebook-times", times_block(record, seconds, runs_before))
        print(f"wrote their times into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
