"""Reading checkpoint files without running code from them, and checking what was read.

Every format module builds on these: a safe ``torch.load``, the one safetensors reader, and key,
shape and copy helpers whose errors are :class:`~tckernels.nn.errors.FormatError` naming the file
and the key.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from tckernels.nn.errors import FormatError, MissingKeyError

__all__ = [
    "PickledObject",
    "torch_load",
    "get_key",
    "check_shape",
    "read_safetensors",
    "safetensors_keys",
    "assign_",
]


class PickledObject:
    """Inert stand-in for an object of a class that torch's ``weights_only`` unpickler does not allow.

    It records what the pickle would have passed to the class -- constructor arguments in
    ``_args``, and the state (usually the instance ``__dict__``) as attributes -- and runs nothing.
    ``_pickled_class`` is the class's ``module.name`` in the file.
    """

    _pickled_class = "?"

    def __init__(self, *args, **kwargs):
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state):
        slots = None
        if isinstance(state, tuple) and len(state) == 2 and (state[1] is None or isinstance(state[1], dict)):
            state, slots = state
        if isinstance(state, dict):
            for k, v in state.items():
                if isinstance(k, str):
                    object.__setattr__(self, k, v)
        elif state is not None:
            object.__setattr__(self, "_state", state)
        for k, v in (slots or {}).items():
            if isinstance(k, str):
                object.__setattr__(self, k, v)

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"PickledObject[{self._pickled_class}]({fields})"


def _placeholder_class(name: str) -> type:
    module, _, qual = name.rpartition(".")
    return type(qual or name, (PickledObject,), {"__module__": module or "?", "_pickled_class": name})


def torch_load(path, *, trust_pickle: bool = False, map_location="cpu") -> Any:
    """``torch.load`` that never runs code from the file unless ``trust_pickle=True``.

    First ``weights_only=True``. If the file references classes torch does not allowlist (for
    example a config dataclass defined in a training script), those are loaded -- still with
    ``weights_only=True`` -- as inert :class:`PickledObject` placeholders: the file's class names are
    allowlisted under those names but bound to placeholder classes, so nothing from the file is
    imported or called. ``trust_pickle=True`` loads with ``weights_only=False`` instead, which
    imports and calls whatever the file names (only for files from a source you trust).
    Errors (missing, truncated or corrupt files) become :class:`FormatError` naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if trust_pickle:
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001 - every failure names the file
            raise FormatError(f"could not be loaded with weights_only=False ({type(e).__name__}: {e})", path=path) from e
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first_error = e
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"not a readable torch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}", path=path) from e
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001
        raise FormatError(
            f"torch.load(weights_only=True) failed and the pickle could not be inspected: {first_error}", path=path
        ) from e
    stubs = [(_placeholder_class(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise FormatError(
            "the checkpoint pickles objects that cannot be rebuilt safely (classes "
            f"{', '.join(names) or '?'}): {type(e).__name__}: {e}. Loading it needs weights_only=False, "
            "which runs code named in the file; pass trust_pickle=True only if you trust its source",
            path=path,
        ) from e


def get_key(mapping: Mapping, key: str, path=None, *, alternatives: Sequence[str] = ()) -> Any:
    """``mapping[key]`` (or the first alternative present), else :class:`MissingKeyError`."""
    for k in (key, *alternatives):
        if k in mapping:
            return mapping[k]
    raise MissingKeyError(f"missing (file has keys: {_key_list(mapping)})", path=path, key=key)


def _key_list(mapping: Mapping, limit: int = 12) -> str:
    keys = [str(k) for k in mapping.keys()]
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_shape(t: Any, shape: Tuple[int, ...], path=None, key: Optional[str] = None, what: str = "") -> Tensor:
    """``t`` must be a floating tensor of exactly ``shape``; else :class:`FormatError`."""
    if not isinstance(t, Tensor):
        raise FormatError(f"expected a tensor, got {type(t).__name__}", path=path, key=key)
    if not t.is_floating_point():
        raise FormatError(f"expected a floating-point tensor, got dtype {t.dtype}", path=path, key=key)
    if tuple(t.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise FormatError(f"has shape {tuple(t.shape)}, expected {tuple(shape)}{extra}", path=path, key=key)
    return t


def read_safetensors(path, keys: Optional[Iterable[str]] = None, *, device: str = "cpu") -> dict:
    """Tensors of a ``.safetensors`` file (only ``keys`` when given).

    A missing file raises ``FileNotFoundError``; a missing key :class:`MissingKeyError`; a truncated
    or corrupt file :class:`FormatError` naming the file, and the key when one tensor is at fault.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    key = None  # the tensor being read, for the error message
    try:
        with safe_open(path, framework="pt", device=device) as f:
            available = set(f.keys())
            wanted = list(available) if keys is None else list(keys)
            out = {}
            for key in wanted:
                if key not in available:
                    raise MissingKeyError(f"missing (file has keys: {', '.join(sorted(available)[:12])})", path=path, key=key)
                out[key] = f.get_tensor(key)
            return out
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise FormatError(
            f"not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {e}", path=path, key=key
        ) from e


def safetensors_keys(path) -> list:
    """The tensor names of a ``.safetensors`` file, read from its header only."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {e}", path=path) from e


def assign_(param: Tensor, value: Tensor) -> None:
    """Copy ``value`` into a parameter in place, bit-exactly (same dtype) or cast to its dtype."""
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))
