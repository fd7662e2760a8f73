"""Which backend runs an op.

Order of precedence: an explicit ``backend=`` argument > the innermost ``use_backend(...)``
context > the ``TCK_BACKEND`` environment variable > the default for the tensor's device
(CPU tensors: ``cpu``; CUDA tensors: the fastest measured GPU backend that is available).

A backend is a module ``tckernels.backends.<name>`` that meets the interface
``tckernels.backends.Backend``; ``load`` checks it on first use.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Dict, Iterator, List, Optional, Tuple

from tckernels.backends import Backend

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Measured preference per device type (see bench/results/); the first available one wins.
_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
DEVICE_TYPES = tuple(_DEFAULT_ORDER)  # the tensor device types some backend runs on

# A process-wide stack (not thread-local) so torch.compile can trace reads of it.
_stack: List[str] = []


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the tckernels ops inside the block on backend ``name``."""
    _stack.append(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _stack.pop()


_loaded: Dict[str, Backend] = {}


def load(name: str) -> Backend:
    """Backend ``name``: its module imported and checked against the interface, once per process.

    Raises ImportError when the module cannot be imported, TypeError when it does not meet the
    interface (a bug in that backend, so never mistaken for "unavailable")."""
    backend = _loaded.get(name)
    if backend is None:
        backend = Backend.from_module(name, importlib.import_module(f"tckernels.backends.{name}"))
        _loaded[name] = backend
    return backend


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo, which takes
    seconds and would otherwise happen at ``import tckernels``.

    The decorator only sets this attribute, which dynamo reads when it traces a call to ``fn``
    (tests/test_backend.py checks that it still does only that). It cannot be applied lazily:
    the first call may come while dynamo is already tracing, too late to mark the function.
    """
    fn._dynamo_marked_constant = True
    return fn


_reasons: Dict[Tuple[str, str], Optional[str]] = {}


@_assume_constant_result
def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """None when backend ``name`` can run on ``device_type`` tensors, else why not.

    Computed once per process (it imports the backend); torch.compile treats it as a constant.
    """
    key = (name, device_type)
    if key not in _reasons:
        try:
            backend = load(name)
        except ImportError as exc:
            _reasons[key] = f"backend {name!r} cannot be imported: {exc}"
        else:
            if device_type not in backend.devices:
                _reasons[key] = f"backend {name!r} runs on {', '.join(backend.devices)} tensors, not {device_type}"
            else:
                _reasons[key] = backend.unavailable_reason()
    return _reasons[key]


def available_backends(device_type: str) -> List[str]:
    """The backends that can run on tensors of ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {', '.join(map(repr, DEVICE_TYPES))}; got {device_type!r}")
    return [b for b in BACKENDS if unavailable_reason(b, device_type) is None]


def _env_backend() -> Optional[str]:
    name = os.environ.get("TCK_BACKEND")
    return _check_name(name, "the TCK_BACKEND environment variable") if name else None


def resolve(explicit: Optional[str], device_type: str) -> str:
    """Name of the backend to run on ``device_type``; raises if the one asked for cannot run."""
    name = explicit if explicit is not None else (_stack[-1] if _stack else _env_backend())
    if name is not None:
        _check_name(name, "backend")
        why = unavailable_reason(name, device_type)
        if why is not None:
            raise _cannot_run(name, explicit is not None, device_type, why)
        return name
    for candidate in _DEFAULT_ORDER.get(device_type, ("reference",)):
        if unavailable_reason(candidate, device_type) is None:
            return candidate
    return "reference"


def _cannot_run(name: str, explicit: bool, device_type: str, why: str) -> Exception:
    """The error for a backend that was asked for but cannot run: a ValueError when it does not run
    on these tensors' device (bad input), a RuntimeError when this install lacks it (not built,
    triton missing, no GPU)."""
    try:
        devices = load(name).devices
    except ImportError:
        devices = None
    if devices is None or device_type in devices:
        return RuntimeError(f"tckernels: {why}")
    if explicit:
        asked = f"backend {name!r}"
    elif _stack:
        asked = f"backend {name!r} (from use_backend({name!r}))"
    else:
        asked = f"backend {name!r} (from TCK_BACKEND={name})"
    usable = [b for b in BACKENDS if unavailable_reason(b, device_type) is None]
    fix = f" (backends for {device_type} tensors: {', '.join(usable)})" if usable else ""
    return ValueError(f"{asked} runs on {', '.join(devices)} tensors; these are on {device_type}{fix}")
