"""Feature interventions on transcoder adapters, and turning adapters on and off.

Everything here takes the model (any model with :class:`~tckernels.models.adapter.TranscoderAdapterMLP`
layers) and an optional ``layers`` selection (indices of layers that have adapters; an unknown
index raises ``ValueError`` naming ``layers``).

- On/off: :func:`set_adapters_enabled`, and :func:`adapters_enabled` as a context manager.
  Off, a layer computes its original MLP bit for bit.
- Interventions (until removed; each returns a handle with ``.remove()`` that is also a context
  manager): :func:`ablate_features` (f_i = 0), :func:`scale_features` (f_i *= factor),
  :func:`clamp_features` (f_i = value on every token), :func:`steer_features` (add
  ``coefficient·W_dec[i]``, the feature's decoder direction, on every token), and
  :func:`clear_interventions`. ``features`` is an index, a sequence, a tensor, ``"all"``, or a
  dict ``{layer: features}`` for different features per layer. :func:`add_intervention` and
  :func:`interventions_of` work on one adapter.

The interventions of one adapter are a :class:`FeatureInterventions`, installed as the adapter's
``feature_edit``: each feature's activation becomes ``a·f + c``, composed in the order the
interventions were added; ``a`` scales the encoder's sparse activations and ``c`` adds
``Σ c_i·W_dec[i]`` to the decoded output, so a clamp or steer on inactive features costs one
``[d]`` vector, not a wider decode. Recording (``tckernels.models.features``) sees the encoder's
activations before any intervention.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from tckernels.models.adapter import TranscoderAdapterMLP
from tckernels.models.surgery import selected_adapters
from tckernels.nn.activations import SparseActivations

__all__ = [
    "KINDS",
    "FeatureInterventions",
    "InterventionHandle",
    "interventions_of",
    "add_intervention",
    "set_adapters_enabled",
    "adapters_enabled",
    "ablate_features",
    "scale_features",
    "clamp_features",
    "steer_features",
    "clear_interventions",
]

KINDS = ("zero", "scale", "clamp", "add")

FeatureSpec = Union[int, Sequence[int], Tensor, str, None]
Layers = Optional[Iterable[int]]


# ------------------------------------------------------------------------------------------------
# the core: one adapter's interventions
# ------------------------------------------------------------------------------------------------


def _as_index_tensor(features: FeatureSpec, n: int, name: str = "features") -> Tensor:
    """1-D int64 CPU tensor of feature indices, range-checked against n."""
    if isinstance(features, str):
        if features != "all":
            raise ValueError(f"{name} must be a feature index, a sequence of them, a tensor or 'all', got {features!r}")
        return torch.arange(n, dtype=torch.int64)
    if features is None:
        raise ValueError(f"{name} must be given (a feature index, a sequence of them, a tensor or 'all')")
    if isinstance(features, Tensor):
        if features.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer feature indices, got a bool tensor (use .nonzero())")
        if features.is_floating_point() or features.is_complex():
            raise TypeError(f"{name} must hold integer feature indices, got dtype {features.dtype}")
        t = features.detach().to("cpu", torch.int64).reshape(-1)
    else:
        items = [features] if isinstance(features, int) else list(features)
        for v in items:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must hold integer feature indices, got {v!r}")
        t = torch.tensor(items, dtype=torch.int64).reshape(-1)
    if t.numel():
        bad = t[(t < 0) | (t >= n)]
        if bad.numel():
            raise ValueError(
                f"{name}: feature index {int(bad[0])} is out of range; the adapter has n_features = {n} "
                f"(valid indices 0..{n - 1})"
            )
    return t


def _as_value_tensor(value, count: int, name: str) -> Tensor:
    """Scalar or ``[count]`` value -> float64 CPU tensor ``[count]``."""
    if isinstance(value, Tensor):
        v = value.detach().to("cpu", torch.float64).reshape(-1)
        if v.numel() == 1:
            return v.expand(count).clone()
        if v.numel() != count:
            raise ValueError(f"{name} must be a number or hold one value per feature ({count}), got {v.numel()} values")
        return v
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    return torch.full((count,), float(value), dtype=torch.float64)


class FeatureInterventions:
    """The interventions of one adapter, composed into one affine map per feature; callable as
    the adapter's ``feature_edit``: ``(acts, W_dec) -> (acts, shift)``."""

    def __init__(self, n_features: int):
        self.n_features = n_features
        self._entries: Dict[int, Tuple[str, Tensor, Optional[Tensor]]] = {}
        self._next_key = 0
        self._affine = None  # (scale [F] or None, shift_idx, shift_coef) on CPU, float64
        self._on_device: Dict[tuple, tuple] = {}

    def add(self, kind: str, features: FeatureSpec, value=None) -> int:
        """Add one intervention (see :func:`add_intervention`); returns its key."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        idx = _as_index_tensor(features, self.n_features)
        if kind == "zero":
            if value is not None:
                raise ValueError("kind 'zero' takes no value")
            val = None
        else:
            if value is None:
                raise ValueError(f"kind {kind!r} needs a value")
            val = _as_value_tensor(value, idx.numel(), "value")
        key = self._next_key
        self._next_key += 1
        self._entries[key] = (kind, idx, val)
        self._changed()
        return key

    def remove(self, key: int) -> None:
        if self._entries.pop(key, None) is not None:
            self._changed()

    def clear(self) -> None:
        self._entries.clear()
        self._changed()

    @property
    def entries(self) -> List[Tuple[str, Tensor, Optional[Tensor]]]:
        """``(kind, feature indices, values or None)`` in the order they were added."""
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def _changed(self) -> None:
        self._affine = None
        self._on_device = {}

    def _affine_cpu(self):
        if self._affine is None:
            n = self.n_features
            a = torch.ones(n, dtype=torch.float64)
            c = torch.zeros(n, dtype=torch.float64)
            for kind, idx, val in self._entries.values():
                if kind == "zero":
                    a[idx] = 0.0
                    c[idx] = 0.0
                elif kind == "scale":
                    a[idx] *= val
                    c[idx] *= val
                elif kind == "clamp":
                    a[idx] = 0.0
                    c[idx] = val
                else:  # add
                    c[idx] += val
            scale = None if bool((a == 1).all()) else a
            nz = c.nonzero().squeeze(1)
            self._affine = (scale, nz if nz.numel() else None, c[nz] if nz.numel() else None)
        return self._affine

    def _affine_for(self, device, dtype):
        key = (device, dtype)
        hit = self._on_device.get(key)
        if hit is None:
            scale, idx, coef = self._affine_cpu()
            hit = (
                None if scale is None else scale.to(device=device, dtype=dtype),
                None if idx is None else idx.to(device),
                None if coef is None else coef.to(device=device, dtype=dtype),
            )
            self._on_device[key] = hit
        return hit

    def __call__(self, acts: SparseActivations, W_dec: Tensor) -> Tuple[SparseActivations, Optional[Tensor]]:
        if not self._entries:
            return acts, None
        scale, shift_idx, shift_coef = self._affine_for(acts.values.device, acts.values.dtype)
        if scale is not None:
            acts = SparseActivations(acts.values * scale[acts.indices], acts.indices)
        shift = None
        if shift_idx is not None:
            shift = (shift_coef.unsqueeze(1) * W_dec[shift_idx]).sum(0)
        return acts, shift


def interventions_of(mlp: TranscoderAdapterMLP) -> FeatureInterventions:
    """The adapter's :class:`FeatureInterventions` (installed as its ``feature_edit`` on first use)."""
    if not isinstance(mlp, TranscoderAdapterMLP):
        raise TypeError(f"mlp must be a TranscoderAdapterMLP, got {type(mlp).__name__}")
    edit = mlp.feature_edit
    if edit is None:
        edit = mlp.feature_edit = FeatureInterventions(mlp.n_features)
    elif not isinstance(edit, FeatureInterventions):
        raise ValueError(
            f"layer {mlp.layer_index}: the adapter's feature_edit is a {type(edit).__name__}, not the "
            "interventions of this module; remove it (feature_edit = None) to intervene"
        )
    return edit


class InterventionHandle:
    """Removes the intervention(s) it stands for: ``handle.remove()``, or use it as a context
    manager (``with ablate_features(model, ...):``). Removing twice is harmless."""

    def __init__(self, entries: List[Tuple[FeatureInterventions, int]]):
        self._entries = entries

    def remove(self) -> None:
        for core, key in self._entries:
            core.remove(key)
        self._entries = []

    def __enter__(self) -> "InterventionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def add_intervention(mlp: TranscoderAdapterMLP, kind: str, features: FeatureSpec, value=None) -> InterventionHandle:
    """Change one adapter's features between encoder and decoder, on every token, until removed.

    ``kind``: ``"zero"`` (ablate: f_i = 0), ``"scale"`` (f_i *= value), ``"clamp"`` (f_i = value
    on every token, active or not) or ``"add"`` (f_i += value, i.e. add ``value·W_dec[i]``, the
    feature's decoder direction, to the output). ``features``: an index, a sequence, a tensor or
    ``"all"``; ``value``: a number or one per feature. Interventions compose in the order they
    were added (each feature's f ↦ a·f + c). Returns a handle (``.remove()``, or ``with``).
    """
    core = interventions_of(mlp)
    return InterventionHandle([(core, core.add(kind, features, value))])


# ------------------------------------------------------------------------------------------------
# on / off
# ------------------------------------------------------------------------------------------------


def set_adapters_enabled(model: nn.Module, enabled: bool, layers: Layers = None) -> None:
    """Turn the adapters of ``layers`` (default: all) on or off."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    for mlp in selected_adapters(model, layers).values():
        mlp.enabled = enabled


@contextmanager
def adapters_enabled(model: nn.Module, enabled: bool = True, layers: Layers = None) -> Iterator[nn.Module]:
    """Context manager: adapters of ``layers`` on (or off) inside the block, previous states after."""
    mods = selected_adapters(model, layers)
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
        mods = selected_adapters(model, list(features.keys()))
        return {i: (mods[i], features[i]) for i in mods}
    return {i: (m, features) for i, m in selected_adapters(model, layers).items()}


def _intervene(model, kind, features, value, layers) -> InterventionHandle:
    targets = _per_layer(model, features, layers)
    entries = []
    try:
        for i, (mlp, feats) in targets.items():
            core = interventions_of(mlp)
            try:
                entries.append((core, core.add(kind, feats, value)))
            except (ValueError, TypeError) as e:
                raise type(e)(f"layer {i}: {e}") from None
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
    for mlp in selected_adapters(model, layers).values():
        if isinstance(mlp.feature_edit, FeatureInterventions):
            mlp.feature_edit.clear()
