"""Building adapted models: adapters on a model, and the hybrid of the transcoder-adapter paper
(a fine-tuned model whose MLPs are the base model's, plus adapters).

A plain ``Qwen2ForCausalLM`` becomes a ``Qwen2ForCausalLMWithTranscoder`` (so ``save_pretrained``
writes a config the Auto classes and the release's code read); any other decoder gets adapters
in place with ``add_transcoder_adapters``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tckernels.models.qwen2 import convert_to_transcoder_model, is_plain_qwen2_causal_lm
from tckernels.models.surgery import add_transcoder_adapters, adapter_modules, find_decoder_layers, plain_mlp

__all__ = ["adapt_model", "build_hybrid"]


def adapt_model(model: nn.Module, n_features: int, **adapter_kwargs) -> nn.Module:
    """Add transcoder adapters to ``model`` (in place): a plain ``Qwen2ForCausalLM`` is converted to
    a ``Qwen2ForCausalLMWithTranscoder``, any other decoder gets ``add_transcoder_adapters``.
    ``adapter_kwargs``: those of ``add_transcoder_adapters``. Returns the model."""
    if is_plain_qwen2_causal_lm(model):
        return convert_to_transcoder_model(model, n_features, **adapter_kwargs)
    return add_transcoder_adapters(model, n_features, **adapter_kwargs)


@torch.no_grad()
def build_hybrid(
    target_model: nn.Module, base_model: nn.Module, n_features: Optional[int] = None, **adapter_kwargs
) -> nn.Module:
    """The hybrid of the transcoder-adapter paper (the original training code's ``backbone: target``): the target
    (fine-tuned) model with every MLP's weights replaced by the base model's, plus adapters.

    In place on ``target_model`` (``base_model`` is only read). If the target already has adapters
    (e.g. a ``Qwen2ForCausalLMWithTranscoder``) they are kept as they are; otherwise they are
    added with ``add_transcoder_adapters(target, n_features, **adapter_kwargs)`` and the release's
    initialisation, so the result computes exactly the hybrid. A plain ``Qwen2ForCausalLM`` target
    becomes a ``Qwen2ForCausalLMWithTranscoder`` (so that ``save_pretrained`` and the Auto classes
    work). Returns the target model.
    """
    t_layers, b_layers = find_decoder_layers(target_model), find_decoder_layers(base_model)
    if len(t_layers) != len(b_layers):
        raise ValueError(f"base_model has {len(b_layers)} decoder layers but target_model has {len(t_layers)}")
    t_hidden = getattr(getattr(target_model, "config", None), "hidden_size", None)
    b_hidden = getattr(getattr(base_model, "config", None), "hidden_size", None)
    if isinstance(t_hidden, int) and isinstance(b_hidden, int) and t_hidden != b_hidden:
        raise ValueError(f"base_model has hidden_size {b_hidden} but target_model has hidden_size {t_hidden}")
    pairs = []
    for i, (tl, bl) in enumerate(zip(t_layers, b_layers)):
        t_mlp, b_mlp = plain_mlp(tl.mlp), plain_mlp(bl.mlp)
        t_sd, b_sd = t_mlp.state_dict(keep_vars=True), b_mlp.state_dict(keep_vars=True)
        if set(t_sd) != set(b_sd):
            raise ValueError(
                f"base_model: layer {i} MLP has tensors {sorted(b_sd)} but the target's has {sorted(t_sd)}"
            )
        for name, t in t_sd.items():
            if t.shape != b_sd[name].shape:
                raise ValueError(
                    f"base_model: layer {i} mlp.{name} has shape {tuple(b_sd[name].shape)} but the target's has "
                    f"{tuple(t.shape)} (mismatched hidden or intermediate size)"
                )
        pairs.append((t_sd, b_sd))
    for t_sd, b_sd in pairs:
        for name, t in t_sd.items():
            t.copy_(b_sd[name].to(device=t.device, dtype=t.dtype))
    if adapter_modules(target_model):
        return target_model
    if n_features is None:
        raise ValueError("n_features is required when target_model has no adapters yet")
    return adapt_model(target_model, n_features, **adapter_kwargs)

