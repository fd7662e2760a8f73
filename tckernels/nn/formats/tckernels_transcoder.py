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
:class:`~tckernels.nn.errors.FormatError` naming the file (and the key).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from tckernels._version import __version__
from tckernels.nn.errors import FormatError
from tckernels.nn.formats.reading import read_safetensors
from tckernels.nn.transcoder import Transcoder, TranscoderConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "save_transcoder",
    "load_transcoder",
    "write_safetensors",
]

FORMAT = "tckernels.transcoder"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

PathLike = Union[str, os.PathLike]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str, file: Path) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise FormatError(f"'dtype' must name a torch floating dtype, got {name!r}", path=file)
    return dt


def _atomic_write(path: Path, write) -> None:
    # write beside the target, then rename: an interrupted save leaves the old file intact
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_safetensors(path: PathLike, tensors: Dict[str, Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors (moved to CPU, made contiguous) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda p: save_file(cpu, str(p), metadata=metadata or {"format": "pt"}))


def save_transcoder(model: Transcoder, path: PathLike) -> None:
    """Save ``model`` to directory ``path`` (created if needed) as ``model.safetensors`` + ``config.json``."""
    if not isinstance(model, Transcoder):
        raise TypeError(f"save_transcoder expects a tckernels.nn.Transcoder, got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tckernels_version": __version__,
        "dtype": _dtype_name(model.W_enc.dtype),
        "config": dataclasses.asdict(model.config),
    }
    write_safetensors(path / WEIGHTS_NAME, model.state_dict(), metadata={"format": "pt", "tckernels": FORMAT})
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _atomic_write(path / CONFIG_NAME, lambda p: p.write_text(text))


def _read_config(path: Path) -> tuple:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FormatError(f"file not found (is {path} a saved tckernels transcoder?)", path=file)
    try:
        meta = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"not valid JSON: {exc}", path=file) from exc
    if not isinstance(meta, dict):
        raise FormatError(f"expected a JSON object, got {type(meta).__name__}", path=file)
    for key in ("format", "format_version", "config", "dtype"):
        if key not in meta:
            raise FormatError(f"missing key {key!r}", path=file)
    if meta["format"] != FORMAT:
        raise FormatError(f"key 'format' is {meta['format']!r}, expected {FORMAT!r}", path=file)
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FormatError(f"key 'format_version' must be a positive int, got {version!r}", path=file)
    if version > FORMAT_VERSION:
        raise FormatError(
            f"format_version {version} is newer than this tckernels reads ({FORMAT_VERSION}); upgrade tckernels", path=file
        )
    raw = meta["config"]
    if not isinstance(raw, dict):
        raise FormatError("key 'config' must be an object", path=file)
    fields = {f.name for f in dataclasses.fields(TranscoderConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise FormatError(f"unknown config key(s) {unknown}", path=file)
    try:
        cfg = TranscoderConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"invalid config: {exc}", path=file) from exc
    return cfg, _dtype_from_name(meta["dtype"], file)


def load_transcoder(path: PathLike, dtype: Optional[torch.dtype] = None, device=None) -> Transcoder:
    """Load a transcoder saved by :func:`save_transcoder`.

    The tensors are loaded bit-exactly in their saved dtype; ``dtype`` casts the floating-point
    parameters afterwards (integer buffers keep theirs), ``device`` moves everything.
    """
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"not a directory (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)", path=path)
    cfg, saved_dtype = _read_config(path)
    file = path / WEIGHTS_NAME
    if not file.is_file():  # a checkpoint without its weights is malformed, not just a missing path
        raise FormatError("file not found", path=file)
    tensors = read_safetensors(file)

    with torch.device("meta"):
        model = Transcoder.from_config(cfg, dtype=saved_dtype)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FormatError(f"missing key {missing[0]!r}{more}", path=file)
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise FormatError(f"unexpected key {unexpected[0]!r} for this config", path=file)
    for key, ref in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise FormatError(
                f"key {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} from {CONFIG_NAME}", path=file
            )
        if t.dtype != ref.dtype and not (ref.is_floating_point() and t.is_floating_point() and key == "threshold"):
            raise FormatError(
                f"key {key!r} has dtype {_dtype_name(t.dtype)}, expected {_dtype_name(ref.dtype)}", path=file
            )
    model.load_state_dict(tensors, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device=device)
    return model
