"""Model surgery: find a model's decoder layers, add and remove transcoder adapters, and the
operations on all of a model's adapters at once (initialise, freeze the rest, cast, re-layout).

Works for any model whose decoder layers have an ``.mlp`` (Qwen2, Qwen3, Llama, Mistral, ...).
Functions that take ``layers`` accept indices of layers that have adapters (default: all of
them); an unknown index raises ``ValueError`` naming ``layers``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from tckernels.models.adapter import ADAPTER_OPTIONS, TranscoderAdapterMLP, infer_hidden_size

__all__ = [
    "find_decoder_layers",
    "adapter_modules",
    "selected_adapters",
    "check_layers",
    "add_transcoder_adapters",
    "remove_transcoder_adapters",
    "init_adapters_",
    "adapter_parameters",
    "freeze_base_",
    "relayout_adapters_",
    "cast_adapters_",
    "plain_mlp",
]


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a model: ``model.model.layers`` (``*ForCausalLM``), ``model.layers``
    (a bare decoder), or else the first ModuleList whose every element has an ``.mlp``."""
    for path in ("model.layers", "layers", "model.model.layers", "language_model.model.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None) if isinstance(obj, nn.Module) else None
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) and all(hasattr(layer, "mlp") for layer in obj):
            return obj
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(isinstance(getattr(x, "mlp", None), nn.Module) for x in m):
            return m
    raise ValueError(f"{type(model).__name__} has no list of decoder layers with an .mlp")


def adapter_modules(model: nn.Module) -> Dict[int, TranscoderAdapterMLP]:
    """``{layer index: TranscoderAdapterMLP}`` for the layers that have an adapter."""
    layers = find_decoder_layers(model)
    return {i: layer.mlp for i, layer in enumerate(layers) if isinstance(layer.mlp, TranscoderAdapterMLP)}


def check_layers(
    layers: Optional[Iterable[int]], available: Sequence[int], what: str = "layers", among: str = "layers with adapters"
) -> List[int]:
    """Validate a layer selection against the available layer indices (None: all of them);
    ``among`` names what the available indices are, for the error message."""
    if layers is None:
        return list(available)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    out = []
    avail = set(available)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{what} must hold int layer indices, got {i!r}")
        if i not in avail:
            shown = sorted(avail)
            desc = f"{shown[0]}..{shown[-1]}" if shown and shown == list(range(shown[0], shown[-1] + 1)) else str(shown)
            raise ValueError(f"{what}: unknown layer index {i}; {among}: {desc if shown else 'none'}")
        if i not in out:
            out.append(i)
    return out


def selected_adapters(model: nn.Module, layers=None, what: str = "layers") -> Dict[int, TranscoderAdapterMLP]:
    mods = adapter_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no transcoder adapters (add_transcoder_adapters adds them)")
    return {i: mods[i] for i in check_layers(layers, sorted(mods), what)}


def add_transcoder_adapters(
    model: nn.Module,
    n_features: int,
    *,
    layers: Optional[Iterable[int]] = None,
    d_model: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    init: bool = True,
    seed: Optional[int] = None,
    freeze: bool = True,
    **options,
) -> nn.Module:
    """Wrap the MLP of each selected decoder layer in a :class:`TranscoderAdapterMLP` (in place).

    Works for any model whose decoder layers have an ``.mlp`` (Qwen2, Qwen3, Llama, Mistral, ...).
    ``layers``: indices (default: every layer); layers that already have an adapter raise.
    ``d_model``: checked against the model's hidden size (default: inferred). ``dtype``: the
    adapters' parameter dtype (default: the MLP's). ``init``/``seed``: the release's initialisation
    (see :meth:`TranscoderAdapterMLP.reset_adapter_parameters`; layer i draws from ``seed + i``).
    ``freeze``: make the adapter parameters the only trainable ones. ``options``: the adapter's
    (``tckernels.models.adapter.ADAPTER_OPTIONS``: activation, k, k_max, dec_bias,
    jumprelu_threshold, jumprelu_bandwidth), as :class:`TranscoderAdapterMLP` takes them.
    Returns the model.
    """
    unknown = sorted(set(options) - set(ADAPTER_OPTIONS))
    if unknown:
        raise TypeError(
            f"add_transcoder_adapters got unexpected keyword argument(s) {', '.join(unknown)}; "
            f"the adapter options are {', '.join(ADAPTER_OPTIONS)}"
        )
    decoder = find_decoder_layers(model)
    n_layers = len(decoder)
    selected = check_layers(layers, range(n_layers), "layers", among=f"the model has {n_layers} decoder layers")
    cfg_hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if d_model is not None and isinstance(cfg_hidden, int) and d_model != cfg_hidden:
        raise ValueError(f"d_model = {d_model} does not match the model's hidden_size = {cfg_hidden}")
    for i in selected:
        if isinstance(decoder[i].mlp, TranscoderAdapterMLP):
            raise ValueError(f"layers: layer {i} already has a transcoder adapter")
    if freeze and not hasattr(model, "_tck_requires_grad"):
        model._tck_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for i in selected:
        layer = decoder[i]
        hidden = d_model if d_model is not None else (infer_hidden_size(layer.mlp) or cfg_hidden)
        adapter = TranscoderAdapterMLP(
            layer.mlp, n_features, d_model=hidden, dtype=dtype, init=False, layer_index=i, **options
        )
        if init:
            adapter.reset_adapter_parameters(seed=None if seed is None else seed + i)
        layer.mlp = adapter
    if freeze:
        freeze_base_(model)
    return model


def remove_transcoder_adapters(model: nn.Module, layers: Optional[Iterable[int]] = None) -> nn.Module:
    """Put the original MLP modules back (in place); the inverse of :func:`add_transcoder_adapters`.
    When no adapter is left, parameters get back the ``requires_grad`` they had before adapters
    were first added. Returns the model."""
    decoder = find_decoder_layers(model)
    mods = adapter_modules(model)
    for i in check_layers(layers, sorted(mods), "layers"):
        mlp = mods[i]
        mlp._sync_held_()
        decoder[i].mlp = mlp.base_mlp
    if not adapter_modules(model):
        saved = getattr(model, "_tck_requires_grad", None)
        if saved is not None:
            for name, p in model.named_parameters():
                if name in saved:
                    p.requires_grad_(saved[name])
            del model._tck_requires_grad
    return model


def init_adapters_(model: nn.Module, seed: Optional[int] = None, layers: Optional[Iterable[int]] = None) -> nn.Module:
    """Apply the release's initialisation to the adapters (all, or ``layers``): encoder U(±1/√d),
    biases 0, decoder 0, so the adapted model computes exactly what it computes without them.
    With ``seed``, layer i's encoder is drawn from a CPU generator seeded ``seed + i``."""
    for i, mlp in selected_adapters(model, layers).items():
        mlp.reset_adapter_parameters(seed=None if seed is None else seed + i)
    return model


def adapter_parameters(model: nn.Module, layers: Optional[Iterable[int]] = None) -> List[nn.Parameter]:
    """The adapters' parameters, layer by layer (encoder weight, encoder bias, decoder weight,
    decoder bias, JumpReLU log-thresholds where present)."""
    out: List[nn.Parameter] = []
    for _, mlp in sorted(selected_adapters(model, layers).items()):
        out.extend(mlp.adapter_parameters())
    return out


def freeze_base_(model: nn.Module) -> nn.Module:
    """``requires_grad`` True for the adapter parameters and False for every other parameter."""
    mods = adapter_modules(model)
    keep = {id(p) for mlp in mods.values() for p in mlp.adapter_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


def relayout_adapters_(model: nn.Module) -> nn.Module:
    """Give every decoder weight its row-per-feature memory and re-point the wrapped MLPs at the
    modules registered on the adapters (after a loader replaced parameters with ``setattr``)."""
    for mlp in adapter_modules(model).values():
        mlp.transcoder_dec.ensure_layout_()
        mlp._sync_held_()
    return model


@torch.no_grad()
def cast_adapters_(model: nn.Module, dtype: torch.dtype, layers: Optional[Iterable[int]] = None) -> nn.Module:
    """Cast the adapter parameters (only) to ``dtype``, e.g. float32 adapters on a bfloat16 model.
    The branch then computes in ``dtype`` (input cast in, result cast back). ``model.to(dtype)``
    casts everything again."""
    for mlp in selected_adapters(model, layers).values():
        for p in mlp.adapter_parameters():
            p.data = p.data.to(dtype)
        mlp.transcoder_dec.ensure_layout_()
    return model


def plain_mlp(mlp: nn.Module) -> nn.Module:
    """The MLP without its adapter (the module itself when it has none)."""
    if isinstance(mlp, TranscoderAdapterMLP):
        mlp._sync_held_()
        return mlp.base_mlp
    return mlp
