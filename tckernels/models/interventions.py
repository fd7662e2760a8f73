"""Working with the adapters of a model: on/off, feature interventions, recording, statistics.

Everything here takes the model (any model with :class:`TranscoderAdapterMLP` layers, see
``tckernels.models.adapter``) and an optional ``layers`` selection (indices of layers that have
adapters; an unknown index raises ``ValueError`` naming ``layers``).

- On/off: :func:`set_adapters_enabled`, and :func:`adapters_enabled` as a context manager.
  Off, a layer computes its original MLP bit for bit.
- Interventions (until removed; each returns a handle with ``.remove()`` that is also a context
  manager): :func:`ablate_features` (f_i = 0), :func:`scale_features` (f_i *= factor),
  :func:`clamp_features` (f_i = value on every token), :func:`steer_features` (add
  ``coefficient·W_dec[i]``, the feature's decoder direction, on every token), and
  :func:`clear_interventions`. ``features`` is an index, a sequence, a tensor, ``"all"``, or a
  dict ``{layer: features}`` for different features per layer.
- Recording: :func:`record_features` collects the encoder's activations (indices and values
  per token per layer, before interventions) of every forward inside the ``with`` block.
- Statistics over real tokens (``mask``: bool or 0/1 tensor with the tokens' leading shape,
  e.g. the attention mask): :func:`sparsity_loss` (the paper's S, summed over layers),
  :func:`l0_per_layer`, :func:`update_feature_stats_` / :func:`dead_feature_counts`, and
  :func:`adapter_stats` which gathers them.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from tckernels.models.adapter import (
    FeatureSpec,
    InterventionHandle,
    TranscoderAdapterMLP,
    _selected_adapters,
    check_layers,
)
from tckernels.nn.activations import SparseActivations

__all__ = [
    "set_adapters_enabled",
    "adapters_enabled",
    "InterventionHandle",
    "ablate_features",
    "scale_features",
    "clamp_features",
    "steer_features",
    "clear_interventions",
    "FeatureRecorder",
    "record_features",
    "sparsity_loss",
    "l0_per_layer",
    "update_feature_stats_",
    "dead_feature_counts",
    "adapter_stats",
]

Layers = Optional[Iterable[int]]


# ------------------------------------------------------------------------------------------------
# on / off
# ------------------------------------------------------------------------------------------------


def set_adapters_enabled(model: nn.Module, enabled: bool, layers: Layers = None) -> None:
    """Turn the adapters of ``layers`` (default: all) on or off."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    for mlp in _selected_adapters(model, layers).values():
        mlp.enabled = enabled
        if not enabled:
            mlp._last = None


@contextmanager
def adapters_enabled(model: nn.Module, enabled: bool = True, layers: Layers = None) -> Iterator[nn.Module]:
    """Context manager: adapters of ``layers`` on (or off) inside the block, previous states after."""
    mods = _selected_adapters(model, layers)
    before = {i: m.enabled for i, m in mods.items()}
    set_adapters_enabled(model, enabled, list(mods))
    try:
        yield model
    finally:
        for i, m in mods.items():
            m.enabled = before[i]


# ------------------------------------------------------------------------------------------------
# interventions
# ------------------------------------------------------------------------------------------------


def _per_layer(model: nn.Module, features, layers: Layers) -> Dict[int, Tuple[TranscoderAdapterMLP, FeatureSpec]]:
    if isinstance(features, Mapping):
        if layers is not None:
            raise ValueError("layers must be None when features is a {layer: features} dict")
        mods = _selected_adapters(model, list(features.keys()))
        return {i: (mods[i], features[i]) for i in mods}
    return {i: (m, features) for i, m in _selected_adapters(model, layers).items()}


def _intervene(model, kind, features, value, layers) -> InterventionHandle:
    targets = _per_layer(model, features, layers)
    entries = []
    try:
        for i, (mlp, feats) in targets.items():
            try:
                h = mlp.add_intervention(kind, feats, value)
            except (ValueError, TypeError) as e:
                raise type(e)(f"layer {i}: {e}") from None
            entries.extend(h._entries)
    except BaseException:
        InterventionHandle(entries).remove()
        raise
    return InterventionHandle(entries)


def ablate_features(model: nn.Module, features: FeatureSpec = "all", layers: Layers = None) -> InterventionHandle:
    """Zero features (default: all of them) at ``layers``. Ablating every feature leaves only the
    decoder bias (none by default), i.e. the same output as the adapters off."""
    return _intervene(model, "zero", features, None, layers)


def scale_features(model: nn.Module, features: FeatureSpec, factor, layers: Layers = None) -> InterventionHandle:
    """Multiply features by ``factor`` (a number or one per feature) at ``layers``."""
    return _intervene(model, "scale", features, factor, layers)


def clamp_features(model: nn.Module, features: FeatureSpec, value, layers: Layers = None) -> InterventionHandle:
    """Set features to ``value`` on every token (active or not) at ``layers``."""
    return _intervene(model, "clamp", features, value, layers)


def steer_features(model: nn.Module, features: FeatureSpec, coefficient, layers: Layers = None) -> InterventionHandle:
    """Add ``coefficient·W_dec[i]`` (feature i's decoder direction) to the layer's output on every
    token, i.e. f_i += coefficient, at ``layers``."""
    return _intervene(model, "add", features, coefficient, layers)


def clear_interventions(model: nn.Module, layers: Layers = None) -> None:
    """Remove every intervention at ``layers`` (default: all)."""
    for mlp in _selected_adapters(model, layers).values():
        mlp.clear_interventions()


# ------------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------------


class FeatureRecorder:
    """Activations recorded by :func:`record_features`.

    ``records[layer]``: one :class:`SparseActivations` ``(values [..., w], indices [..., w])``
    per forward call (the encoder's output before interventions, detached; padded slots have
    value 0; ``w`` may differ between calls).
    """

    def __init__(self, layers: List[int], n_features: Dict[int, int], to_cpu: bool):
        self.layers = layers
        self.n_features = n_features
        self.to_cpu = to_cpu
        self.records: Dict[int, List[SparseActivations]] = {i: [] for i in layers}

    def _sink(self, layer):
        def sink(_idx, values, indices):
            if self.to_cpu:
                values, indices = values.cpu(), indices.cpu()
            self.records[layer].append(SparseActivations(values, indices))

        return sink

    def _check(self, layer: int) -> List[SparseActivations]:
        check_layers([layer], self.layers, "layer")
        recs = self.records[layer]
        if not recs:
            raise RuntimeError(f"nothing was recorded at layer {layer} (no forward pass with its adapter on)")
        return recs

    def tokens(self, layer: int, dim: int = -2) -> SparseActivations:
        """Every call's activations at ``layer`` joined along the token dimension ``dim`` of the
        inputs (default -2: the sequence of ``[batch, seq, d]`` inputs, so a ``generate`` gives
        ``[batch, prompt + new tokens, w]``), padded to the widest call."""
        recs = self._check(layer)
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

    def dense(self, layer: int, dim: int = -2) -> Tensor:
        """:meth:`tokens` scattered into dense ``[..., n_features]`` activations."""
        from tckernels.nn.activations import to_dense

        return to_dense(self.tokens(layer, dim), self.n_features[layer])

    def active(self, layer: int, dim: int = -2) -> List[List[Tuple[int, float]]]:
        """Per token (flattened in order), the list of ``(feature, value)`` active there."""
        v, i = self.tokens(layer, dim)
        v2, i2 = v.reshape(-1, v.shape[-1]).cpu(), i.reshape(-1, i.shape[-1]).cpu()
        out = []
        for row_v, row_i in zip(v2.tolist(), i2.tolist()):
            out.append([(f, x) for f, x in zip(row_i, row_v) if x != 0])
        return out


@contextmanager
def record_features(model: nn.Module, layers: Layers = None, *, to_cpu: bool = False) -> Iterator[FeatureRecorder]:
    """Record the adapters' feature activations at ``layers`` (default: all) for every forward
    inside the block (a plain forward, or each step of ``generate``)::

        with record_features(model, layers=[3]) as rec:
            model.generate(ids, max_new_tokens=20)
        values, indices = rec.tokens(3)      # [batch, prompt + 19, w]

    ``to_cpu``: move each record to the CPU as it is made (frees device memory on long runs).
    """
    mods = _selected_adapters(model, layers)
    rec = FeatureRecorder(list(mods), {i: m.n_features for i, m in mods.items()}, to_cpu)
    keys = {i: m.add_sink(rec._sink(i)) for i, m in mods.items()}
    try:
        yield rec
    finally:
        for i, m in mods.items():
            m.remove_sink(keys[i])


# ------------------------------------------------------------------------------------------------
# statistics of the last forward
# ------------------------------------------------------------------------------------------------


def _with_acts(model, layers) -> Dict[int, TranscoderAdapterMLP]:
    """Selected adapters that hold activations of the last forward (enabled, record on)."""
    return {i: m for i, m in _selected_adapters(model, layers).items() if m._last is not None}


def sparsity_loss(model: nn.Module, mask: Optional[Tensor] = None, layers: Layers = None) -> Tensor:
    """Σ over layers of each adapter's :meth:`~TranscoderAdapterMLP.sparsity_term` (the paper's S:
    Σ_i f_i·‖W_dec[i]‖₂ per token, mean over real tokens) from the last forward; layers whose
    adapter was off are skipped. Differentiable; 0 when no layer has activations."""
    mods = _with_acts(model, layers)
    total = None
    for m in mods.values():
        t = m.sparsity_term(mask)
        total = t if total is None else total + t.to(total.device)
    if total is None:
        ref = next(iter(_selected_adapters(model, layers).values())).W_enc
        return torch.zeros((), dtype=torch.promote_types(ref.dtype, torch.float32), device=ref.device)
    return total


def l0_per_layer(model: nn.Module, mask: Optional[Tensor] = None, layers: Layers = None) -> Dict[int, Tensor]:
    """``{layer: mean active features per real token}`` of the last forward (0-d tensors)."""
    return {i: m.l0(mask) for i, m in _with_acts(model, layers).items()}


def update_feature_stats_(model: nn.Module, mask: Optional[Tensor] = None, layers: Layers = None) -> None:
    """Count the last forward's real tokens into each adapter's ``tokens_since_fired`` (reset for
    the features that fired). Call once per training batch, after the forward that counts."""
    for m in _with_acts(model, layers).values():
        m.update_feature_stats_(mask)


def dead_feature_counts(model: nn.Module, threshold: int, layers: Layers = None) -> Dict[int, Tensor]:
    """``{layer: number of features that have not fired in the last threshold real tokens}``."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be a positive int, got {threshold!r}")
    return {i: m.dead_features(threshold).sum() for i, m in _selected_adapters(model, layers).items()}


def adapter_stats(
    model: nn.Module,
    mask: Optional[Tensor] = None,
    *,
    layers: Layers = None,
    dead_thresholds: Iterable[int] = (100, 1000),
    update: bool = True,
) -> Dict[str, Tensor]:
    """Per-layer and averaged statistics, as 0-d tensors (no host synchronisation):
    ``l0/layer_{i}`` and ``l0`` (mean over the layers with activations) of the last forward,
    ``dead_{t}/layer_{i}`` and ``dead_{t}`` (mean over layers) for each threshold t in real
    tokens, after counting the last forward in (``update=True``)."""
    if update:
        update_feature_stats_(model, mask, layers)
    out: Dict[str, Tensor] = {}
    l0s = l0_per_layer(model, mask, layers)
    for i, v in l0s.items():
        out[f"l0/layer_{i}"] = v
    if l0s:
        out["l0"] = torch.stack([v.to(next(iter(l0s.values())).device) for v in l0s.values()]).mean()
    for t in dead_thresholds:
        dead = dead_feature_counts(model, t, layers)
        for i, v in dead.items():
            out[f"dead_{t}/layer_{i}"] = v
        if dead:
            dev = next(iter(dead.values())).device
            out[f"dead_{t}"] = torch.stack([v.to(dev) for v in dead.values()]).float().mean()
    return out
