"""The transcoder-adapter release: adapter weights saved inside a Hugging Face Qwen2 checkpoint.

The adapter model (``Qwen2ForCausalLMWithTranscoder``) adds to each decoder layer's MLP a branch
``mlp(x) + dec(relu(enc(x)))`` and saves it with ``save_pretrained``, so the state dict / the
safetensors shards hold, per layer ``i``::

    model.layers.{i}.mlp.transcoder_enc.weight   [F, d]     (nn.Linear(d, F), with bias)
    model.layers.{i}.mlp.transcoder_enc.bias     [F]
    model.layers.{i}.mlp.transcoder_dec.weight   [d, F]     (nn.Linear(F, d), zero-initialised)
    model.layers.{i}.mlp.transcoder_dec.bias     [d]        (when the Linear has a bias)

The branch is ``Transcoder(d, F, activation="relu", dec_init="zero")`` with ``W_enc = enc.weight``,
``b_enc = enc.bias``, ``W_dec = dec.weightᵀ`` (row per feature) and ``b_dec = dec.bias``
(``dec_bias=False`` when the checkpoint has none). Only the adapter tensors are read: from a
sharded checkpoint, just the shards that hold them (via ``model.safetensors.index.json``).
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Dict, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from tckernels.nn.errors import FormatError, MissingKeyError
from tckernels.nn.formats.reading import assign_, check_shape, read_safetensors, safetensors_keys, torch_load

__all__ = ["load_transcoder_adapter_weights", "ADAPTER_KEY_RE"]

#: ``...layers.{i}.mlp.transcoder_{enc,dec}.{weight,bias}``, with any prefix (``model.`` for
#: ``*ForCausalLM``, none for a bare ``Qwen2Model``).
ADAPTER_KEY_RE = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.mlp\.transcoder_(?P<part>enc|dec)\.(?P<kind>weight|bias)$")


def _collect(keys: Iterable[str]):
    """{layer: {"enc.weight": key, ...}} for the adapter keys among ``keys``."""
    found = defaultdict(dict)
    for key in keys:
        m = ADAPTER_KEY_RE.match(key)
        if m:
            found[int(m.group("layer"))][f"{m.group('part')}.{m.group('kind')}"] = key
    return found


def _tensors_from_source(source, wanted_layers) -> tuple:
    """(layer -> part -> key, key -> tensor, key -> file) for a state dict, a file or a directory."""
    if isinstance(source, Mapping):
        parts = _collect(source.keys())
        return parts, source, {}
    path = os.fspath(source)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise FormatError(f"not a valid safetensors index ({type(e).__name__}: {e})", path=index, key="weight_map") from e
            parts = _collect(weight_map.keys())
            files = {key: os.path.join(path, weight_map[key]) for layer in parts for key in parts[layer].values()}
        elif os.path.isfile(single):
            parts = _collect(safetensors_keys(single))
            files = {key: single for layer in parts for key in parts[layer].values()}
        else:
            bins = [n for n in ("pytorch_model.bin",) if os.path.isfile(os.path.join(path, n))]
            if not bins:
                raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
            return _tensors_from_source(os.path.join(path, bins[0]), wanted_layers)
    elif path.endswith(".safetensors"):
        parts = _collect(safetensors_keys(path))
        files = {key: path for layer in parts for key in parts[layer].values()}
    else:  # a torch state dict file (pytorch_model.bin)
        sd = torch_load(path)
        if not isinstance(sd, Mapping):
            raise FormatError(f"expected a state dict, got {type(sd).__name__}", path=path)
        parts, tensors, _ = _tensors_from_source(sd, wanted_layers)
        return parts, tensors, {key: path for layer in parts for key in parts[layer].values()}
    # read only the wanted layers' tensors, one open per shard
    layers = parts.keys() if wanted_layers is None else [i for i in wanted_layers if i in parts]
    by_file = defaultdict(list)
    for i in layers:
        for key in parts[i].values():
            by_file[files[key]].append(key)
    tensors = {}
    for file, keys in by_file.items():
        tensors.update(read_safetensors(file, keys))
    return parts, tensors, files


def load_transcoder_adapter_weights(
    source: Union[str, os.PathLike, Mapping[str, Tensor]],
    layers: Optional[Iterable[int]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> Dict[int, "torch.nn.Module"]:
    """Transcoder-adapter weights -> ``{layer: Transcoder(activation="relu", dec_init="zero")}``.

    ``source``: a state dict, a ``.safetensors`` file, a ``pytorch_model.bin`` (read with
    ``weights_only=True``) or a checkpoint directory (``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``). ``layers``: which layers (default: all that have adapter
    weights; a requested layer without them raises :class:`MissingKeyError`). ``dtype``: parameter
    dtype (default: the checkpoint's).
    """
    wanted = None if layers is None else sorted(set(int(i) for i in layers))
    parts, tensors, files = _tensors_from_source(source, wanted)
    where = None if isinstance(source, Mapping) else os.fspath(source)
    if not parts:
        raise MissingKeyError("no adapter weights (...layers.{i}.mlp.transcoder_enc.weight) found", path=where,
                              key="model.layers.0.mlp.transcoder_enc.weight")
    if wanted is None:
        wanted = sorted(parts)
    from tckernels.nn.transcoder import Transcoder

    out = {}
    for i in wanted:
        p = parts.get(i, {})
        for need in ("enc.weight", "enc.bias", "dec.weight"):
            if need not in p:
                some = next(iter(p.values()), None)
                pre = ADAPTER_KEY_RE.match(some).group("prefix") if some else "model."
                part, kind = need.split(".")
                raise MissingKeyError("missing", path=where, key=f"{pre}layers.{i}.mlp.transcoder_{part}.{kind}")

        def get(name):
            key = p[name]
            return tensors[key], key, files.get(key, where)

        W_enc, k_we, f_we = get("enc.weight")
        if not isinstance(W_enc, Tensor) or W_enc.dim() != 2:
            raise FormatError("expected a 2-D tensor [n_features, d_model]", path=f_we, key=k_we)
        n_feat, d = W_enc.shape
        b_enc, k_be, f_be = get("enc.bias")
        check_shape(b_enc, (n_feat,), f_be, k_be, "[n_features]")
        W_dec, k_wd, f_wd = get("dec.weight")
        check_shape(W_dec, (d, n_feat), f_wd, k_wd, "[d_model, n_features]")
        has_dec_bias = "dec.bias" in p
        if has_dec_bias:
            b_dec, k_bd, f_bd = get("dec.bias")
            check_shape(b_dec, (d,), f_bd, k_bd, "[d_model]")
        dt = dtype or W_enc.dtype
        tc = Transcoder(d, n_feat, d, "relu", dec_bias=has_dec_bias, dec_init="zero", dtype=dt, device=device)
        assign_(tc.W_enc, W_enc)
        assign_(tc.b_enc, b_enc)
        assign_(tc.W_dec, W_dec.t())
        if has_dec_bias:
            assign_(tc.b_dec, b_dec)
        tc.layer = i
        out[i] = tc
    return out
