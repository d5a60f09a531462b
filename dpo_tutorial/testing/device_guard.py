"""A CPU-only check for a missing ``.to(device)``: the CPU plays two devices, "host" and "device".

On a CPU every tensor is on the same device, so code that forgets to move a batch to the GPU runs
fine on CPU and crashes on the first CUDA session. :class:`DeviceGuard` (a ``TorchFunctionMode``)
tags every tensor it sees:

- **host**: made without a device (``torch.tensor(...)``, ``torch.from_numpy``, a tokenizer's
  ``return_tensors="pt"``, the data pipeline), brought back with ``.cpu()`` / ``.to("cpu")``, or never
  seen by the guard;
- **device**: the result of ``.to(<device>)`` / ``.cuda()`` (a module's ``.to(DEVICE)`` moves its
  parameters this way) or of a factory call given ``device=`` (e.g. ``device=DEVICE``);
- results of any other op inherit **device** when an input is on it.

An op that mixes a host tensor and a device tensor raises :class:`CrossDeviceError`, as CUDA would.
As on CUDA, 0-dim tensors mix freely, indexing may use host indices, and ``copy_`` copies across.
Both devices are the CPU, so the rule reads the *spelling* of a move: the string ``"cpu"`` and
``.cpu()`` mean host; a ``torch.device`` (``param.device``, or ``DEVICE`` after ``Module.to`` parsed
it) and the notebooks' ``DEVICE`` under the guard (a :class:`GuardDevice`, see :func:`install`) mean
device.

Use: ``with DeviceGuard(): ...`` or :func:`install` (an IPython startup file does, in the tests).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

HOST, DEVICE = "host", "device"
_TAG = "_dpo_device_tag"
_MIXABLE = {"__getitem__", "__setitem__", "copy_", "index_put_", "index_put", "__repr__", "__format__",
            "__str__", "numpy", "tolist", "item", "__len__", "__bool__", "__iter__", "__contains__"}
_TO_HOST = {"cpu", "numpy", "tolist"}


class CrossDeviceError(RuntimeError):
    """A host tensor met a device tensor in one op: on a GPU this line fails."""


class GuardDevice(str):
    """The notebooks' ``DEVICE`` under the guard: the string ``"cpu"`` (torch runs it on the CPU), but a
    different object, so ``.to(DEVICE)`` is told apart from ``.to("cpu")``."""


def tag_of(t: torch.Tensor) -> str:
    """``"device"`` or ``"host"`` (also for tensors the guard never saw made, e.g. ``torch.from_numpy``'s)."""
    return getattr(t, _TAG, HOST)


def _set_tag(out, tag: str) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _TAG, tag)
            except (AttributeError, RuntimeError):  # some tensor subclasses refuse attributes
                pass


def _device_arg(func_name: str, args, kwargs):
    """The device an explicit transfer or factory names, or ``None`` when it names none."""
    if "device" in kwargs and kwargs["device"] is not None:
        return kwargs["device"]
    if func_name == "to":
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                return a
            if isinstance(a, torch.Tensor):  # .to(other): other's tag decides
                return a
    return None


def _is_host_name(device) -> bool:
    """A plain ``"cpu"`` string means host; ``GuardDevice`` and ``torch.device`` objects (``param.device``,
    and what ``Module.to(DEVICE)`` turns ``DEVICE`` into) mean device; a tensor means its own tag."""
    if isinstance(device, GuardDevice) or isinstance(device, torch.device):
        return False
    if isinstance(device, torch.Tensor):
        return tag_of(device) != DEVICE
    return torch.device(device).type == "cpu"


class DeviceGuard(TorchFunctionMode):
    """Raise :class:`CrossDeviceError` on any op that mixes host and device tensors (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__set__":  # t.data = x: t now lives where x lives
            if len(args) > 1 and isinstance(args[1], torch.Tensor):
                _set_tag(args[0], tag_of(args[1]))
            return func(*args, **kwargs)
        if name not in _MIXABLE and name != "__get__":
            self._check(name, args, kwargs)
        out = func(*args, **kwargs)
        if name in ("__getitem__", "__get__"):  # a slice or t.data lives where t lives
            if isinstance(args[0], torch.Tensor):
                _set_tag(out, tag_of(args[0]))
            return out
        if name in _MIXABLE:
            return out
        _set_tag(out, self._result_tag(name, args, kwargs))
        return out

    @staticmethod
    def _check(name: str, args, kwargs) -> None:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        tags = {tag_of(t) for t in tensors}
        if HOST in tags and DEVICE in tags:
            shapes = [tuple(t.shape) + (tag_of(t),) for t in tensors]
            raise CrossDeviceError(f"{name}: host and device tensors in one op {shapes}; "
                                   "expected every input on the model's device (a missing .to(DEVICE)?)")

    @staticmethod
    def _result_tag(name: str, args, kwargs) -> str:
        """The tag of an op's result: a named move decides; else device if any input is on it, else host."""
        if name in _TO_HOST:
            return HOST
        if name in ("to", "cuda") or "device" in kwargs:
            target = "cuda" if name == "cuda" else _device_arg(name, args, kwargs)
            if target is not None:
                return HOST if _is_host_name(target) else DEVICE
        on_device = any(isinstance(t, torch.Tensor) and tag_of(t) == DEVICE for t in tree_flatten((args, kwargs))[0])
        return DEVICE if on_device else HOST


def install() -> GuardDevice:
    """Turn the guard on for the rest of this process; return the ``DEVICE`` the notebooks should use.

    The notebooks' setup cell reads ``DEVICE`` from :func:`dpo_tutorial.notebook_env.notebook_device`, which
    returns this value once the guard is installed (:func:`dpo_tutorial.notebook_env.set_device_override`).
    """
    from ..notebook_env import set_device_override

    guard = DeviceGuard()
    guard.__enter__()
    device = GuardDevice("cpu")
    set_device_override(device)
    return device
