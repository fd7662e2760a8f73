"""Layer-by-layer forwards of HF decoder models (Qwen2 and the Llama-like family), and mixed forwards
that run some layers from one model and the rest from another.

A model is seen as ``embeddings -> layers[0..L-1] -> final norm -> lm_head``. A mixed forward at
cut-off ``k`` runs the embeddings and layers ``0..k-1`` of the *bottom* model and layers ``k..L-1``,
the final norm and the head of the *top* model, so the embeddings go with the bottom stack and the
norm and head with the top stack. The bridging passes of the training objective are

* ``adapted_below(k)``: adapted model's layers ``< k``, then the reference's (bottom = adapted);
* ``reference_below(k)``: reference layers ``< k``, then the adapted model's (bottom = reference).

Attention masks and position ids are built once per batch and model exactly as the HF model's own
forward builds them (``create_causal_mask``, rotary embeddings from position ids), so a full run
through :func:`run_layers` matches ``model(input_ids, attention_mask)``. Position ids count real
tokens (``cumsum(attention_mask) - 1``), which is right for left and right padding alike.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


@dataclass
class Stack:
    """The pieces of a decoder model that a layer-by-layer forward needs."""

    model: nn.Module
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    config: object

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def stack_of(model: nn.Module) -> Stack:
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed):
        raise TypeError(f"{type(model).__name__}: expected an HF *ForCausalLM with .model.{{{', '.join(needed)}}} "
                        "(Qwen2, Llama, Qwen3, Mistral)")
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return Stack(model, inner.embed_tokens, inner.layers, inner.norm, head, inner.rotary_emb, model.config)


@functools.lru_cache(maxsize=None)
def _mask_parameters(create_mask) -> frozenset:
    """The mask makers' parameter names, which differ between transformers releases (looked up once)."""
    return frozenset(inspect.signature(create_mask).parameters)


def _mask_kwargs(create_mask, config, h: Tensor, attention_mask: Tensor, position_ids: Tensor) -> dict:
    """Arguments for ``create_mask`` of the installed transformers, no cache: the embeddings are
    ``inputs_embeds`` in transformers 5 and ``input_embeds`` in 4.x; the cache argument ``cache`` in
    recent 5.x releases and ``past_key_values`` before; 4.x also takes ``cache_position``."""
    params = _mask_parameters(create_mask)
    kw = dict(config=config, attention_mask=attention_mask, position_ids=position_ids)
    kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = h
    kw["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(h.shape[1], device=h.device)
    return kw


class BatchInputs:
    """Per-batch inputs shared by every layer call: position ids, rotary embeddings and attention masks
    (built per model config, cached)."""

    def __init__(self, input_ids: Tensor, attention_mask: Optional[Tensor]):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        self._masks: dict = {}
        self._rope: dict = {}

    def masks(self, stack: Stack, h: Tensor) -> dict:
        cfg = stack.config
        key = (id(cfg), getattr(cfg, "_attn_implementation", None), h.dtype, h.device)
        if key not in self._masks:
            from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

            args = (cfg, h, self.attention_mask, self.position_ids)
            m = {"full_attention": create_causal_mask(**_mask_kwargs(create_causal_mask, *args))}
            if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
                m["sliding_attention"] = create_sliding_window_causal_mask(
                    **_mask_kwargs(create_sliding_window_causal_mask, *args))
            self._masks[key] = m
        return self._masks[key]

    def rope(self, stack: Stack, h: Tensor):
        key = (id(stack.rotary), h.dtype, h.device)
        if key not in self._rope:
            self._rope[key] = stack.rotary(h, self.position_ids)
        return self._rope[key]


def embed(stack: Stack, inputs: BatchInputs) -> Tensor:
    return stack.embed(inputs.input_ids)


def run_layers(stack: Stack, h: Tensor, inputs: BatchInputs, start: int, end: int,
               keep: Optional[list] = None, checkpoint: bool = False) -> Tensor:
    """Run layers ``start..end-1`` of ``stack`` on ``h``; append each layer's output to ``keep``.
    ``checkpoint``: keep only each layer's input for backward and recompute the layer then
    (activation checkpointing; only when gradients are being recorded)."""
    masks = inputs.masks(stack, h)
    rope = inputs.rope(stack, h)
    types = getattr(stack.config, "layer_types", None)
    checkpoint = checkpoint and torch.is_grad_enabled()
    for i in range(start, end):
        mask = masks[types[i]] if types else masks["full_attention"]
        layer = stack.layers[i]

        def call(x, layer=layer, mask=mask):
            out = layer(x, attention_mask=mask, position_ids=inputs.position_ids, use_cache=False,
                        position_embeddings=rope)
            return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple

        if checkpoint:
            from torch.utils.checkpoint import checkpoint as ckpt_fn

            h = ckpt_fn(call, h, use_reentrant=False)
        else:
            h = call(h)
        if keep is not None:
            keep.append(h)
    return h


def final_hidden(stack: Stack, h: Tensor) -> Tensor:
    """The final norm: the input of ``lm_head``."""
    return stack.norm(h)


def free_run(stack: Stack, inputs: BatchInputs, checkpoint: bool = False) -> list:
    """Every hidden state of a full forward: ``[embeddings, after layer 0, ..., after layer L-1]``."""
    h = embed(stack, inputs)
    hs = [h]
    run_layers(stack, h, inputs, 0, stack.n_layers, keep=hs, checkpoint=checkpoint)
    return hs


def mixed_hidden(bottom: Stack, top: Stack, k: int, inputs: BatchInputs,
                 bottom_states: Optional[list] = None, checkpoint: bool = False) -> Tensor:
    """Final (normed) hidden states of embeddings + layers ``< k`` of ``bottom``, then layers ``>= k``
    and the final norm of ``top``. ``bottom_states``: the bottom model's free-run hidden states, when
    already computed (its state after ``k`` layers is reused instead of recomputed)."""
    L = top.n_layers
    if not 0 <= k <= L:
        raise ValueError(f"cut-off k={k} must be in 0..{L}")
    if bottom_states is not None:
        h = bottom_states[k]
    else:
        h = run_layers(bottom, embed(bottom, inputs), inputs, 0, k, checkpoint=checkpoint)
    h = run_layers(top, h, inputs, k, L, checkpoint=checkpoint)
    return final_hidden(top, h)


def check_compatible(base: nn.Module, reference: nn.Module) -> None:
    """Raise ValueError unless the two models have the same vocabulary and shapes."""
    cb, cr = base.config, reference.config
    problems = []
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads"):
        vb, vr = getattr(cb, name, None), getattr(cr, name, None)
        if vb != vr:
            problems.append(f"{name}: base {vb} vs reference {vr}")
    eb, er = base.get_input_embeddings(), reference.get_input_embeddings()
    if eb is not None and er is not None and eb.weight.shape != er.weight.shape:
        problems.append(f"embedding matrix: base {tuple(eb.weight.shape)} vs reference {tuple(er.weight.shape)}")
    hb, hr = base.get_output_embeddings(), reference.get_output_embeddings()
    if hb is not None and hr is not None and hb.weight.shape != hr.weight.shape:
        problems.append(f"lm_head: base {tuple(hb.weight.shape)} vs reference {tuple(hr.weight.shape)}")
    if problems:
        raise ValueError("the base and reference models are not a pair (their vocabularies or shapes differ):\n  "
                         + "\n  ".join(problems))
