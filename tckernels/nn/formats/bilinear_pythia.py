"""The Pythia-410m bilinear MLP transcoders.

Each ``layer_{i}/transcoder_weights_l{i}_bilinear_muon_3000b.pt`` holds ``model_state_dict``
(``W_left.weight [n_outputs, n_hidden]``, ``W_left.bias [n_outputs]`` when ``config.bias``,
``W_right.weight [n_hidden, n_inputs]``), ``config`` (an object with ``n_inputs``, ``n_hidden``,
``n_outputs``, ``bias``), ``optimizer_state_dict``, ``mse_losses``, ``variance_explained``,
``fvu_values``, ``layer_idx`` and ``d_model``. The checkpoints run with the ``Bilinear`` class the
card publishes, whose forward is ``W_left((Σ_i x_i) · W_right(x))`` (see
:class:`tckernels.nn.bilinear.BilinearTranscoder` for the derivation, and why the card's formula
``W_left @ (x ⊙ (W_right @ x))`` is not what the checkpoints compute).

The original bilinear-MLP code's layout (``left.weight``, ``right.weight``, ``head.weight``,
optional biases; forward ``head(left(x) ⊙ right(x))``) is recognised too and gives a
:class:`tckernels.nn.bilinear.BilinearMLP`.

**Pickled config.** ``config`` is an instance of a class from the training script, so
``torch.load(weights_only=True)`` refuses the file, and ``torch.serialization.add_safe_globals``
cannot allowlist the real class: it is not importable here (it lives in the training script's
``__main__`` or a module we do not have). :func:`tckernels.nn.formats.reading.torch_load` therefore loads
the file with ``weights_only=True`` and binds that class name to an inert
:class:`tckernels.nn.formats.reading.PickledObject` placeholder that only records the fields: no code from
the file runs, and the config's fields are still read and checked against the weights.
``trust_pickle=True`` is the explicit opt-in for ``weights_only=False`` (which imports and calls
whatever the file names; only for files you trust, and only works where the class is importable).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import Tensor, nn

from tckernels.nn.bilinear import BilinearMLP, BilinearTranscoder
from tckernels.nn.errors import FormatError, MissingKeyError
from tckernels.nn.formats.reading import assign_, check_shape, get_key, torch_load

__all__ = ["load_bilinear_pythia", "bilinear_from_state_dict"]


def _config_field(config, name: str):
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(name)
    return getattr(config, name, None)


def bilinear_from_state_dict(
    sd, *, config=None, path=None, dtype: Optional[torch.dtype] = None, device=None
) -> nn.Module:
    """Build the module for a bilinear state dict: ``W_left``/``W_right`` keys give a
    :class:`BilinearTranscoder`, ``left``/``right``/``head`` keys a :class:`BilinearMLP`.
    ``config`` (object or dict with ``n_inputs``/``n_hidden``/``n_outputs``/``bias``), when given,
    must agree with the weights."""
    key = "model_state_dict"

    def k(name):
        return f"{key}.{name}"

    if "W_left.weight" in sd or "W_right.weight" in sd:
        W_left = get_key(sd, "W_left.weight", path)
        W_right = get_key(sd, "W_right.weight", path)
        if not (isinstance(W_left, Tensor) and W_left.dim() == 2):
            raise FormatError("expected a 2-D tensor [n_outputs, n_hidden]", path=path, key=k("W_left.weight"))
        if not (isinstance(W_right, Tensor) and W_right.dim() == 2):
            raise FormatError("expected a 2-D tensor [n_hidden, n_inputs]", path=path, key=k("W_right.weight"))
        n_out, n_hid = W_left.shape
        n_in = W_right.shape[1]
        check_shape(W_right, (n_hid, n_in), path, k("W_right.weight"), "[n_hidden, n_inputs], n_hidden from W_left.weight")
        bias = "W_left.bias" in sd
        if bias:
            check_shape(sd["W_left.bias"], (n_out,), path, k("W_left.bias"), "[n_outputs]")
        extra = set(sd) - {"W_left.weight", "W_left.bias", "W_right.weight"}
        if extra:
            raise FormatError(f"unexpected keys {sorted(extra)} for the Bilinear class", path=path, key=key)
        want = {"n_inputs": n_in, "n_hidden": n_hid, "n_outputs": n_out, "bias": bias}
        for name, value in want.items():
            got = _config_field(config, name)
            if got is not None and (bool(got) if name == "bias" else int(got)) != value:
                raise FormatError(f"config.{name} = {got!r} but the weights imply {value!r}", path=path, key=f"config.{name}")
        dtype = dtype or W_left.dtype
        m = BilinearTranscoder(n_in, n_hid, n_out, bias, dtype=dtype, device=device)
        assign_(m.W_left.weight, W_left)
        assign_(m.W_right.weight, W_right)
        if bias:
            assign_(m.W_left.bias, sd["W_left.bias"])
        return m

    if "head.weight" in sd or "left.weight" in sd:
        left = get_key(sd, "left.weight", path)
        right = get_key(sd, "right.weight", path)
        head = get_key(sd, "head.weight", path)
        if not (isinstance(left, Tensor) and left.dim() == 2):
            raise FormatError("expected a 2-D tensor [n_hidden, n_inputs]", path=path, key=k("left.weight"))
        n_hid, n_in = left.shape
        check_shape(right, (n_hid, n_in), path, k("right.weight"), "the shape of left.weight")
        if not (isinstance(head, Tensor) and head.dim() == 2):
            raise FormatError("expected a 2-D tensor [n_outputs, n_hidden]", path=path, key=k("head.weight"))
        n_out = head.shape[0]
        check_shape(head, (n_out, n_hid), path, k("head.weight"), "[n_outputs, n_hidden]")
        in_bias = "left.bias" in sd
        if in_bias != ("right.bias" in sd):
            missing = "right.bias" if in_bias else "left.bias"
            raise MissingKeyError("left and right must both have a bias or neither", path=path, key=k(missing))
        head_bias = "head.bias" in sd
        if in_bias:
            check_shape(sd["left.bias"], (n_hid,), path, k("left.bias"), "[n_hidden]")
            check_shape(sd["right.bias"], (n_hid,), path, k("right.bias"), "[n_hidden]")
        if head_bias:
            check_shape(sd["head.bias"], (n_out,), path, k("head.bias"), "[n_outputs]")
        extra = set(sd) - {f"{a}.{b}" for a in ("left", "right", "head") for b in ("weight", "bias")}
        if extra:
            raise FormatError(f"unexpected keys {sorted(extra)} for the left/right/head layout", path=path, key=key)
        dtype = dtype or left.dtype
        m = BilinearMLP(n_in, n_hid, n_out, bias=in_bias, head_bias=head_bias, dtype=dtype, device=device)
        for name in ("left", "right", "head"):
            mod = getattr(m, name)
            assign_(mod.weight, sd[f"{name}.weight"])
            if mod.bias is not None:
                assign_(mod.bias, sd[f"{name}.bias"])
        return m

    raise MissingKeyError(
        "neither the Bilinear class's keys (W_left.weight, W_right.weight) nor the left/right/head "
        f"layout's were found (keys: {sorted(map(str, sd))[:12]})",
        path=path,
        key=k("W_left.weight"),
    )


def load_bilinear_pythia(
    path: Union[str, os.PathLike],
    *,
    trust_pickle: bool = False,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> nn.Module:
    """Load a Pythia-410m bilinear transcoder checkpoint into the module that runs its forward.

    Returns a :class:`BilinearTranscoder` (``W_left``/``W_right`` keys) or a
    :class:`BilinearMLP` (``left``/``right``/``head`` keys) with attributes ``layer`` (the
    checkpoint's ``layer_idx``, or None) and ``config`` (the checkpoint's config: an inert
    :class:`~tckernels.nn.formats.reading.PickledObject` unless ``trust_pickle=True``). A bare state dict
    (no ``model_state_dict`` wrapper) is accepted too. See the module docstring for why loading
    needs no ``weights_only=False``.
    """
    ck = torch_load(path, trust_pickle=trust_pickle)
    if not isinstance(ck, dict):
        raise FormatError(f"expected a dict checkpoint, got {type(ck).__name__}", path=path)
    if "model_state_dict" in ck:
        sd, config = ck["model_state_dict"], ck.get("config")
    elif any(str(key).endswith(".weight") for key in ck):
        sd, config = ck, None
    else:
        get_key(ck, "model_state_dict", path)  # raises MissingKeyError
    if not hasattr(sd, "keys"):
        raise FormatError(f"expected a state dict, got {type(sd).__name__}", path=path, key="model_state_dict")
    m = bilinear_from_state_dict(sd, config=config, path=path, dtype=dtype, device=device)
    m.layer = ck.get("layer_idx")
    m.config = config
    return m
