"""The training objective of transcoder adapters, term by term: the objective of the original
transcoder-adapter code (the paper "Transcoder Adapters for Reasoning-Model Diffing").

Per micro-batch, with ``L`` decoder layers, ``A`` the adapted model and ``R`` the reference model::

    loss = lambda_adapt * KL(p_R || p_A) + l1_weight * S + lambda_nmse * NMSE + lambda_bridge * B

* ``KL(p_R || p_A)``: forward KL from the reference's next-token distribution to the adapted
  model's, over the full vocabulary, averaged over the scored positions (the loss mask: position
  ``t`` is scored when token ``t+1`` is a target).
* ``S = sum_layers mean_tokens sum_i f_i * ||W_dec[:, i]||_2``: the decoder-norm-weighted L1 of the
  feature activations f of the adapted model's free run, averaged over every real (non-padding)
  token, prompt tokens included.
* ``NMSE = mean over h in [embeddings, layer 0 .. layer L-1 outputs] of
  mean (h_A - h_R)^2 / (mean h_R^2 + 1e-8)``, means over every real token and the hidden
  dimension, both models running freely (each layer sees its own model's previous layer).
* ``B``: ``n_cutoffs`` cut-offs ``k`` are drawn uniformly without replacement from ``{0..L}``; for
  each, two mixed passes (see ``forward_utils``): the adapted model's layers ``< k`` then the
  reference's, and the reference's layers ``< k`` then the adapted model's. A pass with no adapter
  layer (``k = 0`` in the first, ``k = L`` in the second) is skipped. ``B`` is the *sum* of the
  remaining passes' KL to the reference divided by ``n_cutoffs``: at ``0 < k < L`` both passes count
  in full. (The original logs ``sum / (2 n_cutoffs)`` as its ``bridging/bridge``, half the term it
  trains; the ``bridge`` reported here is ``B`` itself, the term in the loss.)

How the tokens of a micro-batch are pooled (``reduction``): ``"token"`` (the original) takes every
mean above over all the micro-batch's tokens together, so a long sequence weighs more than a short
one; ``"sequence"`` takes each sequence's mean first and then the mean over sequences, so every
sequence weighs the same. The two are equal at one sequence per micro-batch (the original's setting).

The KL is computed over chunks of ``kl_chunk_tokens`` positions by :class:`ChunkedKL`, which forms
the logits of one chunk at a time and produces the gradient with respect to the hidden states in
the same pass; the full ``[tokens, vocab]`` logits never exist, in the forward or the backward.
Softmaxes are taken in float32 (the original takes them in the models' dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tckernels.models import FeatureRecorder, adapter_modules, fired_features, l0_per_layer, record_features
from training import forward_utils as fu


# --------------------------------------------------------------------------------------------------
# KL over the vocabulary, chunked over tokens
# --------------------------------------------------------------------------------------------------
class ChunkedKL(torch.autograd.Function):
    """``sum_n w_n * KL(softmax(h_r[n] W_r^T + b_r) || softmax(h_a[n] W_a^T + b_a))``.

    Gradients flow to ``h_a`` and, when they require it, to ``W_a``/``b_a``; the reference side is a
    constant. ``d KL_n / d logits_a[n] = softmax(logits_a[n]) - softmax(logits_r[n])`` is applied
    chunk by chunk during the forward, so only ``[chunk, vocab]`` tensors ever exist. The logits are
    formed in the models' dtype and the softmaxes taken in float32 (as HF's loss does).
    """

    @staticmethod
    def forward(ctx, h_a, W_a, b_a, h_r, W_r, b_r, weight, chunk: int):
        need_h, need_W, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        N = h_a.shape[0]
        acc = torch.promote_types(h_a.dtype, torch.float32)  # float32, or float64 for float64 inputs
        total = torch.zeros((), dtype=acc, device=h_a.device)
        g_h = torch.empty_like(h_a) if need_h else None
        g_W = torch.zeros(W_a.shape, dtype=acc, device=W_a.device) if need_W else None
        g_b = torch.zeros(b_a.shape, dtype=acc, device=b_a.device) if need_b else None
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            w = weight[s:e].to(acc)
            log_r = F.log_softmax(F.linear(h_r[s:e], W_r, b_r).to(acc), dim=-1)
            log_a = F.log_softmax(F.linear(h_a[s:e], W_a, b_a).to(acc), dim=-1)
            p_r = log_r.exp()
            total += (w * (p_r * (log_r - log_a)).sum(-1)).sum()
            del log_r
            if need_h or need_W or need_b:
                g = log_a.exp_().sub_(p_r).mul_(w[:, None])  # d/d logits_a, in place of log_a
                if need_h:
                    g_h[s:e] = (g.to(W_a.dtype) @ W_a).to(h_a.dtype)
                if need_W:
                    g_W += g.t() @ h_a[s:e].to(acc)
                if need_b:
                    g_b += g.sum(0)
                del g
            del log_a, p_r
        ctx.save_for_backward(g_h, g_W, g_b)
        ctx.dtypes = (h_a.dtype, W_a.dtype, None if b_a is None else b_a.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        g_h, g_W, g_b = ctx.saved_tensors
        dt_h, dt_W, dt_b = ctx.dtypes
        gh = None if g_h is None else (g_h * grad_out.to(g_h.dtype))
        gW = None if g_W is None else (g_W * grad_out).to(dt_W)
        gb = None if g_b is None else (g_b * grad_out).to(dt_b)
        return gh, gW, gb, None, None, None, None, None


def _head_params(head: nn.Module):
    return head.weight, getattr(head, "bias", None)


def chunked_kl(h_a: Tensor, head_a: nn.Module, h_r: Tensor, head_r: nn.Module, weight: Tensor,
               chunk: int = 1024) -> Tensor:
    """``sum_n weight[n] * KL(p_ref[n] || p_adapted[n])`` for final hidden states ``h_a``, ``h_r``
    ``[N, d]`` (the inputs of the heads). Differentiable in ``h_a`` (and trainable head weights)."""
    if h_a.shape != h_r.shape or h_a.dim() != 2:
        raise ValueError(f"h_a {tuple(h_a.shape)} and h_r {tuple(h_r.shape)} must be equal [N, d]")
    W_a, b_a = _head_params(head_a)
    W_r, b_r = _head_params(head_r)
    if W_a.shape != W_r.shape:
        raise ValueError(f"the heads differ in shape: {tuple(W_a.shape)} vs {tuple(W_r.shape)}")
    if h_a.shape[0] == 0:
        return h_a.new_zeros((), dtype=torch.float32) + 0 * h_a.sum()
    return ChunkedKL.apply(h_a, W_a, b_a, h_r.detach(), W_r.detach(), None if b_r is None else b_r.detach(),
                           weight.detach(), int(chunk))


def kl_unchunked(h_a: Tensor, head_a: nn.Module, h_r: Tensor, head_r: nn.Module, weight: Tensor) -> Tensor:
    """The plain formula (all logits at once), for tests and small problems."""
    acc = torch.promote_types(h_a.dtype, torch.float32)
    log_r = F.log_softmax(head_r(h_r).to(acc), -1)
    log_a = F.log_softmax(head_a(h_a).to(acc), -1)
    return (weight.to(acc) * (log_r.exp() * (log_r - log_a)).sum(-1)).sum()


@torch.no_grad()
def kl_and_agreement(h_a: Tensor, head_a: nn.Module, h_r: Tensor, head_r: nn.Module, chunk: int = 1024):
    """Per position ``KL(p_ref || p_adapted)`` and whether the top-1 tokens agree (evaluation)."""
    kls, agree = [], []
    for s in range(0, h_a.shape[0], chunk):
        lr = F.log_softmax(head_r(h_r[s:s + chunk]).float(), -1)
        la = F.log_softmax(head_a(h_a[s:s + chunk]).float(), -1)
        kls.append((lr.exp() * (lr - la)).sum(-1))
        agree.append(lr.argmax(-1) == la.argmax(-1))
    if not kls:
        z = h_a.new_zeros(0)
        return z.float(), z.bool()
    return torch.cat(kls), torch.cat(agree)


# --------------------------------------------------------------------------------------------------
# masks and weights
# --------------------------------------------------------------------------------------------------
REDUCTIONS = ("token", "sequence")
NMSE_EPS = 1e-8  # added to the mean of h_R^2, as in the original


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def sequence_weights(mask: Tensor) -> Tensor:
    """``[B, T]`` float weights: ``1 / (n_b * B')`` on sequence b's selected positions (``B'`` the
    sequences with any), so a weighted sum is the mean over sequences of per-sequence means."""
    m = mask.float()
    n = m.sum(-1, keepdim=True)
    n_seq = (n > 0).sum().clamp_min(1)
    return m / n.clamp_min(1) / n_seq


def mean_weights(mask: Tensor, reduction: str) -> Tensor:
    """``[B, T]`` float weights whose weighted sum is the mean over the selected positions:
    pooled over the micro-batch (``"token"``) or per sequence, then over sequences (``"sequence"``)."""
    _check_reduction(reduction)
    if reduction == "sequence":
        return sequence_weights(mask)
    m = mask.float()
    return m / m.sum().clamp_min(1)


def nmse_per_layer(states_a: list, states_r: list, mask: Tensor, reduction: str = "sequence",
                   eps: float = NMSE_EPS) -> Tensor:
    """``[len(states)]``: for each pair of hidden states ``[B, T, d]``,
    ``mean (a - r)^2 / (mean r^2 + eps)`` with the means over the selected positions and the hidden
    dimension: pooled over the micro-batch (``"token"``), or per sequence and then averaged over the
    sequences with any selected position (``"sequence"``)."""
    _check_reduction(reduction)
    m = mask.float()
    dims = (0, 1) if reduction == "token" else (1,)
    n_el = m.sum(dims) * states_a[0].shape[-1]
    has = (n_el > 0).float()
    n = n_el.clamp_min(1)
    out = []
    for a, r in zip(states_a, states_r):
        r32 = r.detach().float()
        num = ((a.float() - r32).pow(2).sum(-1) * m).sum(dims)
        den = (r32.pow(2).sum(-1) * m).sum(dims)
        ratio = (num / n) / (den / n + eps) * has
        out.append(ratio if reduction == "token" else ratio.sum() / has.sum().clamp_min(1))
    return torch.stack(out)


def sparsity(features: FeatureRecorder, weights: Tensor) -> Tensor:
    """``S`` of the recorded forward: ``sum_layers sum_tokens weights * sum_i f_i ||W_dec[:, i]||``
    with ``weights`` from :func:`mean_weights` over the real tokens."""
    total = torch.zeros((), device=weights.device)
    w = weights.to(torch.float32)
    for i in features.layers:
        per_token = features.sparsity_per_token(i)
        total = total + (per_token * w).sum()
    return total


def sample_cutoffs(n_layers: int, n: int, generator: torch.Generator) -> list:
    """``n`` distinct cut-offs drawn uniformly from ``{0..n_layers}``."""
    if n > n_layers + 1:
        raise ValueError(f"n_cutoffs={n} exceeds the {n_layers + 1} possible cut-offs")
    return sorted(torch.randperm(n_layers + 1, generator=generator)[:n].tolist())


# --------------------------------------------------------------------------------------------------
# the whole objective
# --------------------------------------------------------------------------------------------------
class BridgingObjective(nn.Module):
    """The training loss as a module, so ``DistributedDataParallel`` can wrap it: its parameters are
    the adapted model's (only the adapters are trainable); the frozen reference is held outside the
    module tree (it is never registered, broadcast or synchronised)."""

    def __init__(self, adapted: nn.Module, reference: nn.Module, lambda_adapt: float = 1.0, l1_weight: float = 1e-3,
                 lambda_nmse: float = 1.0, lambda_bridge: float = 2.0, kl_chunk_tokens: int = 1024,
                 gradient_checkpointing: bool = False, reduction: str = "token"):
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        self.adapted = adapted
        self.__dict__["reference"] = reference  # not a submodule
        self.lambda_adapt, self.l1_weight = lambda_adapt, l1_weight
        self.lambda_nmse, self.lambda_bridge = lambda_nmse, lambda_bridge
        self.chunk = kl_chunk_tokens
        self.checkpoint = gradient_checkpointing
        self.A, self.R = fu.stack_of(adapted), fu.stack_of(reference)
        self.adapters = adapter_modules(adapted)
        if not self.adapters:
            raise ValueError("the adapted model has no transcoder adapters")
        if len(self.adapters) != self.A.n_layers:
            raise ValueError("the bridging passes need an adapter on every layer "
                             f"({len(self.adapters)} of {self.A.n_layers} have one)")

    @property
    def n_layers(self) -> int:
        return self.A.n_layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, cutoffs: list,
                track_features: bool = True) -> dict:
        """Returns ``{"loss": differentiable total, "kl", "sparsity", "nmse", "bridge": detached terms,
        "nmse_layers": [L+1], "bridge_passes": {name: KL}, "l0_layers": [L] (active features per real
        token), "n_tokens": real tokens}`` and, with ``track_features``, ``"fired"``: ``[L, F]`` bool,
        the features active on a real token."""
        inputs = fu.BatchInputs(input_ids, attention_mask)
        sel = loss_mask.bool()
        real = attention_mask.bool()
        w = mean_weights(sel, self.reduction)[sel]
        L = self.n_layers

        with torch.no_grad():
            hs_r = fu.free_run(self.R, inputs)
            hr_final = fu.final_hidden(self.R, hs_r[-1])[sel]
        with record_features(self.adapted, grad=True) as feats:  # the free run's features only
            hs_a = fu.free_run(self.A, inputs, checkpoint=self.checkpoint)
        s_term = sparsity(feats, mean_weights(real, self.reduction))
        l0 = torch.stack(list(l0_per_layer(feats, real).values())).float()
        fired = torch.stack(list(fired_features(feats, real).values())) if track_features else None

        ha_final = fu.final_hidden(self.A, hs_a[-1])[sel]
        kl = chunked_kl(ha_final, self.A.lm_head, hr_final, self.R.lm_head, w, self.chunk)
        nmse_layers = nmse_per_layer(hs_a, hs_r, real, self.reduction)
        nmse = nmse_layers.mean()

        passes = {}
        for k in cutoffs:
            if k > 0:  # adapted layers < k, reference layers >= k
                h = fu.mixed_hidden(self.A, self.R, k, inputs, bottom_states=hs_a, checkpoint=self.checkpoint)[sel]
                passes[f"adapted_below_{k}"] = chunked_kl(h, self.R.lm_head, hr_final, self.R.lm_head, w, self.chunk)
            if k < L:  # reference layers < k, adapted layers >= k
                h = fu.mixed_hidden(self.R, self.A, k, inputs, bottom_states=[x.detach() for x in hs_r],
                                    checkpoint=self.checkpoint)[sel]
                passes[f"reference_below_{k}"] = chunked_kl(h, self.A.lm_head, hr_final, self.R.lm_head, w, self.chunk)
        # every pass in full, divided by the number of cut-offs (not by the number of passes)
        bridge = torch.stack(list(passes.values())).sum() / len(cutoffs) if passes else kl.new_zeros(())

        loss = (self.lambda_adapt * kl + self.l1_weight * s_term.float() + self.lambda_nmse * nmse
                + self.lambda_bridge * bridge)
        return {
            "loss": loss,
            "kl": kl.detach(),
            "sparsity": s_term.detach().float(),
            "nmse": nmse.detach(),
            "bridge": bridge.detach(),
            "nmse_layers": nmse_layers.detach(),
            "bridge_passes": {k: v.detach() for k, v in passes.items()},
            "l0_layers": l0,
            "n_tokens": real.sum(),
            "fired": fired,
        }
