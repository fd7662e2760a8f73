"""topk_relu on Triton: row top-k of pre + bias, ReLU on the selected values.

Two kernels (see _select.py): stage 1 reads [BM, BN] tiles of ``pre``, adds the bias in fp32 and
keeps per row and per column group the CP best entries; stage 2 merges them into the top-k and
flags the rare rows where a group may have held more than it kept; those rows are redone with
lists of k entries (exact by construction).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ._common import check_device, next_pow2
from ._select import MAX_FUSED_K, select_topk


def topk_relu(pre: Tensor, k: int, bias: Optional[Tensor] = None,
              *, span: Optional[int] = None, cp: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Spec: tckernels.backends.reference.topk_relu. float64 and k > 128 use the reference."""
    check_device(pre, bias)
    M, N = pre.shape
    if pre.dtype == torch.float64 or max(8, next_pow2(k)) > MAX_FUSED_K:
        return reference.topk_relu(pre, k, bias)
    if M == 0:
        return pre.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=pre.device)
    return select_topk(pre, None, bias, k, pre.dtype, relu=True, span=span, cp=cp)
