"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the adapter loop.

With ``fsdp: true`` every decoder layer of the adapted model and of the reference is sharded across
the processes: its frozen weights, its adapter's parameters, their gradients and their AdamW state,
so each process holds ``1 / world`` of them. A layer's weights are all-gathered just before it runs
(in its dtype, ``param_dtype``: bfloat16 compute for a bfloat16 pair, the adapters' float32 masters
included) and freed after; gradients are reduce-scattered in float32 and averaged over the processes,
as DDP does, so each process's loss is a mean over its own tokens.

The layer-by-layer forwards of the objective (``training/forward_utils.py``) call the layers one by
one and run each several times per step (the free run, the bridging passes, the recomputation of
activation checkpointing); each layer is therefore its own FSDP unit, with no FSDP root above them.
The embeddings, the final norm and the head stay whole on every process: they are frozen, so they
carry no gradient or optimizer state, and the chunked KL reads the head's weight directly.
"""
from __future__ import annotations

import torch
from torch import nn

from training.forward_utils import stack_of


def device_mesh(device: torch.device, world: int):
    """The one-dimensional mesh of every process (``world`` of them) on ``device``'s type."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))


def shard_layers_(model: nn.Module, mesh, param_dtype: torch.dtype) -> list:
    """Shard each decoder layer of ``model`` over ``mesh`` (in place); returns the sharded layers.
    ``param_dtype``: the dtype the layers compute in (the models' dtype); gradients are reduced in
    float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from tckernels.models.adapter_transcoder import TranscoderDecoder

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(stack_of(model).layers)
    for layer in layers:
        for m in layer.modules():
            if isinstance(m, TranscoderDecoder):  # FSDP shards contiguous parameters only
                m.row_per_feature = False
                m.weight.data = m.weight.data.contiguous()
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return layers


def set_gradient_sync(layers: list, sync: bool) -> None:
    """Reduce-scatter the gradients in this backward (``sync``), or keep accumulating them locally
    (the micro-batches before the last of an optimizer step)."""
    for layer in layers:
        layer.set_requires_gradient_sync(sync)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (a collective: every process calls it); ``t`` itself
    otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_bytes(model: nn.Module) -> dict:
    """``{"frozen", "trainable"}``: the bytes of ``model``'s parameters held by this process (a
    sharded parameter counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    out = {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        out["trainable" if p.requires_grad else "frozen"] += t.numel() * t.element_size()
    return out


def move_unsharded_(model: nn.Module, device: torch.device) -> None:
    """Move what ``shard_layers_`` left whole (embeddings, final norm, head, rotary tables) to
    ``device``; the sharded layers are there already."""
    s = stack_of(model)
    for m in (s.embed, s.norm, s.lm_head, s.rotary):
        m.to(device)


def full_state_dict(model: nn.Module) -> dict:
    """``model``'s whole state dict gathered onto the main process's CPU (empty on the others); a
    collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
