"""The one switch that makes notebooks and figure generation fast (for CI): ``DPO_TUTORIAL_FAST=1``.

Every notebook asks :func:`budget` for its step and sample counts instead of hard-coding them, so one
environment variable, read here and nowhere else, scales them all down.
"""
from __future__ import annotations

import os


def fast_mode() -> bool:
    """True when ``DPO_TUTORIAL_FAST`` is set to anything but ``""``, ``0``, ``false`` or ``no``."""
    return os.environ.get("DPO_TUTORIAL_FAST", "").strip().lower() not in ("", "0", "false", "no")


def budget(full, fast):
    """``fast`` under :func:`fast_mode`, else ``full`` (e.g. ``budget(full=300, fast=20)`` training steps)."""
    return fast if fast_mode() else full
