"""Backends: ``reference`` (pure torch, the specification), ``cpu``, ``cuda``, ``triton``.

A backend is a module of this package. ``Backend`` below is the interface such a module must
meet; ``tckernels._backend.load`` checks each module against it when the module is first loaded,
so a backend with a missing or ill-typed member fails there, naming itself and the member,
rather than in the middle of an op. Signatures and conventions are those of
``tckernels.backends.reference``.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


def _fn(*params: str):
    """A function every backend defines; the ops call it with these positional arguments."""
    return field(metadata={"params": params})


def _fused(*params: str):
    """An optional fused op: None where the ops compose it from the required functions."""
    return field(default=None, metadata={"params": params})


@dataclass(frozen=True)
class Backend:
    """What tckernels uses of a backend module: its attributes of the same names (``DEVICES`` for
    ``devices``). The ops call each function with the positional arguments named in its field."""

    name: str
    devices: Tuple[str, ...]  # the tensor device types it runs on
    unavailable_reason: Callable[[], Optional[str]] = _fn()  # None when usable, else why not
    topk_relu: Callable[..., Tuple[Tensor, Tensor]] = _fn("pre", "k", "bias")
    gather_matmul: Callable[..., Tensor] = _fn("values", "indices", "W", "bias")
    gather_dot: Callable[..., Tensor] = _fn("G", "indices", "W")
    scatter_matmul: Callable[..., Tensor] = _fn("values", "indices", "G", "n_rows", "deterministic")
    # GEMM + bias + selection in one pass, without writing the [M, N] pre-activations
    encode_topk: Optional[Callable[..., Tuple[Tensor, Tensor]]] = _fused("x", "W", "b", "k")
    encode_relu: Optional[Callable[..., Tuple[Tensor, Tensor, Tensor]]] = _fused("x", "W", "b", "k_max", "threshold")

    def __post_init__(self):
        if not (isinstance(self.devices, tuple) and self.devices and all(map(_is_device_type, self.devices))):
            self._fail(f"DEVICES must be a non-empty tuple of device types such as ('cpu', 'cuda'), "
                       f"got {self.devices!r}")
        for f in _functions():
            fn = getattr(self, f.name)
            if fn is None and f.default is None:  # an optional op the backend does not have
                continue
            params = f.metadata["params"]
            call = f"{f.name}({', '.join(params)})"
            if not callable(fn):
                self._fail(f"{f.name} must be a function {call}, got {type(fn).__name__}")
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):  # no signature to check (a builtin, say)
                continue
            try:
                sig.bind(*params)
            except TypeError:
                self._fail(f"{f.name} must accept the call {call}, but its signature is {f.name}{sig}")

    def _fail(self, message: str):
        raise TypeError(f"tckernels backend {self.name!r}: {message}")

    @classmethod
    def from_module(cls, name: str, module: ModuleType) -> "Backend":
        """The interface of ``module``, checked; raises TypeError naming what is missing or wrong."""
        missing = [] if hasattr(module, "DEVICES") else ["DEVICES"]
        missing += [f"{f.name}({', '.join(f.metadata['params'])})" for f in _functions()
                    if f.default is dataclasses.MISSING and not hasattr(module, f.name)]
        if missing:
            raise TypeError(f"tckernels backend {name!r}: module {module.__name__} does not define "
                            f"{', '.join(missing)}, which every backend must (see tckernels.backends.reference)")
        present = {f.name: getattr(module, f.name) for f in _functions() if hasattr(module, f.name)}
        return cls(name=name, devices=module.DEVICES, **present)


def _is_device_type(d) -> bool:
    try:
        return isinstance(d, str) and torch.device(d).type == d
    except RuntimeError:  # not a device type torch knows
        return False


def _functions():
    return [f for f in dataclasses.fields(Backend) if "params" in f.metadata]

