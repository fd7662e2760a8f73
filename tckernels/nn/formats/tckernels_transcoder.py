"""The tckernels checkpoint format: a directory with ``model.safetensors`` and ``config.json``.

One format for every dictionary module tckernels trains. ``config.json``::

    {"format": "tckernels.transcoder", "format_version": 2, "tckernels_version": "...",
     "kind": "<kind>", "dtype": "float32", "config": {<what rebuilds the module>}}

``kind`` names the module class and ``config`` holds what rebuilds it:

* ``"transcoder"`` (:class:`~tckernels.nn.Transcoder`): the :class:`TranscoderConfig` fields.
* ``"crosslayer_transcoder"`` (:class:`~tckernels.nn.CrossLayerTranscoder`): ``n_layers``, ``d_in``,
  ``n_features_per_layer``, ``d_out``, ``skip``, ``dec_bias`` and ``source_config``, the
  ``TranscoderConfig`` fields all source layers share (every field but ``d_in``, ``n_features``,
  ``d_out``, ``skip`` and ``dec_bias``, which the cross-layer fields determine).
* ``"bilinear_transcoder"`` (:class:`~tckernels.nn.BilinearTranscoder`): ``n_inputs``, ``n_hidden``,
  ``n_outputs``, ``bias``.
* ``"bilinear_mlp"`` (:class:`~tckernels.nn.BilinearMLP`): ``n_inputs``, ``n_hidden``, ``n_outputs``,
  ``bias``, ``head_bias``.

``model.safetensors`` holds the module's ``state_dict()`` (parameters and persistent buffers,
such as the BatchTopK threshold and the dead-feature counter) under the same names, e.g.
``W_enc [N, d_in]`` for a transcoder or ``layers.0.W_enc`` for the first source layer of a
cross-layer transcoder. safetensors stores raw bytes, so a save/load round trip is bit-exact.
Nothing is unpickled.

``format_version`` 1 (tckernels before ``kind``) wrote transcoders only and has no ``kind`` key;
such files still load, as a ``Transcoder``. A missing ``kind`` means ``"transcoder"``.

Loading checks everything against the config before any tensor is used: an unknown or missing
key, a ``kind`` the tensors do not fit, an unexpected tensor, a wrong shape or dtype, a truncated
or corrupt file, or a bad config raise :class:`~tckernels.nn.errors.FormatError` naming the file
(and the key).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from tckernels._version import __version__
from tckernels.nn.bilinear import BilinearMLP, BilinearTranscoder
from tckernels.nn.crosslayer import CrossLayerTranscoder
from tckernels.nn.errors import FormatError
from tckernels.nn.formats.reading import read_safetensors
from tckernels.nn.transcoder import Transcoder, TranscoderConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "KINDS",
    "save_transcoder",
    "load_transcoder",
    "write_safetensors",
]

FORMAT = "tckernels.transcoder"
# 2 added "kind": a version-1 reader would take a cross-layer or bilinear config for a
# transcoder's and fail on the tensors, so those files must tell it to upgrade instead.
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

PathLike = Union[str, os.PathLike]
Module = Union[Transcoder, CrossLayerTranscoder, BilinearTranscoder, BilinearMLP]

_TOP_KEYS = {1: {"format", "format_version", "tckernels_version", "dtype", "config"}}
_TOP_KEYS[2] = _TOP_KEYS[1] | {"kind"}
_REQUIRED_TOP_KEYS = ("format", "format_version", "config", "dtype")


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


# -------------------------------------------------------------------------------------------------
# per kind: module -> (config, dtype) and config -> module
# -------------------------------------------------------------------------------------------------


def _check_keys(raw: Any, what: str, allowed, required, file: Path) -> None:
    if not isinstance(raw, dict):
        raise FormatError(f"key {what!r} must be an object", path=file)
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise FormatError(f"unknown {what} key(s) {unknown}", path=file)
    missing = [k for k in required if k not in raw]
    if missing:
        raise FormatError(f"missing {what} key {missing[0]!r}", path=file)


def _check_types(raw: dict, ints, bools, what: str, file: Path) -> None:
    # the constructors take truthiness for flags and do not all check sizes; a hand-edited
    # "false" string or a float size must not silently build a different module
    for k in ints:
        v = raw[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FormatError(f"{what} key {k!r} must be a positive int, got {v!r}", path=file)
    for k in bools:
        if not isinstance(raw[k], bool):
            raise FormatError(f"{what} key {k!r} must be true or false, got {raw[k]!r}", path=file)


def _build(make: Callable[[], nn.Module], file: Path) -> nn.Module:
    try:
        with torch.device("meta"):  # shapes only: every tensor is replaced by the file's
            return make()
    except (TypeError, ValueError) as exc:
        raise FormatError(f"invalid config: {exc}", path=file) from exc


_TC_FIELDS = tuple(f.name for f in dataclasses.fields(TranscoderConfig))


def _transcoder_config(m: Transcoder) -> Tuple[dict, torch.dtype]:
    return dataclasses.asdict(m.config), m.W_enc.dtype


def _transcoder_build(raw: Any, dtype: torch.dtype, file: Path) -> Transcoder:
    _check_keys(raw, "config", _TC_FIELDS, (), file)
    try:
        cfg = TranscoderConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"invalid config: {exc}", path=file) from exc
    return _build(lambda: Transcoder.from_config(cfg, dtype=dtype), file)


# Fields of a CLT's source layers that the CLT itself sets (per source, or per target layer).
_CLT_OWNED = ("d_in", "n_features", "d_out", "skip", "dec_bias")
_CLT_SOURCE_FIELDS = tuple(f for f in _TC_FIELDS if f not in _CLT_OWNED)
_CLT_KEYS = ("n_layers", "d_in", "n_features_per_layer", "d_out", "skip", "dec_bias", "source_config")


def _crosslayer_config(m: CrossLayerTranscoder) -> Tuple[dict, torch.dtype]:
    first = dataclasses.asdict(m.layers[0].config)
    shared = {k: first[k] for k in _CLT_SOURCE_FIELDS}
    # The file stores one source config; a CLT whose layers were changed one by one would load
    # as a different model, so refuse to write it.
    for src, layer in enumerate(m.layers):
        c = dataclasses.asdict(layer.config)
        differs = [k for k in _CLT_SOURCE_FIELDS if c[k] != shared[k]]
        if differs:
            raise ValueError(
                f"save_transcoder: source layer {src} of the CrossLayerTranscoder has {differs[0]}={c[differs[0]]!r} "
                f"but layer 0 has {shared[differs[0]]!r}; the format stores one config for all source layers"
            )
        owned = (c["d_in"], c["n_features"], c["d_out"], c["skip"], c["dec_bias"])
        if owned != (m.d_in, m.n_features, (m.n_layers - src) * m.d_out, False, False):
            raise ValueError(f"save_transcoder: source layer {src} of the CrossLayerTranscoder does not have the CLT's layout")
    cfg = {
        "n_layers": m.n_layers,
        "d_in": m.d_in,
        "n_features_per_layer": m.n_features,
        "d_out": m.d_out,
        "skip": m.W_skip is not None,
        "dec_bias": m.b_dec is not None,
        "source_config": shared,
    }
    return cfg, m.layers[0].W_enc.dtype


def _crosslayer_build(raw: Any, dtype: torch.dtype, file: Path) -> CrossLayerTranscoder:
    _check_keys(raw, "config", _CLT_KEYS, _CLT_KEYS, file)
    _check_types(raw, ("n_layers", "d_in", "n_features_per_layer", "d_out"), ("skip", "dec_bias"), "config", file)
    source = raw["source_config"]
    _check_keys(source, "source_config", _CLT_SOURCE_FIELDS, (), file)
    try:  # the source layers' own checks, with messages that name the field
        TranscoderConfig(d_in=raw["d_in"], n_features=raw["n_features_per_layer"], **source)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"invalid source_config: {exc}", path=file) from exc
    return _build(
        lambda: CrossLayerTranscoder(
            raw["n_layers"], raw["d_in"], raw["n_features_per_layer"], raw["d_out"],
            skip=raw["skip"], dec_bias=raw["dec_bias"], dtype=dtype, **source,
        ),
        file,
    )


_BT_KEYS = ("n_inputs", "n_hidden", "n_outputs", "bias")
_BMLP_KEYS = _BT_KEYS + ("head_bias",)


def _bilinear_transcoder_config(m: BilinearTranscoder) -> Tuple[dict, torch.dtype]:
    # sizes from the weights, not the attributes: the weights are what the file holds
    n_hidden, n_inputs = m.W_right.weight.shape
    cfg = {"n_inputs": n_inputs, "n_hidden": n_hidden, "n_outputs": m.W_left.weight.shape[0], "bias": m.W_left.bias is not None}
    return cfg, m.W_right.weight.dtype


def _bilinear_transcoder_build(raw: Any, dtype: torch.dtype, file: Path) -> BilinearTranscoder:
    _check_keys(raw, "config", _BT_KEYS, _BT_KEYS, file)
    _check_types(raw, _BT_KEYS[:3], ("bias",), "config", file)
    return _build(lambda: BilinearTranscoder(raw["n_inputs"], raw["n_hidden"], raw["n_outputs"], raw["bias"], dtype=dtype), file)


def _bilinear_mlp_config(m: BilinearMLP) -> Tuple[dict, torch.dtype]:
    bias = m.left.bias is not None
    if (m.right.bias is not None) != bias:
        raise ValueError("save_transcoder: BilinearMLP.left and .right must both have a bias or neither (one 'bias' flag sets both)")
    n_hidden, n_inputs = m.left.weight.shape
    cfg = {
        "n_inputs": n_inputs,
        "n_hidden": n_hidden,
        "n_outputs": m.head.weight.shape[0],
        "bias": bias,
        "head_bias": m.head.bias is not None,
    }
    return cfg, m.left.weight.dtype


def _bilinear_mlp_build(raw: Any, dtype: torch.dtype, file: Path) -> BilinearMLP:
    _check_keys(raw, "config", _BMLP_KEYS, _BMLP_KEYS, file)
    _check_types(raw, _BMLP_KEYS[:3], ("bias", "head_bias"), "config", file)
    return _build(
        lambda: BilinearMLP(
            raw["n_inputs"], raw["n_hidden"], raw["n_outputs"], raw["bias"], head_bias=raw["head_bias"], dtype=dtype
        ),
        file,
    )


class _Kind(NamedTuple):
    cls: Type[nn.Module]
    config: Callable[[Any], Tuple[dict, torch.dtype]]
    build: Callable[[Any, torch.dtype, Path], nn.Module]


_KINDS: Dict[str, _Kind] = {
    "transcoder": _Kind(Transcoder, _transcoder_config, _transcoder_build),
    "crosslayer_transcoder": _Kind(CrossLayerTranscoder, _crosslayer_config, _crosslayer_build),
    "bilinear_transcoder": _Kind(BilinearTranscoder, _bilinear_transcoder_config, _bilinear_transcoder_build),
    "bilinear_mlp": _Kind(BilinearMLP, _bilinear_mlp_config, _bilinear_mlp_build),
}
#: The values of ``config.json``'s ``kind``, one per module class the format holds.
KINDS = tuple(_KINDS)


def _kind_of(model: Any) -> str:
    for name, kind in _KINDS.items():
        if isinstance(model, kind.cls):
            return name
    names = ", ".join(f"tckernels.nn.{k.cls.__name__}" for k in _KINDS.values())
    raise TypeError(f"save_transcoder expects one of {names}; got {type(model).__name__}")


# -------------------------------------------------------------------------------------------------
# save / load
# -------------------------------------------------------------------------------------------------


def save_transcoder(model: Module, path: PathLike) -> None:
    """Save ``model`` to directory ``path`` (created if needed) as ``model.safetensors`` + ``config.json``.

    ``model`` is a :class:`~tckernels.nn.Transcoder`, :class:`~tckernels.nn.CrossLayerTranscoder`,
    :class:`~tckernels.nn.BilinearTranscoder` or :class:`~tckernels.nn.BilinearMLP`; ``config.json``
    records which (``kind``) and what rebuilds it, ``model.safetensors`` its ``state_dict()``.
    Anything else raises ``TypeError``. A cross-layer transcoder whose source layers no longer share
    one config, or a ``BilinearMLP`` with a bias on only one of ``left``/``right``, cannot be
    rebuilt from its constructor's arguments and raises ``ValueError``.
    """
    kind = _kind_of(model)
    cfg, dtype = _KINDS[kind].config(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tckernels_version": __version__,
        "kind": kind,
        "dtype": _dtype_name(dtype),
        "config": cfg,
    }
    write_safetensors(path / WEIGHTS_NAME, model.state_dict(), metadata={"format": "pt", "tckernels": FORMAT})
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _atomic_write(path / CONFIG_NAME, lambda p: p.write_text(text))


def _read_config(path: Path) -> Tuple[str, nn.Module]:
    """``config.json`` -> (kind, the module built on the meta device in the saved dtype)."""
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FormatError(f"file not found (is {path} a saved tckernels transcoder?)", path=file)
    try:
        meta = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"not valid JSON: {exc}", path=file) from exc
    if not isinstance(meta, dict):
        raise FormatError(f"expected a JSON object, got {type(meta).__name__}", path=file)
    for key in _REQUIRED_TOP_KEYS:
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
    unknown = sorted(set(meta) - _TOP_KEYS[version])
    if unknown:
        raise FormatError(f"unknown key(s) {unknown} for format_version {version}", path=file)
    kind = meta.get("kind", "transcoder")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise FormatError(f"key 'kind' is {kind!r}, expected one of {list(KINDS)}", path=file)
    dtype = _dtype_from_name(meta["dtype"], file)
    return kind, _KINDS[kind].build(meta["config"], dtype, file)


def load_transcoder(path: PathLike, dtype: Optional[torch.dtype] = None, device=None) -> Module:
    """Load a module saved by :func:`save_transcoder`: a ``Transcoder``, ``CrossLayerTranscoder``,
    ``BilinearTranscoder`` or ``BilinearMLP``, as ``config.json``'s ``kind`` says (files without
    ``kind``, from format_version 1, are transcoders).

    The tensors, buffers included, are loaded bit-exactly in their saved dtype; ``dtype`` casts the
    floating-point parameters afterwards (integer buffers keep theirs), ``device`` moves everything.
    """
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"not a directory (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)", path=path)
    kind, model = _read_config(path)
    file = path / WEIGHTS_NAME
    if not file.is_file():  # a checkpoint without its weights is malformed, not just a missing path
        raise FormatError("file not found", path=file)
    tensors = read_safetensors(file)

    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FormatError(f"missing key {missing[0]!r}{more} for kind {kind!r} in {CONFIG_NAME}", path=file)
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise FormatError(f"unexpected key {unexpected[0]!r} for kind {kind!r} and this config", path=file)
    for key, ref in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise FormatError(
                f"key {key!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} from {CONFIG_NAME}", path=file
            )
        # the BatchTopK threshold is float32 beside low-precision weights, unless the module was cast whole
        is_threshold = key.rsplit(".", 1)[-1] == "threshold"
        if t.dtype != ref.dtype and not (ref.is_floating_point() and t.is_floating_point() and is_threshold):
            raise FormatError(
                f"key {key!r} has dtype {_dtype_name(t.dtype)}, expected {_dtype_name(ref.dtype)}", path=file
            )
    model.load_state_dict(tensors, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device=device)
    return model
