"""Cross-layer transcoder (CLT): features read at layer ℓ write to every layer ℓ' ≥ ℓ.

With ``L`` layers, ``N`` features per layer and per-layer inputs ``x_ℓ [..., d_in]``::

    f_ℓ  = act(x_ℓ @ W_enc[ℓ]ᵀ + b_enc[ℓ])                       (sparse, [..., k] slots)
    y_ℓ' = Σ_{ℓ ≤ ℓ'} f_ℓ @ W_dec[ℓ → ℓ'] + b_dec[ℓ'] (+ x_ℓ' @ W_skip[ℓ']ᵀ)

Layout: each source layer ℓ is a :class:`~tckernels.nn.transcoder.Transcoder` (``self.layers[ℓ]``,
``dec_bias=False``, no skip) whose decoder ``W_dec [N, (L−ℓ)·d_out]`` holds, for every feature, its
blocks for all target layers ℓ, ℓ+1, ..., L−1 side by side, i.e.
``W_dec.view(N, L−ℓ, d_out)[:, t] = W_dec[ℓ → ℓ+t]``. One gather over that concatenated row (one
``tckernels.sparse_decode`` call per source layer, or the dense path when rows are not sparse)
therefore produces the source's contribution to every target at once; the result is split by
target and summed. Encoders, activations (TopK, BatchTopK, ReLU, JumpReLU), sparse backward,
dead-feature tracking and decoder-norm handling are the ``Transcoder``'s. Output biases
``b_dec [L, d_out]`` and the optional skip ``W_skip [L, d_out, d_in]`` belong to the target layers.

This is the layout circuit-tracer uses for its CLTs (``W_dec_ℓ [N, L−ℓ, d_model]``), so
:func:`tckernels.nn.formats.save_circuit_tracer_clt` writes it without copying blocks around.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from tckernels.nn import metrics as _metrics
from tckernels.nn.activations import SparseActivations
from tckernels.nn.transcoder import Transcoder

__all__ = ["CrossLayerTranscoder", "CrossLayerOutput"]

Inputs = Union[Tensor, Sequence[Tensor]]


def fold_target_blocks(decoded: Sequence[Tensor], d_out: int) -> List[Tensor]:
    """Per-target sums of the sources' decoded blocks: source ``src``'s ``[..., (L - src) * d_out]``
    holds its contributions to targets ``src .. L - 1``, in order."""
    L = len(decoded)
    outs: List[Optional[Tensor]] = [None] * L
    for src, y in enumerate(decoded):
        for t, part in enumerate(y.unflatten(-1, (L - src, d_out)).unbind(-2)):
            j = src + t
            outs[j] = part if outs[j] is None else outs[j] + part
    return outs


class CrossLayerOutput(NamedTuple):
    outputs: List[Tensor]  # per layer [..., d_out]
    acts: List[SparseActivations]  # per layer [..., w_ℓ]
    # "loss", "mse", "fvu" (means over layers); where they apply "sparsity", "l0", "pre_act" (sums
    # over source layers) and "auxk" (mean over source layers)
    losses: Dict[str, Tensor]
    metrics: Dict[str, Tensor]  # detached: "l0" (summed over layers), "mse", "fvu", "dead_features", "n_tokens"


class CrossLayerTranscoder(nn.Module):
    """Cross-layer transcoder over ``n_layers`` layers; see the module docstring.

    Arguments as for :class:`~tckernels.nn.transcoder.Transcoder` (``k``, ``pre_bias``,
    ``normalize_decoder``, ``k_max``, ``jumprelu_threshold``, ``l1_coefficient``, ...), applied to
    every source layer; ``skip`` and ``dec_bias`` are per target layer. ``d_out`` defaults to
    ``d_in``. ``dec_init="transpose"`` is not available (a decoder row spans several layers).

    ``forward(xs)`` takes the per-layer inputs as a sequence of ``L`` tensors ``[..., d_in]`` (all of
    one shape) or one stacked tensor ``[L, ..., d_in]`` and returns the per-layer outputs in the
    same form (a list, or a stacked ``[L, ..., d_out]`` tensor).
    """

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        n_features_per_layer: int,
        d_out: Optional[int] = None,
        activation: str = "topk",
        *,
        k: Optional[int] = None,
        skip: bool = False,
        dec_bias: bool = True,
        dtype: Optional[torch.dtype] = None,
        device=None,
        **transcoder_kwargs,
    ):
        super().__init__()
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        d_out = d_in if d_out is None else d_out
        if isinstance(d_out, bool) or not isinstance(d_out, int) or d_out < 1:
            raise ValueError(f"d_out must be a positive int, got {d_out!r}")
        if transcoder_kwargs.get("dec_init") == "transpose":
            raise ValueError("dec_init='transpose' is not available for a cross-layer transcoder")
        for name in ("d_out", "skip", "dec_bias"):
            transcoder_kwargs.pop(name, None)
        self.n_layers, self.d_in, self.n_features, self.d_out = n_layers, d_in, n_features_per_layer, d_out
        self.activation = activation
        self.k = k
        fk = dict(dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            Transcoder(
                d_in, n_features_per_layer, (n_layers - src) * d_out, activation,
                k=k, skip=False, dec_bias=False, **fk, **transcoder_kwargs,
            )
            for src in range(n_layers)
        )
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out, **fk)) if dec_bias else None
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_out, d_in, **fk)) if skip else None

    def extra_repr(self) -> str:
        s = (
            f"n_layers={self.n_layers}, d_in={self.d_in}, n_features_per_layer={self.n_features}, "
            f"d_out={self.d_out}, activation={self.activation!r}"
        )
        if self.k is not None:
            s += f", k={self.k}"
        if self.W_skip is not None:
            s += ", skip=True"
        return s

    # ---------------------------------------------------------------------------------------------
    # weights
    # ---------------------------------------------------------------------------------------------

    def decoder_weight(self, source: int, target: Optional[int] = None) -> Tensor:
        """Decoder of ``source``'s features as a view: ``[N, L − source, d_out]`` (all targets), or
        ``[N, d_out]`` for one ``target ≥ source``."""
        self._check_layer(source, "source")
        W = self.layers[source].W_dec.view(self.n_features, self.n_layers - source, self.d_out)
        if target is None:
            return W
        self._check_layer(target, "target")
        if target < source:
            raise ValueError(f"features of layer {source} do not write to earlier layer {target}")
        return W[:, target - source]

    @property
    def l1_coefficient(self) -> float:
        """Weight of the sparsity term in ``forward_with_aux``'s loss; setting it (a finite float
        >= 0) sets every source layer's, so a training loop can ramp it."""
        return self.layers[0].l1_coefficient

    @l1_coefficient.setter
    def l1_coefficient(self, value: float) -> None:
        first = self.layers[0]
        first.l1_coefficient = value  # validates before any layer changes
        for layer in self.layers[1:]:
            layer.l1_coefficient = first.l1_coefficient

    def _check_layer(self, i: int, name: str) -> None:
        if not isinstance(i, int) or not 0 <= i < self.n_layers:
            raise IndexError(f"{name} layer must be in [0, {self.n_layers}), got {i!r}")

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Unit-norm every feature's whole decoder row (all its target blocks together)."""
        for layer in self.layers:
            layer.normalize_decoder_()

    @torch.no_grad()
    def remove_parallel_gradient_(self) -> None:
        for layer in self.layers:
            layer.remove_parallel_gradient_()

    # ---------------------------------------------------------------------------------------------
    # encode / decode
    # ---------------------------------------------------------------------------------------------

    def _split(self, xs: Inputs, name: str = "xs") -> List[Tensor]:
        if isinstance(xs, Tensor):
            if xs.dim() < 2 or xs.shape[0] != self.n_layers:
                raise ValueError(
                    f"{name} must be [n_layers={self.n_layers}, ..., d] when stacked, got shape {tuple(xs.shape)}"
                )
            return list(xs.unbind(0))
        xs = list(xs)
        if len(xs) != self.n_layers:
            raise ValueError(f"{name} must hold one tensor per layer ({self.n_layers}), got {len(xs)}")
        for i, x in enumerate(xs):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(x).__name__}")
            if x.shape != xs[0].shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but {name}[0] has {tuple(xs[0].shape)}")
        return xs

    def encode(self, xs: Inputs, mask: Optional[Tensor] = None) -> List[SparseActivations]:
        """Per-layer sparse activations ``[..., w_ℓ]`` (``w_ℓ = k`` for TopK)."""
        return [layer.encode(x, mask) for layer, x in zip(self.layers, self._split(xs))]

    def decode(self, acts: Sequence[SparseActivations], xs: Optional[Inputs] = None) -> List[Tensor]:
        """Per-layer sparse activations -> the list of per-layer outputs ``[..., d_out]``.
        ``xs`` (the inputs) is needed for the skip term only."""
        acts = list(acts)
        if len(acts) != self.n_layers:
            raise ValueError(f"acts must hold one entry per layer ({self.n_layers}), got {len(acts)}")
        # one gather per source over its concatenated target blocks: [..., (L - src) * d_out]
        outs = fold_target_blocks([layer.decode(a) for layer, a in zip(self.layers, acts)], self.d_out)
        if self.b_dec is not None:
            outs = [o + self.b_dec[j] for j, o in enumerate(outs)]
        if self.W_skip is not None:
            if xs is None:
                raise ValueError("this transcoder has skip connections: decode(acts, xs) needs the inputs")
            xs_l = self._split(xs)
            outs = [o + x @ self.W_skip[j].t() for j, (o, x) in enumerate(zip(outs, xs_l))]
        return outs

    def forward(self, xs: Inputs) -> Union[Tensor, List[Tensor]]:
        xs_l = self._split(xs)
        outs = self.decode(self.encode(xs_l), xs_l)
        return torch.stack(outs) if isinstance(xs, Tensor) else outs

    def sparsity_term(self, acts: Sequence[SparseActivations], mask: Optional[Tensor] = None) -> Tensor:
        """``Σ_ℓ Σ_i f_ℓi·‖W_dec_ℓ[i]‖₂`` (whole concatenated decoder rows), mean over real tokens;
        each source's :meth:`Transcoder.sparsity_term`, so the tanh form when the config has
        ``sparsity_tanh_scale``."""
        return sum(layer.sparsity_term(a, mask) for layer, a in zip(self.layers, acts))

    def forward_with_aux(self, xs: Inputs, targets: Inputs, mask: Optional[Tensor] = None) -> CrossLayerOutput:
        """Forward pass with the training objective; ``mask`` (bool ``[...]``) marks real tokens.

        ``losses["loss"]`` is the per-layer reconstruction (``mse`` / ``fvu``, each the mean over
        target layers; ``reconstruction_loss`` of the config picks the one in ``loss``) plus, with
        the config's coefficients, these terms of the source layers ``self.layers[ℓ]``:

        - ``l1_coefficient·sparsity``, :meth:`sparsity_term` (summed over sources; the tanh form
          when ``sparsity_tanh_scale`` is set);
        - ``l0_coefficient·l0`` (JumpReLU): the straight-through L0 term, summed over sources;
        - ``pre_act_coefficient·pre_act``: :meth:`Transcoder.pre_act_loss`, summed over sources;
        - ``aux_coefficient·auxk``: AuxK, mean over sources, where source ℓ's dead features (those
          dead before this batch) reconstruct the residual of its whole decoder row, the
          concatenation over targets j ≥ ℓ of ``(target_j − output_j)`` (detached).
        """
        xs_l = self._split(xs)
        ts = self._split(targets, "targets")
        lead = xs_l[0].shape[:-1]
        if tuple(ts[0].shape) != (*lead, self.d_out):
            raise ValueError(f"targets must be [..., d_out] = {(*lead, self.d_out)} per layer, got {tuple(ts[0].shape)}")
        first = self.layers[0]
        cfg = first._cfg
        aux_coef = cfg.aux_coefficient
        dead = [layer.dead_mask() for layer in self.layers] if aux_coef > 0 else None  # before this batch
        encoded = [layer._encode(x, mask) for layer, x in zip(self.layers, xs_l)]
        acts = [a for a, _ in encoded]
        outs = self.decode(acts, xs_l)
        losses: Dict[str, Tensor] = {
            "mse": torch.stack([_metrics.mse(o, t, mask) for o, t in zip(outs, ts)]).mean(),
            "fvu": torch.stack([_metrics.fvu(o, t, mask) for o, t in zip(outs, ts)]).mean(),
        }
        per_source = [layer._regularizers(x, a, extra, mask) for layer, x, (a, extra) in zip(self.layers, xs_l, encoded)]
        terms = {name: sum(t[name] for t in per_source) for name in per_source[0]}
        losses.update(terms)
        # every source shares the config, so its coefficients weight the sums
        total = first._weighted_regularizers(losses[cfg.reconstruction_loss], terms)
        if aux_coef > 0:
            residuals = [(t - o).detach() for t, o in zip(ts, outs)]
            auxk = [
                layer.auxk_loss(x, torch.cat(residuals[src:], dim=-1), dead[src], mask, extra.get("pre"))
                for src, (layer, x, (_, extra)) in enumerate(zip(self.layers, xs_l, encoded))
            ]
            losses["auxk"] = torch.stack(auxk).mean()
            total = total + aux_coef * losses["auxk"]
        losses["loss"] = total
        metrics = {
            "l0": sum(_metrics.l0(a.values.detach(), mask) for a in acts),
            "mse": losses["mse"].detach(),
            "fvu": losses["fvu"].detach(),
            "dead_features": sum(
                _metrics.count_dead(layer.tokens_since_fired, layer.config.dead_tokens_threshold) for layer in self.layers
            ),
            "n_tokens": _metrics.n_tokens(lead, mask),
        }
        return CrossLayerOutput(outs, acts, losses, metrics)
