"""How many CPU threads torch uses: one place for the rule and for setting it (and for the CPU's name, which the
scripts that measure a time or a result print beside it).

Several torch processes each using every core made a CPU step 10-50x slower in our measurements, so each
of ``world_size`` processes gets its share. ``torch.set_num_threads`` also turns MKL's dynamic threading
off, which made CPU attention ~3x slower in a profile of the toy's step; it is therefore called only when
the count changes, unless a caller needs the same float rounding on every run (figures, the toy's asset
scripts), which fixed threads give.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def threads_per_process(num_threads: int | None, world_size: int = 1) -> int:
    """``num_threads`` when given, else ``OMP_NUM_THREADS`` (its first level, e.g. 4 of ``"4,2"``; a value that is
    not a positive count is ignored), else the machine's cores divided by ``world_size``."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return num_threads or (int(first) if first.isdigit() else 0) or max(1, (os.cpu_count() or 1) // world_size)


def use_threads(threads: int, deterministic: bool = False) -> None:
    """Run torch on ``threads`` CPU threads. ``deterministic``: call ``torch.set_num_threads`` even when the count
    is already right, which switches MKL's load-dependent dynamic threading off (same rounding every run)."""
    if deterministic or torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s, e.g. ``'AMD EPYC'``), else ``platform.processor()``: what the
    scripts that measure times and results print beside them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
