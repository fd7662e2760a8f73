"""Bilinear (Hadamard) MLP replacements, as in the Pythia-410m bilinear transcoders.

Two layouts are provided:

* :class:`BilinearTranscoder` is the ``Bilinear`` class published with those checkpoints
  (parameters ``W_left`` and ``W_right``, the names in the checkpoints' ``model_state_dict``).
* :class:`BilinearMLP` is the layout of the original bilinear-MLP code: ``left``, ``right`` and
  ``head``, with forward ``head(left(x) ⊙ right(x))``.

Neither builds an ``[..., n_inputs, n_hidden]`` tensor; see :class:`BilinearTranscoder` for what the
published class computes and why the fast form equals it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["BilinearTranscoder", "BilinearMLP"]


class BilinearTranscoder(nn.Module):
    r"""The release's ``Bilinear`` transcoder, computed without its ``[..., n_in, n_hidden]`` intermediate.

    The published class is::

        right = W_right(x)                                   # [..., n_hidden]
        hadamard = x.unsqueeze(-1) * right.unsqueeze(-2)     # [..., n_inputs, n_hidden]
        return W_left(hadamard.sum(dim=-2))                  # [..., n_outputs]

    ``hadamard[..., i, h] = x[..., i] · right[..., h]``, and summing over ``i`` gives
    ``(Σ_i x[..., i]) · right[..., h]``. So the published forward is exactly

    .. math:: y = W_{left}\,\big((\textstyle\sum_i x_i)\,(W_{right}\,x)\big) + b_{left},

    a quadratic form whose "left" factor is the scalar sum of the input. This module computes that
    with ``x.sum(-1, keepdim=True) * W_right(x)``: O(n_hidden) extra memory per token instead of
    O(n_inputs · n_hidden). The two agree up to floating-point summation order (the published code
    sums the products ``x_i · r_h``; this sums ``x_i`` first and multiplies once).

    **The model card's formula differs.** The card documents ``output = W_left @ (x ⊙ (W_right @ x))
    + bias``; with ``x`` of size ``n_inputs`` and ``W_right @ x`` of size ``n_hidden`` that Hadamard
    product is not even defined unless ``n_inputs == n_hidden`` (1024 vs 4096 for these checkpoints).
    The published class is the checkpoints' model: the card's usage code loads their
    ``model_state_dict`` into it and runs it, and it is the only code published with them. So the
    formula above is the one the checkpoints run with; it is what this module reproduces and what
    :func:`tckernels.nn.formats.bilinear_pythia.load_bilinear_pythia` loads into. (Note that it
    makes the map ``y = (Σ_i x_i) · W_left W_right x + b``: a linear map scaled by the input's sum.)

    Parameters (names as in the checkpoints): ``W_left.weight [n_outputs, n_hidden]``,
    ``W_left.bias [n_outputs]`` (if ``bias``), ``W_right.weight [n_hidden, n_inputs]``.
    """

    def __init__(
        self,
        n_inputs: int,
        n_hidden: int,
        n_outputs: int,
        bias: bool = True,
        *,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.n_inputs, self.n_hidden, self.n_outputs, self.bias = n_inputs, n_hidden, n_outputs, bias
        self.W_left = nn.Linear(n_hidden, n_outputs, bias=bias, **kw)
        self.W_right = nn.Linear(n_inputs, n_hidden, bias=False, **kw)

    def hidden(self, x: Tensor) -> Tensor:
        """The ``[..., n_hidden]`` bilinear features: ``(Σ_i x_i) · W_right(x)``."""
        if x.shape[-1] != self.n_inputs:
            raise ValueError(f"x must have last dimension n_inputs = {self.n_inputs}, got shape {tuple(x.shape)}")
        return x.sum(-1, keepdim=True) * self.W_right(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.W_left(self.hidden(x))

    def extra_repr(self) -> str:
        return f"n_inputs={self.n_inputs}, n_hidden={self.n_hidden}, n_outputs={self.n_outputs}, bias={self.bias}"


class BilinearMLP(nn.Module):
    """Bilinear MLP in the original code's layout: ``head(left(x) ⊙ right(x))``.

    ``left`` and ``right`` are ``Linear(n_inputs, n_hidden)``, ``head`` is ``Linear(n_hidden, n_outputs)``.
    ``bias`` sets the biases of ``left`` and ``right``; ``head_bias`` that of ``head`` (default: ``bias``).
    The element-wise product is ``[..., n_hidden]``; no outer product is formed.
    """

    def __init__(
        self,
        n_inputs: int,
        n_hidden: int,
        n_outputs: int,
        bias: bool = False,
        *,
        head_bias: Optional[bool] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        head_bias = bias if head_bias is None else head_bias
        self.n_inputs, self.n_hidden, self.n_outputs = n_inputs, n_hidden, n_outputs
        self.left = nn.Linear(n_inputs, n_hidden, bias=bias, **kw)
        self.right = nn.Linear(n_inputs, n_hidden, bias=bias, **kw)
        self.head = nn.Linear(n_hidden, n_outputs, bias=head_bias, **kw)

    def hidden(self, x: Tensor) -> Tensor:
        """The ``[..., n_hidden]`` features ``left(x) ⊙ right(x)``."""
        if x.shape[-1] != self.n_inputs:
            raise ValueError(f"x must have last dimension n_inputs = {self.n_inputs}, got shape {tuple(x.shape)}")
        return self.left(x) * self.right(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))

    def extra_repr(self) -> str:
        return f"n_inputs={self.n_inputs}, n_hidden={self.n_hidden}, n_outputs={self.n_outputs}"
