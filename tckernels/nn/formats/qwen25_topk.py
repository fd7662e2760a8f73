"""The Qwen2.5-32B per-layer TopK transcoders (``KokosDev/qwen25-32b-clt`` on the Hugging Face Hub).

Each ``transcoder_L{i}.pt`` is a plain dict (readable with ``torch.load(weights_only=True)``)::

    {'layer': int, 'hidden_dim': D, 'feature_dim': F,
     'state_dict': {'_orig_mod.enc.0.weight': [D], '_orig_mod.enc.0.bias': [D],
                    '_orig_mod.enc.1.weight': [F, D], '_orig_mod.enc.1.bias': [F],
                    '_orig_mod.dec.weight': [D, F], '_orig_mod.dec.bias': [D]},
     'training_metadata': {...}}

The card's documented math (the default here)::

    h = x + enc.0.bias
    f = relu(h @ enc.1.weightᵀ + enc.1.bias);   keep the top k = int(0.12 · F) entries of f
    y = f @ dec.weightᵀ + dec.bias

which is ``Transcoder(D, F, activation="topk", k=k, pre_bias=True)`` with ``b_pre = −enc.0.bias``
(the encoder reads ``x − b_pre``; negation is exact, so ``x − b_pre`` is bit-identical to
``x + enc.0.bias``), ``W_enc = enc.1.weight``, ``b_enc = enc.1.bias``, ``W_dec = dec.weightᵀ``
(row per feature) and ``b_dec = dec.bias``. The card ignores ``enc.0.weight``.

The card also calls ``enc.0`` "pre-encoder normalization", and it has a weight: the
``nn.Sequential`` the keys come from (``enc.0`` then ``enc.1``) is consistent with a
``LayerNorm(D)`` before the encoder Linear. ``pre_encoder="layernorm"`` reads it that way:
``y = Transcoder(LayerNorm(x))`` (:class:`PreNormTranscoder`). Which reading the checkpoints were
trained with is not documented; the card's code is the only published forward, hence the default.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from tckernels.nn.errors import FormatError
from tckernels.nn.formats.reading import assign_, check_shape, get_key, torch_load

__all__ = ["load_qwen25_topk_transcoder", "load_qwen25_topk_transcoders", "PreNormTranscoder", "TOPK_FRACTION"]

#: The card's sparsity: k = int(0.12 · feature_dim).
TOPK_FRACTION = 0.12

_PREFIX = "_orig_mod."


class PreNormTranscoder(nn.Module):
    """A transcoder whose encoder and skip path read ``norm(x)``: ``transcoder(norm(x))``.

    ``encode(x)``, ``decode(acts, x=None)`` and ``forward(x)`` mirror the wrapped transcoder's.
    Used for the ``pre_encoder="layernorm"`` reading of these checkpoints.
    """

    def __init__(self, norm: nn.Module, transcoder: nn.Module):
        super().__init__()
        self.norm = norm
        self.transcoder = transcoder

    def encode(self, x: Tensor):
        return self.transcoder.encode(self.norm(x))

    def decode(self, acts, x: Optional[Tensor] = None) -> Tensor:
        return self.transcoder.decode(acts, None if x is None else self.norm(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.transcoder(self.norm(x))


def _state_key(sd, name: str, path):
    """``_orig_mod.<name>`` (torch.compile'd module) or plain ``<name>``."""
    return get_key(sd, _PREFIX + name, path, alternatives=(name,))


def load_qwen25_topk_transcoder(
    path: Union[str, os.PathLike],
    *,
    pre_encoder: str = "bias",
    k: Optional[int] = None,
    layernorm_eps: float = 1e-5,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> nn.Module:
    """Load one ``transcoder_L{i}.pt`` file of the release.

    ``pre_encoder``: ``"bias"`` (default, the card's math: ``x + enc.0.bias``) gives a
    ``Transcoder``; ``"layernorm"`` reads ``enc.0`` as ``LayerNorm(weight, bias, eps=layernorm_eps)``
    and gives a :class:`PreNormTranscoder`. ``k`` overrides ``int(0.12 · feature_dim)``.
    ``dtype``: parameter dtype (default: the file's). The returned module has ``.layer`` set.
    """
    from tckernels.nn.transcoder import Transcoder

    if pre_encoder not in ("bias", "layernorm"):
        raise ValueError(f"pre_encoder must be 'bias' or 'layernorm', got {pre_encoder!r}")
    ck = torch_load(path)
    if not isinstance(ck, dict):
        raise FormatError(f"expected a dict checkpoint, got {type(ck).__name__}", path=path)
    sd = get_key(ck, "state_dict", path)
    if not hasattr(sd, "keys"):
        raise FormatError(f"expected a state dict, got {type(sd).__name__}", path=path, key="state_dict")
    W_enc = _state_key(sd, "enc.1.weight", path)
    if not isinstance(W_enc, Tensor) or W_enc.dim() != 2:
        raise FormatError("expected a 2-D tensor [feature_dim, hidden_dim]", path=path, key=_PREFIX + "enc.1.weight")
    n_feat, d = W_enc.shape
    hidden_dim, feature_dim = ck.get("hidden_dim", d), ck.get("feature_dim", n_feat)
    if (hidden_dim, feature_dim) != (d, n_feat):
        raise FormatError(
            f"hidden_dim={hidden_dim}, feature_dim={feature_dim} disagree with enc.1.weight of shape {(n_feat, d)}",
            path=path,
            key=_PREFIX + "enc.1.weight",
        )
    b_enc = check_shape(_state_key(sd, "enc.1.bias", path), (n_feat,), path, _PREFIX + "enc.1.bias", "[feature_dim]")
    W_dec = check_shape(_state_key(sd, "dec.weight", path), (d, n_feat), path, _PREFIX + "dec.weight", "[hidden_dim, feature_dim]")
    b_dec = check_shape(_state_key(sd, "dec.bias", path), (d,), path, _PREFIX + "dec.bias", "[hidden_dim]")
    pre_b = check_shape(_state_key(sd, "enc.0.bias", path), (d,), path, _PREFIX + "enc.0.bias", "[hidden_dim]")
    pre_w = sd.get(_PREFIX + "enc.0.weight", sd.get("enc.0.weight"))
    if pre_w is not None:
        check_shape(pre_w, (d,), path, _PREFIX + "enc.0.weight", "[hidden_dim]")
    elif pre_encoder == "layernorm":
        get_key(sd, _PREFIX + "enc.0.weight", path)  # raises MissingKeyError
    if k is None:
        k = int(TOPK_FRACTION * n_feat)
    k = max(1, min(int(k), n_feat))
    dtype = dtype or W_enc.dtype
    tc = Transcoder(
        d, n_feat, d, "topk", k=k, pre_bias=(pre_encoder == "bias"), dec_bias=True, dtype=dtype, device=device
    )
    assign_(tc.W_enc, W_enc)
    assign_(tc.b_enc, b_enc)
    assign_(tc.W_dec, W_dec.t())
    assign_(tc.b_dec, b_dec)
    if pre_encoder == "bias":
        assign_(tc.b_pre, -pre_b)
        model: nn.Module = tc
    else:
        norm = nn.LayerNorm(d, eps=layernorm_eps, dtype=dtype, device=device)
        assign_(norm.weight, pre_w)
        assign_(norm.bias, pre_b)
        model = PreNormTranscoder(norm, tc)
    layer = ck.get("layer")
    model.layer = int(layer) if isinstance(layer, int) else layer
    model.training_metadata = ck.get("training_metadata")
    return model


_FILE_RE = re.compile(r"^transcoder_L(\d+)\.pt$")


def load_qwen25_topk_transcoders(
    path: Union[str, os.PathLike], layers: Optional[Iterable[int]] = None, **kwargs
) -> Dict[int, nn.Module]:
    """Load the ``transcoder_L{i}.pt`` files of a directory: ``{layer: module}``.

    ``layers``: which layers (default: every file found); a requested layer without a file raises
    ``FileNotFoundError``. Keyword arguments go to :func:`load_qwen25_topk_transcoder`. A file whose ``layer``
    field disagrees with its name raises :class:`FormatError`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not a directory: {path}")
    found = {}
    for name in os.listdir(path):
        m = _FILE_RE.match(name)
        if m:
            found[int(m.group(1))] = os.path.join(path, name)
    wanted = sorted(found) if layers is None else sorted(set(int(i) for i in layers))
    if not wanted:
        raise FileNotFoundError(f"no transcoder_L{{i}}.pt files in {path}")
    out = {}
    for i in wanted:
        if i not in found:
            raise FileNotFoundError(f"layer {i}: {os.path.join(path, f'transcoder_L{i}.pt')} not found")
        model = load_qwen25_topk_transcoder(found[i], **kwargs)
        if model.layer is not None and model.layer != i:
            raise FormatError(f"its 'layer' field is {model.layer} but the file name says {i}", path=found[i], key="layer")
        out[i] = model
    return out
