"""The transcoder of a transcoder adapter: a ``tckernels.nn.Transcoder`` stored in the layout of the
transcoder-adapter checkpoints.

Everything a transcoder computes (encode, decode, the sparsity term, the dead-feature counter, the
validation of its options) is :class:`tckernels.nn.Transcoder`'s; this module only decides where
the weights live, so that an adapted model's state dict has the release's keys::

    transcoder_enc.weight   [F, d]        W_enc, row per feature (the release's nn.Linear(d, F))
    transcoder_enc.bias     [F]
    transcoder_dec.weight   [d, F]        the release's nn.Linear(F, d) shape
    transcoder_dec.bias     [d]           only with ``dec_bias=True`` (the release has none)
    transcoder_log_threshold [F]          JumpReLU only (not in the release, which is ReLU-only)

Decoder layout: ``transcoder_dec.weight`` has the release's shape ``[d, F]`` but its memory is row
per feature: it is the transpose view of a contiguous ``[F, d]`` tensor, so ``W_dec`` is a
contiguous ``[F, d]`` view that the sparse decoder gathers rows from, with no copy per forward.
Its gradient has the same strides (autograd's layout contract), ``model.to(...)`` keeps them, and
``load_state_dict`` copies into it in place. ``state_dict()`` exports a contiguous ``[d, F]`` copy
(so ``safetensors`` can write it). Loaders that replace the parameter (Hugging Face
``from_pretrained``) are followed by :meth:`TranscoderDecoder.ensure_layout_`; a decoder whose
layout was lost still computes correctly (the op copies it), and the first eager decode puts it back.

The holders are not ``nn.Linear`` on purpose: quantizers and tensor-parallel plans that rewrite
every Linear of a model must leave the adapter's weights alone (the sparse ops read them directly).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from tckernels.nn.activations import SparseActivations
from tckernels.nn.transcoder import Transcoder

__all__ = ["AdapterTranscoder", "TranscoderEncoder", "TranscoderDecoder", "CHECKPOINT_NAMES"]

#: checkpoint name (relative to the adapter) -> the Transcoder attribute it stores
CHECKPOINT_NAMES = {
    "transcoder_enc.weight": "W_enc",
    "transcoder_enc.bias": "b_enc",
    "transcoder_dec.weight": "W_dec",
    "transcoder_dec.bias": "b_dec",
    "transcoder_log_threshold": "log_threshold",
}


class TranscoderEncoder(nn.Module):
    """``weight [F, d]`` (W_enc, row per feature) and ``bias [F]``: the release's ``nn.Linear(d, F)``."""

    def __init__(self, d_model: int, n_features: int, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = d_model, n_features
        self.weight = nn.Parameter(torch.empty(n_features, d_model, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(n_features, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:  # dense pre-activations, for analysis
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"d_model={self.in_features}, n_features={self.out_features}"


def _row_per_feature(t: Tensor) -> Tensor:
    """``[d, F]`` tensor -> the same values as the transpose view of a contiguous ``[F, d]``."""
    return t.t().contiguous().t()


class TranscoderDecoder(nn.Module):
    """``weight [d, F]`` (the release's ``nn.Linear(F, d)`` shape, stored row per feature, so
    :attr:`W_dec` ``= weight.t()`` is a contiguous ``[F, d]`` view) and ``bias [d]`` or None."""

    def __init__(self, n_features: int, d_model: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = n_features, d_model
        self.weight = nn.Parameter(torch.empty(n_features, d_model, dtype=dtype, device=device).t())
        self.bias = nn.Parameter(torch.empty(d_model, dtype=dtype, device=device)) if bias else None
        # False when something else owns the weight's memory (FSDP, which needs it contiguous as
        # [d, F]): the layout is then left alone and the sparse decode reads the transpose view
        self.row_per_feature = True
        self._register_state_dict_hook(_export_contiguous_weight)
        self.register_load_state_dict_post_hook(_relayout_after_load)

    @property
    def W_dec(self) -> Tensor:
        """``[F, d]`` row per feature (a view of ``weight``; contiguous unless the layout was lost)."""
        return self.weight.t()

    def has_layout(self) -> bool:
        return self.weight.t().is_contiguous()

    @torch.no_grad()
    def ensure_layout_(self) -> "TranscoderDecoder":
        """Give ``weight`` its row-per-feature memory again (in place: the Parameter object, its
        ``requires_grad`` and any optimizer state keyed on it stay)."""
        w = self.weight
        if self.row_per_feature and not w.t().is_contiguous() and w.device.type != "meta":
            w.data = _row_per_feature(w.data)
        return self

    def forward(self, f: Tensor) -> Tensor:  # dense decode, for analysis
        return nn.functional.linear(f, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"n_features={self.in_features}, d_model={self.out_features}, bias={self.bias is not None}"


def _relayout_after_load(module: TranscoderDecoder, _incompatible_keys) -> None:
    module.ensure_layout_()  # load_state_dict(assign=True) replaces the weight


def _export_contiguous_weight(module, state_dict, prefix, local_metadata):
    """Export the decoder weight as a contiguous ``[d, F]`` tensor (the release's memory layout
    too), unless the caller asked for the Parameters themselves (keep_vars)."""
    key = prefix + "weight"
    t = state_dict.get(key)
    if t is not None and not isinstance(t, nn.Parameter) and not t.is_contiguous():
        state_dict[key] = t.contiguous()
    return state_dict


class AdapterTranscoder(Transcoder):
    """A :class:`~tckernels.nn.Transcoder` (``d_in == d_out == d_model``, ``dec_init="zero"``, no
    skip or pre-encoder bias) whose weights are stored under the transcoder-adapter checkpoint
    names (see the module docstring). ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and
    ``log_threshold`` are views of them, so every method of ``Transcoder`` works unchanged.

    The dead-feature counter ``tokens_since_fired`` is not saved with the model (the release's
    checkpoints have none) and is not advanced by the forward (see ``counts_fired_in_forward``).
    """

    counts_fired_in_forward = False
    W_skip = None
    b_pre = None
    threshold = None  # BatchTopK only, which an adapter does not offer

    def __init__(self, d_model: int, n_features: int, activation: str = "relu", *, dtype=None, device=None,
                 init: bool = True, **options):
        super().__init__(d_model, n_features, d_model, activation, dec_init="zero", dtype=dtype, device=device,
                         init=init, **options)

    def _init_parameters(self, dtype, device) -> None:
        cfg = self._cfg
        if cfg.skip or cfg.pre_bias or cfg.dec_init != "zero" or cfg.out_dim != cfg.d_in:
            raise ValueError("a transcoder adapter has d_out == d_in, dec_init='zero', no skip and no pre_bias")
        self.transcoder_enc = TranscoderEncoder(cfg.d_in, cfg.n_features, dtype=dtype, device=device)
        self.transcoder_dec = TranscoderDecoder(cfg.n_features, cfg.d_in, bias=cfg.dec_bias, dtype=dtype, device=device)
        if cfg.activation == "jumprelu":
            theta = math.log(cfg.jumprelu_threshold)
            self.transcoder_log_threshold = nn.Parameter(torch.full((cfg.n_features,), theta, dtype=dtype, device=device))
        else:
            self.transcoder_log_threshold = None
        self.register_buffer(
            "tokens_since_fired", torch.zeros(cfg.n_features, dtype=torch.int64, device=device), persistent=False
        )

    @property
    def W_enc(self) -> Tensor:
        return self.transcoder_enc.weight

    @property
    def b_enc(self) -> Tensor:
        return self.transcoder_enc.bias

    @property
    def W_dec(self) -> Tensor:
        """``[F, d]`` row per feature (a view of ``transcoder_dec.weight``)."""
        return self.transcoder_dec.weight.t()

    @property
    def b_dec(self) -> Optional[Tensor]:
        return self.transcoder_dec.bias

    @property
    def log_threshold(self) -> Optional[Tensor]:
        return self.transcoder_log_threshold

    def checkpoint_parameters(self) -> dict:
        """``{checkpoint name: Parameter}`` of the parameters this transcoder has."""
        ps = {
            "transcoder_enc.weight": self.transcoder_enc.weight,
            "transcoder_enc.bias": self.transcoder_enc.bias,
            "transcoder_dec.weight": self.transcoder_dec.weight,
            "transcoder_dec.bias": self.transcoder_dec.bias,
            "transcoder_log_threshold": self.transcoder_log_threshold,
        }
        return {k: p for k, p in ps.items() if p is not None}

    @torch.no_grad()
    def reset_parameters(self, seed: Optional[int] = None, only=None) -> None:
        """``Transcoder.reset_parameters``; ``only`` may also name checkpoint keys
        (``"transcoder_dec.weight"``)."""
        if only is not None:
            only = {CHECKPOINT_NAMES.get(name, name) for name in only}
        super().reset_parameters(seed=seed, only=only)
        self.transcoder_dec.ensure_layout_()

    def decode(self, acts: SparseActivations, x: Optional[Tensor] = None) -> Tensor:
        dec = self.transcoder_dec
        if dec.row_per_feature and not dec.has_layout() and not torch.compiler.is_compiling():
            dec.ensure_layout_()  # once, after a loader replaced the weight (eager mode only)
        return super().decode(acts, x)
