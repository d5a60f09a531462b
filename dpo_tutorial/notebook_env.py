"""Environment switches, each read here and nowhere else.

``DPO_TUTORIAL_FAST=1``: the one switch that makes notebooks and figure generation fast (for CI).

Every notebook asks :func:`budget` for its step and sample counts instead of hard-coding them, so one
environment variable scales them all down.

``DPO_TUTORIAL_PRESET``, ``DPO_TUTORIAL_OVERRIDES``, ``DPO_TUTORIAL_PICKSCORE``: which preset the notebooks
run and where its model, data and scorer come from (:func:`notebook_config`, :func:`pickscore_source`).

``DPO_TUTORIAL_RUNS``: the folder that holds the notebooks' run folders (e.g. ``runs/sd15``), such as a
mounted Google Drive folder, so that a recycled Colab VM resumes where it stopped (:func:`notebook_config`).
"""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch

from .config import ConfigError, get_preset
from .pickscore import PICKSCORE_MODEL, PICKSCORE_PROCESSOR


def fast_mode() -> bool:
    """True when ``DPO_TUTORIAL_FAST`` is set to anything but ``""``, ``0``, ``false`` or ``no``."""
    return os.environ.get("DPO_TUTORIAL_FAST", "").strip().lower() not in ("", "0", "false", "no")


def budget(full, fast):
    """``fast`` under :func:`fast_mode`, else ``full`` (e.g. ``budget(full=300, fast=20)`` training steps)."""
    return fast if fast_mode() else full


# ------------------------------------------------------------------ what the notebooks run on
PRESET_ENV = "DPO_TUTORIAL_PRESET"
OVERRIDES_ENV = "DPO_TUTORIAL_OVERRIDES"
PICKSCORE_ENV = "DPO_TUTORIAL_PICKSCORE"
RUNS_ENV = "DPO_TUTORIAL_RUNS"
NOTEBOOK_PRESETS = ("toy", "sd15")


def notebook_preset() -> str:
    """The preset every notebook runs: ``DPO_TUTORIAL_PRESET`` when set, else ``sd15`` on a CUDA GPU and
    ``toy`` elsewhere."""
    name = os.environ.get(PRESET_ENV, "").strip() or ("sd15" if torch.cuda.is_available() else "toy")
    if name not in NOTEBOOK_PRESETS:
        raise ConfigError(f"{PRESET_ENV}={name!r} is not a notebook preset; expected one of {NOTEBOOK_PRESETS} "
                          "(the notebooks use SD 1.x pipelines; train SDXL with `dpo-tutorial train --preset sdxl`)")
    return name


def notebook_overrides() -> dict:
    """Config fields that ``DPO_TUTORIAL_OVERRIDES`` (a JSON object) changes in every notebook's preset.

    E.g. a copy of SD 1.5 on Google Drive: ``DPO_TUTORIAL_OVERRIDES='{"pretrained": "/content/drive/sd15"}'``.
    The tests use it to run the ``sd15`` cells on CPU against local stand-ins of the same format.
    """
    text = os.environ.get(OVERRIDES_ENV, "").strip()
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{OVERRIDES_ENV} is not valid JSON ({err}): {text[:200]!r}") from err
    if not isinstance(overrides, dict):
        raise ConfigError(f"{OVERRIDES_ENV} must be a JSON object of config fields, got {text[:200]!r}")
    return overrides


_DEVICE_OVERRIDE = None  # set by the tests' device guard (dpo_tutorial.testing.device_guard.install)


def set_device_override(device) -> None:
    """Make :func:`notebook_device` return ``device`` for the rest of this process (``None``: back to the rule)."""
    global _DEVICE_OVERRIDE
    _DEVICE_OVERRIDE = device


def notebook_device():
    """Where the notebooks put their models: ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``.

    Under the tests' device guard (:mod:`dpo_tutorial.testing.device_guard`) it is the guard's stand-in device,
    so a tensor a cell forgets to move fails there as it would on a GPU.
    """
    return _DEVICE_OVERRIDE or ("cuda" if torch.cuda.is_available() else "cpu")


def notebook_dtype(device):
    """The frozen weights' dtype on ``device``: float16 on a GPU (half the memory), float32 on a CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def runs_folder(output_dir: str) -> str:
    """``output_dir`` moved under ``DPO_TUTORIAL_RUNS`` when that is set and the path is relative
    (``runs/sd15`` -> ``$DPO_TUTORIAL_RUNS/sd15``); otherwise unchanged."""
    root = os.environ.get(RUNS_ENV, "").strip()
    path = Path(output_dir)
    if not root or path.is_absolute():
        return output_dir
    parts = path.parts[1:] if path.parts[:1] == ("runs",) else path.parts
    return str(Path(root).expanduser().joinpath(*parts))


def checkout_root(start: str | None = None):
    """The dpo-tutorial source checkout holding ``start`` (default: the working directory), or None.

    It is the nearest of ``start`` and its parents with both ``pyproject.toml`` and ``dpo_tutorial/``, the
    rule the notebooks' setup cell uses to find a checkout to install from.
    """
    here = Path(start or os.getcwd()).resolve()
    return next((p for p in (here, *here.parents)
                 if (p / "pyproject.toml").is_file() and (p / "dpo_tutorial").is_dir()), None)


def notebook_folder(name: str) -> str:
    """Where the notebooks keep the output folder ``name`` (a run, a label set): ``runs/<name>`` at the checkout's
    root (``make train``'s ``runs/toy`` included), ``$DPO_TUTORIAL_RUNS/<name>`` when that is set, ``runs/<name>``
    outside a checkout. Fast mode keeps its own ``runs/fast/<name>``: a short CI-sized run never lands where a
    full one looks, and the reverse."""
    relative = Path("runs", "fast", name) if fast_mode() else Path("runs", name)
    root = checkout_root()
    if root is None or os.environ.get(RUNS_ENV, "").strip():
        return runs_folder(str(relative))
    return str(root / relative)


def toy_run_dir(name: str = "toy") -> str:
    """The folder of the notebooks' shared toy run ``name`` (``toy``: DPO, ``toy-sft``: the SFT baseline).

    In full mode the DPO run *is* ``make train``'s: ``runs/toy`` at the checkout's root, so a learner who ran it
    waits for no training in the notebooks (:func:`dpo_tutorial.train.train_or_reuse` reuses a finished run of
    the same settings, and trains one that is missing into the same place); see :func:`notebook_folder`.
    """
    return notebook_folder(name)


def shared_toy_config():
    """The one config of the notebooks' shared toy run (04, 05, 06, 07 and the solutions all build it here).

    The toy preset (with ``DPO_TUTORIAL_OVERRIDES`` when the notebooks run the toy preset), in
    :func:`toy_run_dir`, without the closing sample grid: the settings of ``make train``'s run, which it
    therefore reuses. Fast mode: 10 steps of 8 pairs, and the closing held-out check on 16 pairs (else up to 300:
    all 298 non-tie validation pairs).
    """
    overrides = notebook_overrides() if notebook_preset() == "toy" else {}
    config = get_preset("toy", **overrides)
    return config.replace(max_steps=budget(config.max_steps, 10), batch_size=budget(config.batch_size, 8),
                          output_dir=toy_run_dir(), sample_grid=False, heldout_pairs=budget(config.heldout_pairs, 16))


def notebook_config(**fields):
    """The notebook preset with ``DPO_TUTORIAL_OVERRIDES`` applied, then the notebook's own ``fields``
    (a notebook that trains into a fresh temporary folder keeps doing so). A relative ``output_dir`` such as the
    preset's ``runs/sd15`` goes where :func:`notebook_folder` keeps it."""
    config = get_preset(notebook_preset(), **{**notebook_overrides(), **fields})
    out = Path(config.output_dir)
    if out.is_absolute():
        return config
    return config.replace(output_dir=notebook_folder(str(Path(*out.parts[1:]) if out.parts[:1] == ("runs",) else out)))


def notebook_setup():
    """``(PRESET, DEVICE, DTYPE)``, the three names every notebook starts with (:func:`notebook_preset`,
    :func:`notebook_device`, :func:`notebook_dtype`), printed with the mode the counts follow.

    It also freezes the garbage collector's view of everything imported so far (``gc.freeze``): those objects
    live as long as the kernel, and without it Python's final collection over them makes every kernel take
    about 2 s to shut down.
    """
    gc.freeze()
    preset, device = notebook_preset(), notebook_device()
    mode = "fast (small counts, for tests)" if fast_mode() else "full"
    print(f"preset: {preset} | device: {device} | mode: {mode}")
    return preset, device, notebook_dtype(device)


def pickscore_source() -> dict:
    """Where PickScore loads from: the hub ids, or ``DPO_TUTORIAL_PICKSCORE`` (one local folder holding a
    PickScore-format model and processor, e.g. :func:`dpo_tutorial.testing.fixtures.build_tiny_pickscore`)."""
    folder = os.environ.get(PICKSCORE_ENV, "").strip()
    return {"model": folder, "processor": folder} if folder else {"model": PICKSCORE_MODEL,
                                                                  "processor": PICKSCORE_PROCESSOR}


def claim(holds: bool, statement: str, full_size: bool = False) -> None:
    """Check a claim the notebook's text makes, where it makes it: print ``✓ statement`` when ``holds``.

    A claim that fails raises ``AssertionError`` naming it. ``full_size=True`` marks a claim about the numbers of a
    full-size run (a win-rate, what a trained model does): fast mode's short runs and small counts cannot show it,
    so there a failed one prints that it was not checked. Every other claim (an identity, a shape, a formula
    against the package) is checked in both modes.
    """
    if holds:
        print(f"✓ {statement}")
    elif fast_mode() and full_size:
        print(f"(fast mode, small counts: not checked) {statement}")
    else:
        raise AssertionError(f"the notebook claims: {statement}; this run does not show it")


def check_exercise(yours, reference, *cases, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    """Compare your function with the package's on each case (a tuple of arguments): ``✓`` per case, a message while
    yours still raises ``NotImplementedError``, ``AssertionError`` showing both results when they differ. Returns
    True when every case matched."""
    for args in cases:
        try:
            got = yours(*args)
        except NotImplementedError:
            print("not written yet: fill in the function above and run these two cells again (answers: solutions.ipynb)")
            return False
        want = reference(*args)
        torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                                   rtol=rtol, atol=atol, msg=lambda m: f"yours {got!r} vs the package {want!r}: {m}")
    print(f"✓ all {len(cases)} cases match the package")
    return True
