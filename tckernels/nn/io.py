"""The tckernels transcoder format: a directory with ``model.safetensors`` and ``config.json``.

``config.json``::

    {"format": "tckernels.transcoder", "format_version": 1, "tckernels_version": "...",
     "dtype": "float32", "config": {<TranscoderConfig fields>}}

``model.safetensors`` holds the module's ``state_dict()`` (parameters and persistent buffers:
the BatchTopK threshold and the dead-feature counter) under the same names, row per feature
(``W_enc [N, d_in]``, ``W_dec [N, d_out]``). safetensors stores raw bytes, so a save/load
round trip is bit-exact. Nothing is unpickled.

Loading checks everything against the config before any tensor is used: a missing or
unexpected key, a wrong shape or dtype, a truncated or corrupt file, or a bad config raise
:class:`TranscoderFormatError` naming the file (and the key).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from tckernels.nn.errors import FormatError
from tckernels.nn.transcoder import Transcoder, TranscoderConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "TranscoderFormatError",
    "save_transcoder",
    "load_transcoder",
    "read_safetensors",
    "write_safetensors",
]

FORMAT = "tckernels.transcoder"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

PathLike = Union[str, os.PathLike]


class TranscoderFormatError(FormatError):
    """A checkpoint file is missing, truncated, corrupt or does not match its config."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, file: Path) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise TranscoderFormatError(f"{file}: 'dtype' must name a torch floating dtype, got {name!r}")
    return dt


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_safetensors(path: PathLike, tensors: Dict[str, Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors (moved to CPU, made contiguous) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda p: save_file(cpu, str(p), metadata=metadata or {"format": "pt"}))


def read_safetensors(path: PathLike, device=None) -> Dict[str, Tensor]:
    """Read every tensor of a safetensors file; a missing, truncated or corrupt file raises
    :class:`TranscoderFormatError` naming the file (and the key when one tensor is at fault)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TranscoderFormatError(f"{path}: file not found")
    out: Dict[str, Tensor] = {}
    key = None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    except TranscoderFormatError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        where = f" (reading key {key!r})" if key is not None else ""
        raise TranscoderFormatError(
            f"{path}: not a readable safetensors file{where}; it may be truncated or corrupt: {exc}"
        ) from exc
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def save_transcoder(model: Transcoder, path: PathLike) -> None:
    """Save ``model`` to directory ``path`` (created if needed) as ``model.safetensors`` + ``config.json``."""
    if not isinstance(model, Transcoder):
        raise TypeError(f"save_transcoder expects a tckernels.nn.Transcoder, got {type(model).__name__}")
    import tckernels

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tckernels_version": getattr(tckernels, "__version__", "unknown"),
        "dtype": _dtype_name(model.W_enc.dtype),
        "config": dataclasses.asdict(model.config),
    }
    write_safetensors(path / WEIGHTS_NAME, model.state_dict(), metadata={"format": "pt", "tckernels": FORMAT})
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _atomic_write(path / CONFIG_NAME, lambda p: p.write_text(text))


def _read_config(path: Path) -> tuple:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise TranscoderFormatError(f"{file}: file not found (is {path} a saved tckernels transcoder?)")
    try:
        meta = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise TranscoderFormatError(f"{file}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise TranscoderFormatError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    for key in ("format", "format_version", "config", "dtype"):
        if key not in meta:
            raise TranscoderFormatError(f"{file}: missing key {key!r}")
    if meta["format"] != FORMAT:
        raise TranscoderFormatError(f"{file}: key 'format' is {meta['format']!r}, expected {FORMAT!r}")
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise TranscoderFormatError(f"{file}: key 'format_version' must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise TranscoderFormatError(
            f"{file}: format_version {version} is newer than this tckernels reads ({FORMAT_VERSION}); upgrade tckernels"
        )
    raw = meta["config"]
    if not isinstance(raw, dict):
        raise TranscoderFormatError(f"{file}: key 'config' must be an object")
    fields = {f.name for f in dataclasses.fields(TranscoderConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise TranscoderFormatError(f"{file}: unknown config key(s) {unknown}")
    try:
        cfg = TranscoderConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise TranscoderFormatError(f"{file}: invalid config: {exc}") from exc
    return cfg, _dtype_from_name(meta["dtype"], file)


def load_transcoder(path: PathLike, dtype: Optional[torch.dtype] = None, device=None) -> Transcoder:
    """Load a transcoder saved by :func:`save_transcoder`.

    The tensors are loaded bit-exactly in their saved dtype; ``dtype`` casts the floating-point
    parameters afterwards (integer buffers keep theirs), ``device`` moves everything.
    """
    path = Path(path)
    if not path.is_dir():
        raise TranscoderFormatError(f"{path}: not a directory (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)")
    cfg, saved_dtype = _read_config(path)
    file = path / WEIGHTS_NAME
    tensors = read_safetensors(file)

    with torch.device("meta"):
        model = Transcoder.from_config(cfg, dtype=saved_dtype)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TranscoderFormatError(f"{file}: missing key {missing[0]!r}{more}")
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise TranscoderFormatError(f"{file}: unexpected key {unexpected[0]!r} for this config")
    for key, ref in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise TranscoderFormatError(
                f"{file}: key {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} from {CONFIG_NAME}"
            )
        if t.dtype != ref.dtype and not (ref.is_floating_point() and t.is_floating_point() and key == "threshold"):
            raise TranscoderFormatError(
                f"{file}: key {key!r} has dtype {_dtype_name(t.dtype)}, expected {_dtype_name(ref.dtype)}"
            )
    model.load_state_dict(tensors, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device=device)
    return model
