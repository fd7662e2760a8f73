"""The adapters' feature activations: recording them, and the statistics computed from them.

:func:`record_features` collects, through each adapter's feature hook, the encoder's activations
(before any intervention) of every forward inside a ``with`` block and returns them in a
:class:`FeatureRecorder`. The statistics take that recorder, so they always say which forward they
describe:

    with record_features(model, grad=True) as rec:
        out = model(input_ids, attention_mask=attention_mask)
    loss = out_loss + l1 * sparsity_loss(rec, attention_mask)    # the paper's S, differentiable
    stats = adapter_stats(rec, attention_mask)                   # L0, dead features (counted in)

``mask``: bool or 0/1 tensor with the tokens' leading shape (e.g. the attention mask) marking the
real tokens; statistics count those only. Activation checkpointing re-runs a layer's forward during
backward; a backward outside the ``with`` block is not recorded.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from tckernels.models.adapter import TranscoderAdapterMLP
from tckernels.models.surgery import check_layers, selected_adapters
from tckernels.nn import metrics as _metrics
from tckernels.nn.activations import SparseActivations, to_dense

__all__ = [
    "FeatureRecorder",
    "record_features",
    "sparsity_loss",
    "l0_per_layer",
    "fired_features",
    "update_feature_stats_",
    "dead_feature_counts",
    "adapter_stats",
]

Layers = Optional[Iterable[int]]


# ------------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------------


def _keep(t: Tensor) -> Tensor:
    return t


class FeatureRecorder:
    """Activations recorded by :func:`record_features`.

    ``records[layer]``: one :class:`SparseActivations` ``(values [..., w], indices [..., w])``
    per forward call (the encoder's output before interventions; padded slots have value 0; ``w``
    may differ between calls); values are detached unless recorded with ``grad=True``.
    ``adapters[layer]``: the adapter module of that layer.
    With ``grad=True`` each record's per-token sparsity term (the transcoder's
    ``sparsity_per_token``) is computed in the hook too, while the layer's weights are in hand:
    under FSDP they are gathered for the layer's forward only.
    """

    def __init__(self, adapters: Dict[int, TranscoderAdapterMLP], to_cpu: bool, grad: bool):
        self.adapters = adapters
        self.layers = list(adapters)
        self.n_features = {i: m.n_features for i, m in adapters.items()}
        self.to_cpu = to_cpu
        self.grad = grad
        self.records: Dict[int, List[SparseActivations]] = {i: [] for i in adapters}
        self.sparsity: Dict[int, List[Tensor]] = {i: [] for i in adapters}

    def _hook(self, layer: int):
        def hook(adapter, acts: SparseActivations):
            values, indices = acts
            if self.grad:
                # saved as usual, not by an activation checkpoint around the layer: its recomputation
                # runs without this hook and must save what the first run saved
                with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                    self.sparsity[layer].append(adapter.transcoder.sparsity_per_token(acts))
            else:
                values = values.detach()
            if self.to_cpu:
                values, indices = values.cpu(), indices.cpu()
            self.records[layer].append(SparseActivations(values, indices))

        return hook

    def _check(self, layer: int) -> List[SparseActivations]:
        check_layers([layer], self.layers, "layer", among="recorded layers")
        recs = self.records[layer]
        if not recs:
            raise RuntimeError(f"nothing was recorded at layer {layer} (no forward pass with its adapter on)")
        return recs

    def recorded_layers(self) -> List[int]:
        """The layers with at least one record (an adapter that was off records nothing)."""
        return [i for i in self.layers if self.records[i]]

    def tokens(self, layer: int, dim: int = -2) -> SparseActivations:
        """Every call's activations at ``layer`` joined along the token dimension ``dim`` of the
        inputs (default -2: the sequence of ``[batch, seq, d]`` inputs, so a ``generate`` gives
        ``[batch, prompt + new tokens, w]``), padded to the widest call; one call's as recorded."""
        recs = self._check(layer)
        if len(recs) == 1:
            return recs[0]
        w = max(r.values.shape[-1] for r in recs)
        vs, ids = [], []
        for v, i in recs:
            pad = w - v.shape[-1]
            if pad:
                v = torch.nn.functional.pad(v, (0, pad))
                i = torch.nn.functional.pad(i, (0, pad))
            vs.append(v)
            ids.append(i)
        return SparseActivations(torch.cat(vs, dim), torch.cat(ids, dim))

    def sparsity_per_token(self, layer: int, dim: int = -2) -> Tensor:
        """Every call's per-token sparsity term at ``layer`` (recorded with ``grad=True``), joined
        along ``dim`` of the inputs' leading shape as :meth:`tokens` joins the activations."""
        self._check(layer)
        if not self.grad:
            raise RuntimeError("sparsity_per_token needs a recording made with grad=True")
        parts = self.sparsity[layer]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim + 1 if dim < 0 else dim)

    def dense(self, layer: int, dim: int = -2) -> Tensor:
        """:meth:`tokens` scattered into dense ``[..., n_features]`` activations."""
        return to_dense(self.tokens(layer, dim), self.n_features[layer])

    def active(self, layer: int, dim: int = -2) -> List[List[Tuple[int, float]]]:
        """Per token (flattened in order), the list of ``(feature, value)`` active there."""
        v, i = self.tokens(layer, dim)
        v2, i2 = v.detach().reshape(-1, v.shape[-1]).cpu(), i.reshape(-1, i.shape[-1]).cpu()
        out = []
        for row_v, row_i in zip(v2.tolist(), i2.tolist()):
            out.append([(f, x) for f, x in zip(row_i, row_v) if x != 0])
        return out


@contextmanager
def record_features(
    model: nn.Module, layers: Layers = None, *, to_cpu: bool = False, grad: bool = False
) -> Iterator[FeatureRecorder]:
    """Record the adapters' feature activations at ``layers`` (default: all) for every forward
    inside the block (a plain forward, or each step of ``generate``)::

        with record_features(model, layers=[3]) as rec:
            model.generate(ids, max_new_tokens=20)
        values, indices = rec.tokens(3)      # [batch, prompt + 19, w]

    ``to_cpu``: move each record to the CPU as it is made (frees device memory on long runs).
    ``grad``: keep the values differentiable (for a loss such as :func:`sparsity_loss`).
    """
    mods = selected_adapters(model, layers)
    rec = FeatureRecorder(mods, to_cpu, grad)
    handles = [m.register_feature_hook(rec._hook(i)) for i, m in mods.items()]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# statistics of recorded activations
# ------------------------------------------------------------------------------------------------


def _recorder(features, what: str) -> FeatureRecorder:
    if not isinstance(features, FeatureRecorder):
        raise TypeError(
            f"{what} takes the FeatureRecorder of `with record_features(model) as rec:` around the "
            f"forward it describes, got {type(features).__name__}"
        )
    return features


def _as_mask(mask: Optional[Tensor], lead, device) -> Optional[Tensor]:
    if mask is None:
        return None
    return _metrics.check_mask(mask.to(device) if isinstance(mask, Tensor) else mask, lead, "mask").reshape(lead)


def _layer_acts(rec: FeatureRecorder, mask, layers: Layers):
    """``{layer: (adapter, acts, mask on the acts' device)}`` for the recorded layers."""
    chosen = check_layers(layers, rec.layers, "layers", among="recorded layers") if layers is not None else rec.layers
    out = {}
    for i in chosen:
        if rec.records[i]:
            acts = rec.tokens(i)
            out[i] = (rec.adapters[i], acts, _as_mask(mask, acts.values.shape[:-1], acts.values.device))
    return out


def sparsity_loss(features: FeatureRecorder, mask: Optional[Tensor] = None, layers: Layers = None) -> Tensor:
    """Σ over layers of each adapter transcoder's ``sparsity_term`` (the paper's S: Σ_i
    f_i·‖W_dec[i]‖₂ per token, mean over real tokens) of the recorded forward; differentiable in
    W_dec, and in the encoder when recorded with ``grad=True``. 0 when nothing was recorded."""
    rec = _recorder(features, "sparsity_loss")
    total = None
    for mlp, acts, m in _layer_acts(rec, mask, layers).values():
        t = mlp.transcoder.sparsity_term(acts, m)
        total = t if total is None else total + t.to(total.device)
    if total is None:
        ref = next(iter(rec.adapters.values())).W_enc
        return torch.zeros((), dtype=torch.promote_types(ref.dtype, torch.float32), device=ref.device)
    return total


def l0_per_layer(features: FeatureRecorder, mask: Optional[Tensor] = None, layers: Layers = None) -> Dict[int, Tensor]:
    """``{layer: mean active features per real token}`` of the recorded forward (0-d tensors)."""
    rec = _recorder(features, "l0_per_layer")
    return {i: _metrics.l0(acts.values.detach(), m) for i, (_, acts, m) in _layer_acts(rec, mask, layers).items()}


def fired_features(features: FeatureRecorder, mask: Optional[Tensor] = None, layers: Layers = None) -> Dict[int, Tensor]:
    """``{layer: [F] bool}``: the features active on at least one real token of the recorded forward."""
    rec = _recorder(features, "fired_features")
    out = {}
    for i, (mlp, acts, m) in _layer_acts(rec, mask, layers).items():
        v = acts.values.detach()
        out[i] = _metrics.feature_fire_counts(v, acts.indices, mlp.n_features, m) > 0
    return out


def update_feature_stats_(features: FeatureRecorder, mask: Optional[Tensor] = None, layers: Layers = None) -> None:
    """Count the recorded forward's real tokens into each adapter's dead-feature counter (reset for
    the features that fired). Call once per training batch, with the recorder of the forward that counts."""
    rec = _recorder(features, "update_feature_stats_")
    for mlp, acts, m in _layer_acts(rec, mask, layers).values():
        mlp.update_feature_stats_(acts, m)


def dead_feature_counts(model: nn.Module, threshold: int, layers: Layers = None) -> Dict[int, Tensor]:
    """``{layer: number of features that have not fired in the last threshold real tokens}``."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be a positive int, got {threshold!r}")
    return {i: m.dead_features(threshold).sum() for i, m in selected_adapters(model, layers).items()}


def adapter_stats(
    features: FeatureRecorder,
    mask: Optional[Tensor] = None,
    *,
    layers: Layers = None,
    dead_thresholds: Iterable[int] = (100, 1000),
    update: bool = True,
) -> Dict[str, Tensor]:
    """Per-layer and averaged statistics, as 0-d tensors (no host synchronisation):
    ``l0/layer_{i}`` and ``l0`` (mean over the recorded layers) of the recorded forward,
    ``dead_{t}/layer_{i}`` and ``dead_{t}`` (mean over layers) for each threshold t in real
    tokens, after counting the recorded forward in (``update=True``)."""
    rec = _recorder(features, "adapter_stats")
    if update:
        update_feature_stats_(rec, mask, layers)
    out: Dict[str, Tensor] = {}
    l0s = l0_per_layer(rec, mask, layers)
    for i, v in l0s.items():
        out[f"l0/layer_{i}"] = v
    if l0s:
        out["l0"] = torch.stack([v.to(next(iter(l0s.values())).device) for v in l0s.values()]).mean()
    chosen = check_layers(layers, rec.layers, "layers", among="recorded layers") if layers is not None else rec.layers
    for t in dead_thresholds:
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"dead_thresholds must hold positive ints, got {t!r}")
        dead = {i: rec.adapters[i].dead_features(t).sum() for i in chosen}
        for i, v in dead.items():
            out[f"dead_{t}/layer_{i}"] = v
        if dead:
            dev = next(iter(dead.values())).device
            out[f"dead_{t}"] = torch.stack([v.to(dev) for v in dead.values()]).float().mean()
    return out
