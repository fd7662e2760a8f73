"""Feature-sharded (tensor-parallel over the dictionary) transcoders on torch.distributed.

Each rank of a tensor-parallel group holds one contiguous slice ``[start, stop)`` of the N
features: its encoder rows, ``b_enc``, decoder rows and per-feature state (the JumpReLU
thresholds, the dead-feature counter). The input ``x`` and the output ``y`` are replicated over
the group; ``b_dec``, ``W_skip``, ``b_pre`` and the BatchTopK threshold are replicated too.

Forward, per rank: encode its slice with the library's sparse encoders; for TopK and BatchTopK
select globally (below); decode the selected features of its slice into a partial output; sum
the partial outputs over the group (one all-reduce of ``[tokens, d_out]``); add ``b_dec`` and
the skip term. ReLU, JumpReLU and BatchTopK inference (a threshold) need no selection: they are
local to each slice.

The selection is exact, the same as the unsharded module's:

- TopK: every rank sends its slice's top ``k`` (fewer when the slice is smaller) per token, with
  global indices, and every rank ranks all candidates the way ``tckernels.topk_relu`` does
  (descending pre-activation, ties by ascending global index, outputs in that order).
  Candidates whose value ReLU zeroed are ranked by their pre-activation, made again for those
  ``[tokens, k]`` slots only, so rows with fewer than k positive entries pick the same indices.
- BatchTopK (training): every rank sends its slice's ``min(n·k, tokens·slice)`` largest
  positive pre-activations, and every rank keeps the ``n·k`` largest of all of them; ties at the
  cut go to the lower (token, feature) position. (The unsharded module leaves such exact ties
  to ``torch.topk``.) The threshold's update uses the global smallest kept value, so it stays
  the same on every rank.

Autograd follows Megatron-LM: the encoder input passes through "identity forward, all-reduce
backward" (each rank's ``dx`` is a partial sum over its features) and the partial outputs through
"all-reduce forward, identity backward". The backward stays sparse on each slice (the ops'
gather-matmul / scatter-matmul), and no ``[tokens, N]`` tensor is made; BatchTopK training makes
its slice's ``[tokens, N/P]`` pre-activations once, as the unsharded module makes ``[tokens, N]``.

Training losses (``forward_with_aux``, the unsharded modules' losses, metrics and gradients):
the reconstruction terms are computed on the replicated output. The sparsity, JumpReLU L0 and
pre-activation terms are sums over features, so each slice computes its share with the
``Transcoder``'s own formulas (decoder norms of its rows) and the shares are summed over the
group. AuxK counts the dead features of every slice (each slice keeps its own counter), caps
``aux_k`` by their total, and picks the ``aux_k`` largest dead pre-activations per token across
the group as TopK does; each slice decodes the ones it holds and the partial reconstructions are
summed. The dead-feature metric is the total over the slices.

Data parallelism combines through the process groups: build on the ``"tp"`` group (or pass a
``DeviceMesh`` and ``mesh_dim="tp"``) and average the gradients over the ``"dp"`` group.

Limitation: a fixed ``k_max`` of the ReLU-family encoders bounds each slice's width, not the
whole row's.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tckernels import ops
from tckernels.nn import metrics as _metrics
from tckernels.nn.activations import (
    SparseActivations,
    StepSTE,
    decode as _decode,
    gathered_pre,
    jumprelu_encode,
    relu_encode,
    valid_slots,
)
from tckernels.nn.crosslayer import CrossLayerOutput, CrossLayerTranscoder, fold_target_blocks
from tckernels.nn.transcoder import (Transcoder, TranscoderConfig, TranscoderOutput, dead_candidates,
                                     unexplained_fraction)

__all__ = ["FeatureShardedTranscoder", "FeatureShardedCrossLayerTranscoder", "feature_slice"]

Inputs = Union[Tensor, Sequence[Tensor]]
_SHARDED = ("W_enc", "b_enc", "W_dec", "log_threshold")


# ------------------------------------------------------------------------------------------------
# groups and collectives
# ------------------------------------------------------------------------------------------------


def feature_slice(n_features: int, world: int, rank: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank's features: contiguous slices, the first ``N % world`` ranks one
    feature larger, so ranks hold ``N // world`` or ``N // world + 1`` features."""
    base, extra = divmod(n_features, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _resolve_group(group, mesh_dim: Optional[str]):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("feature sharding needs torch.distributed: call torch.distributed.init_process_group first")
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without device meshes
        DeviceMesh = ()
    if DeviceMesh and isinstance(group, DeviceMesh):
        if mesh_dim is None and group.ndim != 1:
            raise ValueError(
                f"mesh_dim: a {group.ndim}-D mesh {group.mesh_dim_names} needs the name of its tensor-parallel dim"
            )
        try:
            group = group.get_group(mesh_dim)
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"mesh_dim: {mesh_dim!r} is not a dim of the mesh {group.mesh_dim_names}: {e}") from None
    elif mesh_dim is not None:
        raise ValueError("mesh_dim is for a DeviceMesh group; got a process group or None")
    if group is None:
        group = dist.group.WORLD
    elif group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives the ranks it left out
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of it")
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a ProcessGroup, a DeviceMesh or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of it")
    return group, rank, dist.get_world_size(group)


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums ``dx`` over the group, each rank's being the share of its features."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromShards(torch.autograd.Function):
    """Forward sums the partial results over the group; backward passes the (replicated) gradient on."""

    @staticmethod
    def forward(ctx, y, group):
        y = y.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_gather(t: Tensor, group, world: int) -> Tensor:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _pad_rows(t: Tensor, rows: int, fill) -> Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_full((rows - t.shape[0], *t.shape[1:]), fill)
    return torch.cat([t, pad])


def _top_positions(keys: Tensor, n: int) -> Tensor:
    """Positions of the n largest entries of a 1-D ``keys``, ties to the lower position."""
    if n >= keys.numel():
        return torch.arange(keys.numel(), device=keys.device)
    cut = keys.topk(n, sorted=False).values.min()
    above = (keys > cut).nonzero().squeeze(1)
    at = (keys == cut).nonzero().squeeze(1)[: n - above.numel()]
    return torch.cat([above, at])


def _rank_order(keys: Tensor, positions: Tensor) -> Tensor:
    """Order along the last dim by descending key, ties by ascending position (the op's rule)."""
    by_pos = positions.argsort(dim=-1, stable=True)
    by_key = keys.gather(-1, by_pos).argsort(dim=-1, descending=True, stable=True)
    return by_pos.gather(-1, by_key)


# ------------------------------------------------------------------------------------------------
# per-layer transcoder
# ------------------------------------------------------------------------------------------------


class FeatureShardedTranscoder(nn.Module):
    """A :class:`~tckernels.nn.transcoder.Transcoder` whose features are split over a process group.

    ``self.shard`` is an ordinary ``Transcoder`` over this rank's ``n_local`` features (its
    ``W_enc``, ``b_enc``, ``W_dec``, ``log_threshold`` and ``tokens_since_fired`` are the slice
    ``[start, stop)``; its ``b_dec``, ``W_skip``, ``b_pre`` and BatchTopK ``threshold`` are the
    replicated ones), so decoder-norm handling and dead-feature counting are the Transcoder's.
    Every method that computes is collective: call it on every rank of the group, in the same order.

    Build it with :meth:`from_transcoder` (slice a full module held on every rank) or directly
    from a config (each rank initialises only its slice). ``encode`` returns activations with
    global feature indices, ``forward`` the replicated output, ``to_transcoder`` the full module.
    """

    def __init__(
        self,
        config: TranscoderConfig,
        group=None,
        *,
        mesh_dim: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        init: bool = True,
        seed: Optional[int] = None,
    ):
        super().__init__()
        if not isinstance(config, TranscoderConfig):
            raise TypeError(f"config must be a TranscoderConfig, got {type(config).__name__}")
        self.group, self.rank, self.world_size = _resolve_group(group, mesh_dim)
        cfg = dataclasses.replace(config)  # validates again: k <= n_features, k_max, ...
        N = cfg.n_features
        if N < self.world_size:
            raise ValueError(
                f"n_features ({N}) must be >= the group's size ({self.world_size}): every rank needs a feature"
            )
        self._cfg = cfg
        self.d_in, self.n_features, self.d_out = cfg.d_in, N, cfg.out_dim
        self.activation, self.k = cfg.activation, cfg.k
        self.start, self.stop = feature_slice(N, self.world_size, self.rank)
        self.n_local = self.stop - self.start
        self._largest_slice = feature_slice(N, self.world_size, 0)[1]
        local = dataclasses.asdict(cfg)
        local["n_features"] = self.n_local
        if cfg.k is not None:
            local["k"] = min(cfg.k, self.n_local)
        if cfg.k_max is not None:
            local["k_max"] = min(cfg.k_max, self.n_local)
        d_in, n_local = local.pop("d_in"), local.pop("n_features")
        self.shard = Transcoder(d_in, n_local, dtype=dtype, device=device, init=False, **local)
        if init:
            self.reset_parameters(seed)

    # ---------------------------------------------------------------------------------------------
    # construction, saving
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def from_transcoder(cls, transcoder: Transcoder, group=None, *, mesh_dim: Optional[str] = None):
        """This rank's slice of ``transcoder``, which must be the same module on every rank of
        the group (checked: a mismatch raises ValueError). Copies weights and state, the
        training/eval mode and ``decode_mode``."""
        if not isinstance(transcoder, Transcoder):
            raise TypeError(f"transcoder must be a Transcoder, got {type(transcoder).__name__}")
        p = transcoder.W_enc
        self = cls(transcoder.config, group, mesh_dim=mesh_dim, dtype=p.dtype, device=p.device, init=False)
        self.copy_from_(transcoder)
        return self

    @torch.no_grad()
    def copy_from_(self, transcoder: Transcoder) -> None:
        """Overwrite this rank's slice, in place, from ``transcoder`` (the same full module on every
        rank, checked), e.g. weights loaded from a checkpoint: the parameters stay the same objects,
        so an optimizer over them keeps working. Copies weights and state, the training/eval mode and
        ``decode_mode``. Collective."""
        if not isinstance(transcoder, Transcoder):
            raise TypeError(f"transcoder must be a Transcoder, got {type(transcoder).__name__}")
        if transcoder.config != self._cfg:
            raise ValueError(f"transcoder: its config {transcoder.config} differs from this module's {self._cfg}")
        self._check_replicated(transcoder)
        for name, t in list(self.shard.named_parameters()) + list(self.shard.named_buffers()):
            t.copy_(self.local_rows(getattr(transcoder, name)) if self._is_sharded(name) else getattr(transcoder, name))
        self.decode_mode = transcoder.decode_mode
        self.train(transcoder.training)

    @staticmethod
    def _is_sharded(name: str) -> bool:
        return name in _SHARDED or name == "tokens_since_fired"

    def is_sharded(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` (a parameter or buffer of ``self.shard``) holds this rank's rows of a
        per-feature tensor (else it is replicated over the group)."""
        for name, t in list(self.shard.named_parameters()) + list(self.shard.named_buffers()):
            if t is tensor:
                return self._is_sharded(name)
        raise ValueError("tensor: not a parameter or buffer of this module's shard")

    def local_rows(self, t: Tensor) -> Tensor:
        """Rows ``[start, stop)`` of a full per-feature tensor ``[N, ...]``."""
        if t.dim() < 1 or t.shape[0] != self.n_features:
            raise ValueError(f"t must have n_features = {self.n_features} rows, got shape {tuple(t.shape)}")
        return t[self.start:self.stop]

    def _check_replicated(self, transcoder: Transcoder) -> None:
        sums = []
        for t in list(transcoder.parameters()) + list(transcoder.buffers()):
            d = t.detach().double()
            sums += [d.sum(), d.abs().sum()]
        mine = torch.stack(sums).cpu()
        every = _all_gather(mine.to(self._comm_device), self.group, self.world_size).cpu()
        if not bool((every == mine).all()):
            raise ValueError(
                "transcoder: its weights differ between the ranks of the group; give every rank the same "
                "module (same seed, or load one checkpoint) before sharding it"
            )

    @property
    def _comm_device(self) -> torch.device:
        return self.shard.W_enc.device

    @torch.no_grad()
    def reset_parameters(self, seed: Optional[int] = None) -> None:
        """Initialise this rank's slice as ``Transcoder.reset_parameters`` does, with random
        draws that differ between ranks: from CPU generators seeded by ``seed`` and the slice
        (``seed`` None: one drawn on the group's first rank and sent to all). Collective."""
        if seed is None:
            s = torch.randint(0, 2**40, (1,), dtype=torch.int64).to(self._comm_device)
            dist.broadcast(s, src=dist.get_global_rank(self.group, 0), group=self.group)
            seed = int(s)
        sh = self.shard
        per_rank = int(seed) * 65_537 + self.start
        sh.reset_parameters(seed=per_rank)
        if self._cfg.dec_init == "unit_norm":  # Transcoder draws it from the global RNG, the same on every rank
            g = torch.Generator().manual_seed(per_rank + 1)
            sh.W_dec.copy_(torch.randn(sh.W_dec.shape, generator=g))
            sh.normalize_decoder_()

    def gather_rows(self, t: Tensor) -> Tensor:
        """The full per-feature tensor ``[N, ...]`` from every rank's rows ``[n_local, ...]`` (e.g.
        an optimizer's state of a sharded parameter), on every rank; detached. Collective."""
        if t.dim() < 1 or t.shape[0] != self.n_local:
            raise ValueError(f"t must have this slice's {self.n_local} rows, got shape {tuple(t.shape)}")
        every = _all_gather(_pad_rows(t.detach(), self._largest_slice, 0), self.group, self.world_size)
        parts = []
        for r in range(self.world_size):
            a, b = feature_slice(self.n_features, self.world_size, r)
            parts.append(every[r, : b - a])
        return torch.cat(parts)

    @torch.no_grad()
    def to_transcoder(self) -> Transcoder:
        """The full unsharded module (on every rank), e.g. to save it. Collective."""
        p = self.shard.W_enc
        kw = dataclasses.asdict(self._cfg)
        d_in, n = kw.pop("d_in"), kw.pop("n_features")
        full = Transcoder(d_in, n, dtype=p.dtype, device=p.device, init=False, **kw)
        for name, t in list(self.shard.named_parameters()) + list(self.shard.named_buffers()):
            getattr(full, name).copy_(self.gather_rows(t) if self._is_sharded(name) else t)
        full.decode_mode = self.decode_mode
        full.train(self.training)
        return full

    def get_extra_state(self):
        return {"n_features": self.n_features, "world_size": self.world_size, "rank": self.rank,
                "start": self.start, "stop": self.stop}

    def set_extra_state(self, state) -> None:
        mine = self.get_extra_state()
        if dict(state) != mine:
            raise ValueError(
                f"state_dict: this shard was saved as rank {state.get('rank')} of {state.get('world_size')} "
                f"(features {state.get('start')}:{state.get('stop')} of {state.get('n_features')}), but this "
                f"module is rank {self.rank} of {self.world_size} (features {self.start}:{self.stop} of "
                f"{self.n_features}); load it into the group it was made for, or save with to_transcoder()"
            )

    @property
    def config(self) -> TranscoderConfig:
        return dataclasses.replace(self._cfg)

    @property
    def decode_mode(self) -> str:
        """``"auto"``, ``"sparse"`` or ``"dense"``: how each slice's partial decode runs."""
        return self.shard.decode_mode

    @decode_mode.setter
    def decode_mode(self, value: str) -> None:
        self.shard.decode_mode = value

    def extra_repr(self) -> str:
        return (f"n_features={self.n_features}, features {self.start}:{self.stop} on rank {self.rank} "
                f"of {self.world_size}")

    # ---------------------------------------------------------------------------------------------
    # decoder norm, dead features: row-wise, so local
    # ---------------------------------------------------------------------------------------------

    def normalize_decoder_(self) -> None:
        self.shard.normalize_decoder_()

    def remove_parallel_gradient_(self) -> None:
        self.shard.remove_parallel_gradient_()

    def attach_decoder_norm_hooks(self, optimizer: torch.optim.Optimizer):
        return self.shard.attach_decoder_norm_hooks(optimizer)

    def dead_mask(self) -> Tensor:
        """``[n_local]`` bool: this slice's dead features."""
        return self.shard.dead_mask()

    def count_dead(self) -> Tensor:
        """Number of dead features of the whole dictionary (0-d int64, the same on every rank). Collective."""
        n = _metrics.count_dead(self.shard.tokens_since_fired, self._cfg.dead_tokens_threshold).clone()
        dist.all_reduce(n, group=self.group)
        return n

    @property
    def tokens_since_fired(self) -> Tensor:
        """This slice's ``[n_local]`` dead-feature counter (``self.shard``'s buffer)."""
        return self.shard.tokens_since_fired

    @property
    def threshold(self) -> Optional[Tensor]:
        """The BatchTopK inference threshold (replicated), or None."""
        return self.shard.threshold

    @property
    def l1_coefficient(self) -> float:
        """Weight of the sparsity term in ``forward_with_aux``'s loss; settable between steps."""
        return self.shard.l1_coefficient

    @l1_coefficient.setter
    def l1_coefficient(self, value: float) -> None:
        self.shard.l1_coefficient = value  # validates
        self._cfg = dataclasses.replace(self._cfg, l1_coefficient=self.shard.l1_coefficient)

    # ---------------------------------------------------------------------------------------------
    # encode
    # ---------------------------------------------------------------------------------------------

    def _local_input(self, x: Tensor) -> Tensor:
        self.shard._check_x(x)
        # after b_pre, so that b_pre (replicated) gets the summed gradient too
        x_in = self.shard._encoder_input(x).reshape(-1, self.d_in)
        return _CopyToShards.apply(x_in, self.group)

    def _encode(self, x: Tensor, mask: Optional[Tensor], want_global: bool):
        """``(global acts [M, w] or None, local acts [M, w'] over the slice, extra)``, acts flat;
        ``extra`` holds the slice's encoder input ``"x2"`` (shared by the losses, so that ``dx`` is
        summed over the group once), and ``"pre"`` (BatchTopK training: the slice's ``[M, N/P]``
        pre-activations) or ``"jump"`` (JumpReLU) as ``Transcoder._encode``'s."""
        flat_mask = _metrics.check_mask(mask, x.shape[:-1])
        x2 = self._local_input(x)
        extra = {"x2": x2}
        sh, act = self.shard, self.activation
        if act == "topk" or (act == "batchtopk" and not self.training and not float(sh.threshold) > 0):
            glob, local = self._topk(x2, want_global)
        elif act == "batchtopk" and self.training:
            glob, local, extra["pre"] = self._batchtopk(x2, flat_mask, want_global)
        else:
            if act == "relu":
                acts, counts = relu_encode(x2, sh.W_enc, sh.b_enc, sh._width)
                valid = valid_slots(counts, acts.values.shape[-1])
            elif act == "jumprelu":
                res = jumprelu_encode(x2, sh.W_enc, sh.b_enc, sh.log_threshold, self._cfg.jumprelu_bandwidth, sh._width)
                acts, valid = res.acts, res.valid
                extra["jump"] = res
            else:  # batchtopk inference with a learned threshold
                thr = sh.threshold.to(torch.promote_types(x.dtype, torch.float32)).expand(self.n_local)
                acts, counts = relu_encode(x2, sh.W_enc, sh.b_enc, sh._width, thr.contiguous())
                valid = valid_slots(counts, acts.values.shape[-1])
            local = acts
            glob = self._assemble_local(acts, valid) if want_global else None
        if self.training and sh.counts_fired_in_forward:
            sh.update_tokens_since_fired_(local, flat_mask)
        return glob, local, extra

    def _own(self, values: Tensor, pos: Tensor, own: Tensor, width: int) -> Tensor:
        """This rank's values at the global slots it owns (``pos``: slot in its candidate list of
        ``width``), zero elsewhere; differentiable in ``values``."""
        loc = (pos - self.rank * width).clamp(0, values.shape[-1] - 1)
        return values.gather(-1, loc) * own

    @torch.no_grad()
    def _select(self, key: Tensor, gidx: Tensor, K: int, k: int):
        """The global top ``k`` per row from every rank's candidates (``key [M, K']``, their global
        indices ``gidx``, ``K' <= K``; padded to ``K`` here), ranked as the op ranks (descending key,
        ties by ascending global index): ``(pos, sel, own)``, each ``[M, k]``: the slot in the
        gathered ``world·K`` candidates, the global feature, whether this rank's candidate it is."""
        M = key.shape[0]
        if key.shape[1] < K:
            key = torch.cat([key, key.new_full((M, K - key.shape[1]), float("-inf"))], 1)
            gidx = torch.cat([gidx, gidx.new_full((M, K - gidx.shape[1]), self.n_features)], 1)
        every = _all_gather(torch.stack([key.double(), gidx.double()], -1), self.group, self.world_size)
        every = every.permute(1, 0, 2, 3).reshape(M, self.world_size * K, 2)
        g = every[..., 1].long()
        pos = _rank_order(every[..., 0], g)[:, :k]
        return pos, g.gather(1, pos), (pos // K) == self.rank

    def _topk(self, x2: Tensor, want_global: bool):
        sh, k, K = self.shard, self.k, min(self.k, self._largest_slice)
        v, i = ops.encode_topk(x2, sh.W_enc, sh.b_enc, sh.k)
        with torch.no_grad():
            acc = torch.promote_types(v.dtype, torch.float32)
            # ReLU zeroed some candidates: rank those by their pre-activation, as the op does
            pre = ops.gather_dot(x2.detach(), i, sh.W_enc.detach()).to(acc) + sh.b_enc.detach()[i].to(acc)
            key = torch.where(v.detach() > 0, v.detach().to(acc), pre.clamp_max(0))
            pos, sel, own = self._select(key, i + self.start, K, k)
        vals = self._own(v, pos, own, K)
        local = SparseActivations(vals, torch.where(own, sel - self.start, torch.zeros_like(sel)))
        glob = SparseActivations(_ReduceFromShards.apply(vals, self.group), sel) if want_global else None
        return glob, local

    def _batchtopk(self, x2: Tensor, flat_mask: Optional[Tensor], want_global: bool):
        sh, N, Nl = self.shard, self.n_features, self.n_local
        M, dev = x2.shape[0], x2.device
        with torch.no_grad():
            pre = torch.addmm(sh.b_enc, x2, sh.W_enc.t())  # [M, N/P]: this slice only
            s = pre.float()
            if flat_mask is not None:
                s = s.masked_fill(~flat_mask.reshape(M, 1), 0.0)
                n_real = int(flat_mask.sum())
            else:
                n_real = M
            total = min(n_real * self.k, M * N)
            if total == 0:
                z = pre.new_zeros(M, 1)
                zi = torch.zeros(M, 1, dtype=torch.int64, device=dev)
                glob = SparseActivations(_ReduceFromShards.apply(z, self.group), zi) if want_global else None
                return glob, SparseActivations(z, zi), pre
            T = min(total, M * self._largest_slice)
            flat = s.reshape(-1)
            cand = _top_positions(flat, min(total, M * Nl))
            key = flat[cand]
            gpos = (cand // Nl) * N + self.start + cand % Nl  # global position m·N + feature
            keep = key > 0
            key = _pad_rows(torch.where(keep, key, torch.zeros_like(key)), T, 0.0)
            gpos = _pad_rows(torch.where(keep, gpos, torch.full_like(gpos, M * N)), T, M * N)
            every = _all_gather(torch.stack([key.double(), gpos.double()], -1), self.group, self.world_size)
            keys, gp = every[..., 0].reshape(-1), every[..., 1].reshape(-1).long()
            top = _rank_order(keys, gp)[:total]
            top = top[keys[top] > 0]
            if top.numel():
                self.shard._update_threshold(keys[top].min().float())
            flat_g, _ = gp[top].sort()
            rows, cols = flat_g // N, flat_g % N
            counts = torch.bincount(rows, minlength=M)
            width = max(int(counts.max()) if flat_g.numel() else 0, 1)
            slot = torch.arange(flat_g.numel(), device=dev) - (counts.cumsum(0) - counts)[rows]
            indices = torch.zeros(M, width, dtype=torch.int64, device=dev)
            indices[rows, slot] = cols
            mine = (cols >= self.start) & (cols < self.stop)
            r, c, j = rows[mine], cols[mine] - self.start, slot[mine]
            loc = torch.zeros(M, width, dtype=torch.int64, device=dev)
            loc[r, j] = c
            kept = torch.zeros(M, width, dtype=torch.bool, device=dev)
            kept[r, j] = True
            values = pre.new_zeros(M, width)
            values[r, j] = pre[r, c]
        values = gathered_pre(values, loc, x2, sh.W_enc, sh.b_enc, kept)
        glob = SparseActivations(_ReduceFromShards.apply(values, self.group), indices) if want_global else None
        return glob, SparseActivations(values, loc), pre

    def _assemble_local(self, acts: SparseActivations, valid: Tensor) -> SparseActivations:
        """Global padded activations (ascending feature index per row, width the largest row
        count) from every slice's local ones."""
        values, idx = acts
        M, w = values.shape
        with torch.no_grad():
            wmax = torch.tensor([w], device=self._comm_device)
            dist.all_reduce(wmax, op=dist.ReduceOp.MAX, group=self.group)
            W = int(wmax)
            g = torch.where(valid, idx + self.start, torch.full_like(idx, self.n_features))
            if W > w:
                g = torch.cat([g, g.new_full((M, W - w), self.n_features)], 1)
            every = _all_gather(g, self.group, self.world_size).permute(1, 0, 2).reshape(M, -1)
            gs, pos = every.sort(dim=1, stable=True)
            width = max(int((gs < self.n_features).sum(1).max()) if M else 0, 1)
            gs, pos = gs[:, :width], pos[:, :width]
            present = gs < self.n_features
            own = present & ((pos // W) == self.rank)
            gidx = torch.where(present, gs, torch.zeros_like(gs))
        vals = self._own(values, pos, own, W)
        return SparseActivations(_ReduceFromShards.apply(vals, self.group), gidx)

    def encode(self, x: Tensor, mask: Optional[Tensor] = None) -> SparseActivations:
        """x ``[..., d_in]`` (the same on every rank) -> activations ``[..., w]`` with global
        feature indices, the same on every rank. For TopK and BatchTopK the unsharded module's
        selection and order; for the ReLU family the active features in ascending index order,
        padded to the largest row's count. Gradients reaching ``values`` flow to each value's slice."""
        glob = self._encode(x, mask, True)[0]
        return self._unflatten(glob, x.shape[:-1])

    @staticmethod
    def _unflatten(acts: SparseActivations, lead) -> SparseActivations:
        w = acts.values.shape[-1]
        return SparseActivations(acts.values.reshape(*lead, w), acts.indices.reshape(*lead, w))

    # ---------------------------------------------------------------------------------------------
    # decode
    # ---------------------------------------------------------------------------------------------

    def _partial_decode(self, local: SparseActivations) -> Tensor:
        """This slice's share of the output, before the sum over the group and without b_dec or skip."""
        return _decode(local, self.shard.W_dec, None, mode=self.decode_mode)

    def _finish(self, partial: Tensor, x: Optional[Tensor], lead) -> Tensor:
        y = _ReduceFromShards.apply(partial, self.group)
        sh = self.shard
        if sh.b_dec is not None:
            y = y + sh.b_dec
        return sh._add_skip(y.reshape(*lead, self.d_out), x)

    def decode(self, acts: SparseActivations, x: Optional[Tensor] = None) -> Tensor:
        """Activations with global indices ``[..., w]`` (the same on every rank) -> ``[..., d_out]``.
        Each rank decodes the entries of its slice; ``x`` is needed for the skip term only."""
        values, indices = acts
        lead = values.shape[:-1]
        v, i = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
        own = (i >= self.start) & (i < self.stop)
        local = SparseActivations(v * own, torch.where(own, i - self.start, torch.zeros_like(i)))
        return self._finish(self._partial_decode(local), x, lead)

    def forward(self, x: Tensor) -> Tensor:
        """The replicated output ``[..., d_out]``, as ``Transcoder.forward``."""
        local = self._encode(x, None, False)[1]
        return self._finish(self._partial_decode(local), x, x.shape[:-1])

    # ---------------------------------------------------------------------------------------------
    # losses
    # ---------------------------------------------------------------------------------------------

    def _sum_over_slices(self, t: Tensor) -> Tensor:
        return _ReduceFromShards.apply(t, self.group)

    def _regularizers(self, local: SparseActivations, extra: dict, mask: Optional[Tensor], lead) -> dict:
        """``Transcoder._regularizers`` over the whole dictionary: each term is a sum over
        features, so every slice makes its share (the shard's own formulas on its local
        activations) and the shares are summed over the group."""
        sh = self.shard
        cfg = sh._cfg
        flat = _metrics.check_mask(mask, lead)
        terms = {}
        if self.activation in ("relu", "jumprelu") or cfg.l1_coefficient > 0:
            per_token = self._sum_over_slices(sh.sparsity_per_token(local))
            terms["sparsity"] = _metrics.masked_mean(per_token.reshape(lead), mask)
        if self.activation == "jumprelu":
            res = extra["jump"]
            step = StepSTE.apply(res.s, res.theta, res.valid, float(cfg.jumprelu_bandwidth))
            terms["l0"] = _metrics.masked_mean(self._sum_over_slices(step.sum(-1)).reshape(lead), mask)
        if cfg.pre_act_coefficient > 0:
            x2 = extra["x2"] if flat is None else extra["x2"][flat]
            if x2.shape[0] == 0:
                terms["pre_act"] = x2.new_zeros((), dtype=torch.promote_types(x2.dtype, torch.float32))
            else:
                terms["pre_act"] = self._sum_over_slices(sh._pre_act_sum(x2)) / x2.shape[0]
        return terms

    def auxk_loss(self, residual: Tensor, dead: Tensor, extra: dict, mask: Optional[Tensor], lead) -> Tensor:
        """``Transcoder.auxk_loss`` over the whole dictionary: ``dead`` is this slice's
        ``[n_local]`` mask, ``aux_k`` is capped by the dead features of all slices, and the
        ``aux_k`` largest dead pre-activations per token are chosen across the group as the main
        TopK is (each slice sends its own top candidates). Each slice decodes its chosen features
        and the partial reconstructions are summed; ``extra`` is what ``_encode`` returned."""
        sh = self.shard
        dt = torch.promote_types(residual.dtype, torch.float32)
        counts = _all_gather(dead.sum().reshape(1), self.group, self.world_size).reshape(-1)
        n_dead = int(counts.sum())
        if n_dead == 0:
            return residual.new_zeros((), dtype=dt)
        k_aux = min(self._cfg.aux_k or max(self.d_out // 2, 1), n_dead)
        K = min(k_aux, int(counts.max()))  # candidates per rank: no rank can have more in the top k_aux
        x_in, pre = extra["x2"], extra.get("pre")
        e = residual.reshape(-1, self.d_out)
        m = _metrics.check_mask(mask, lead)
        if m is not None:
            x_in, e = x_in[m], e[m]
            pre = pre[m] if pre is not None else None
        M = x_in.shape[0]
        if M == 0:
            return residual.new_zeros((), dtype=dt)
        kl = min(K, int(dead.sum()))
        # this slice's candidates, as the unsharded module makes them (values differentiable)
        if kl == 0:
            values = x_in.new_zeros(M, K)
            loc = torch.zeros(M, K, dtype=torch.int64, device=x_in.device)
            key = torch.full((M, K), float("-inf"), device=x_in.device)
        else:
            values, loc = dead_candidates(x_in, sh.W_enc, sh.b_enc, dead, kl, pre)
            # zero values add nothing to the reconstruction: how they rank does not matter
            key = values.detach().float()
            if kl < K:
                values = torch.cat([values, values.new_zeros(M, K - kl)], 1)
                loc = torch.cat([loc, loc.new_zeros(M, K - kl)], 1)
        pos, sel, own = self._select(key, loc + self.start, K, k_aux)
        chosen = SparseActivations(self._own(values, pos, own, K), torch.where(own, sel - self.start, 0))
        e_hat = self._sum_over_slices(_decode(chosen, sh.W_dec, None, mode=self.decode_mode))
        return unexplained_fraction(e, e_hat, dt)

    def forward_with_aux(
        self, x: Tensor, target: Optional[Tensor] = None, mask: Optional[Tensor] = None
    ) -> TranscoderOutput:
        """``Transcoder.forward_with_aux`` of the whole dictionary: the same losses and metrics
        (replicated on every rank), activations with global indices, and gradients that reach each
        rank's slice as the unsharded module's reach those features. Collective."""
        sh = self.shard
        cfg = sh._cfg
        target = sh._target(x, target)
        lead = x.shape[:-1]
        aux_coef = cfg.aux_coefficient
        dead = self.dead_mask() if aux_coef > 0 else None  # dead before this batch
        glob, local, extra = self._encode(x, mask, True)
        output = self._finish(self._partial_decode(local), x, lead)
        acts = self._unflatten(glob, lead)
        losses = {"mse": _metrics.mse(output, target, mask), "fvu": _metrics.fvu(output, target, mask)}
        terms = self._regularizers(local, extra, mask, lead)
        losses.update(terms)
        total = sh._weighted_regularizers(losses[cfg.reconstruction_loss], terms)
        if aux_coef > 0:
            losses["auxk"] = self.auxk_loss((target - output).detach(), dead, extra, mask, lead)
            total = total + aux_coef * losses["auxk"]
        losses["loss"] = total
        metrics = {
            "l0": _metrics.l0(acts.values.detach(), mask),
            "mse": losses["mse"].detach(),
            "fvu": losses["fvu"].detach(),
            "dead_features": self.count_dead(),
            "n_tokens": _metrics.n_tokens(lead, mask, device=x.device),
        }
        return TranscoderOutput(output, acts, losses, metrics)


# ------------------------------------------------------------------------------------------------
# cross-layer transcoder
# ------------------------------------------------------------------------------------------------


class FeatureShardedCrossLayerTranscoder(nn.Module):
    """A :class:`~tckernels.nn.crosslayer.CrossLayerTranscoder` whose features of every layer are
    split over a process group: ``self.layers[ℓ]`` is the :class:`FeatureShardedTranscoder` of
    source layer ℓ (its decoder rows hold the blocks for all targets ℓ' ≥ ℓ); ``b_dec`` and
    ``W_skip`` are replicated. The partial outputs of all sources and targets are summed over the
    group in one all-reduce. Build it with :meth:`from_crosslayer`; :meth:`to_crosslayer` gathers
    the full module back. Collective, like the per-layer module."""

    def __init__(self, layers: Sequence[FeatureShardedTranscoder], b_dec: Optional[Tensor], W_skip: Optional[Tensor]):
        super().__init__()
        layers = list(layers)
        if not layers:
            raise ValueError("layers must hold one FeatureShardedTranscoder per layer, got none")
        self.layers = nn.ModuleList(layers)
        first = layers[0]
        self.group, self.rank, self.world_size = first.group, first.rank, first.world_size
        self.n_layers, self.d_in, self.n_features = len(layers), first.d_in, first.n_features
        self.d_out = first.d_out // self.n_layers
        self.activation, self.k = first.activation, first.k
        self.start, self.stop = first.start, first.stop
        self.b_dec = nn.Parameter(b_dec.detach().clone()) if b_dec is not None else None
        self.W_skip = nn.Parameter(W_skip.detach().clone()) if W_skip is not None else None

    @classmethod
    def from_crosslayer(cls, clt: CrossLayerTranscoder, group=None, *, mesh_dim: Optional[str] = None):
        """This rank's slice of every layer of ``clt`` (the same module on every rank)."""
        if not isinstance(clt, CrossLayerTranscoder):
            raise TypeError(f"clt must be a CrossLayerTranscoder, got {type(clt).__name__}")
        layers = [FeatureShardedTranscoder.from_transcoder(t, group, mesh_dim=mesh_dim) for t in clt.layers]
        self = cls(layers, clt.b_dec, clt.W_skip)
        self.train(clt.training)
        return self

    @torch.no_grad()
    def copy_from_(self, clt: CrossLayerTranscoder) -> None:
        """Overwrite this rank's slices, in place, from ``clt`` (the same full module on every
        rank), as :meth:`FeatureShardedTranscoder.copy_from_`. Collective."""
        if not isinstance(clt, CrossLayerTranscoder):
            raise TypeError(f"clt must be a CrossLayerTranscoder, got {type(clt).__name__}")
        if clt.n_layers != self.n_layers:
            raise ValueError(f"clt: it has {clt.n_layers} layers, this module {self.n_layers}")
        for mine, full in zip(self.layers, clt.layers):
            mine.copy_from_(full)
        for name in ("b_dec", "W_skip"):
            if (getattr(self, name) is None) != (getattr(clt, name) is None):
                raise ValueError(f"clt: {name} is {'missing' if getattr(clt, name) is None else 'unexpected'}")
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(clt, name))
        self.train(clt.training)

    @torch.no_grad()
    def to_crosslayer(self) -> CrossLayerTranscoder:
        """The full unsharded module (on every rank). Collective."""
        full_layers = [layer.to_transcoder() for layer in self.layers]
        first = full_layers[0]
        kw = dataclasses.asdict(first.config)
        for name in ("d_in", "n_features", "d_out", "activation", "k", "skip", "dec_bias"):
            kw.pop(name)
        p = first.W_enc
        clt = CrossLayerTranscoder(
            self.n_layers, self.d_in, self.n_features, self.d_out, self.activation, k=self.k,
            skip=self.W_skip is not None, dec_bias=self.b_dec is not None, dtype=p.dtype, device=p.device, **kw,
        )
        for mine, full in zip(clt.layers, full_layers):
            mine.load_state_dict(full.state_dict())
            mine.decode_mode = full.decode_mode
        for name in ("b_dec", "W_skip"):
            if getattr(self, name) is not None:
                getattr(clt, name).copy_(getattr(self, name))
        clt.train(self.training)
        return clt

    _split = CrossLayerTranscoder._split

    @property
    def l1_coefficient(self) -> float:
        """Weight of the sparsity term; setting it sets every source layer's."""
        return self.layers[0].l1_coefficient

    @l1_coefficient.setter
    def l1_coefficient(self, value: float) -> None:
        for layer in self.layers:
            layer.l1_coefficient = value

    def count_dead(self) -> Tensor:
        """Dead features of all source layers together (0-d int64, the same on every rank). Collective."""
        return sum(layer.count_dead() for layer in self.layers)

    def normalize_decoder_(self) -> None:
        for layer in self.layers:
            layer.normalize_decoder_()

    def remove_parallel_gradient_(self) -> None:
        for layer in self.layers:
            layer.remove_parallel_gradient_()

    def encode(self, xs: Inputs, mask: Optional[Tensor] = None) -> List[SparseActivations]:
        """Per-layer activations with global feature indices (the same on every rank)."""
        return [layer.encode(x, mask) for layer, x in zip(self.layers, self._split(xs))]

    def _combine(self, locals_: Sequence[SparseActivations], xs_l: Optional[List[Tensor]], lead) -> List[Tensor]:
        d = self.d_out
        outs = fold_target_blocks([layer._partial_decode(a) for layer, a in zip(self.layers, locals_)], d)
        y = _ReduceFromShards.apply(torch.stack(outs), self.group)  # [L, M, d_out]: one all-reduce
        if self.b_dec is not None:
            y = y + self.b_dec.unsqueeze(1)
        outs = [o.reshape(*lead, d) for o in y.unbind(0)]
        if self.W_skip is not None:
            if xs_l is None:
                raise ValueError("this transcoder has skip connections: decode(acts, xs) needs the inputs")
            outs = [o + x @ self.W_skip[j].t() for j, (o, x) in enumerate(zip(outs, xs_l))]
        return outs

    def decode(self, acts: Sequence[SparseActivations], xs: Optional[Inputs] = None) -> List[Tensor]:
        """Per-layer activations with global indices -> the per-layer outputs ``[..., d_out]``."""
        acts = list(acts)
        if len(acts) != self.n_layers:
            raise ValueError(f"acts must hold one entry per layer ({self.n_layers}), got {len(acts)}")
        locals_ = []
        for layer, (values, indices) in zip(self.layers, acts):
            v, i = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
            own = (i >= layer.start) & (i < layer.stop)
            locals_.append(SparseActivations(v * own, torch.where(own, i - layer.start, torch.zeros_like(i))))
        xs_l = self._split(xs) if xs is not None else None
        return self._combine(locals_, xs_l, acts[0].values.shape[:-1])

    def forward(self, xs: Inputs) -> Union[Tensor, List[Tensor]]:
        xs_l = self._split(xs)
        locals_ = [layer._encode(x, None, False)[1] for layer, x in zip(self.layers, xs_l)]
        outs = self._combine(locals_, xs_l, xs_l[0].shape[:-1])
        return torch.stack(outs) if isinstance(xs, Tensor) else outs

    def forward_with_aux(self, xs: Inputs, targets: Inputs, mask: Optional[Tensor] = None) -> CrossLayerOutput:
        """``CrossLayerTranscoder.forward_with_aux`` of the whole dictionary: the same losses and
        metrics on every rank, per-layer activations with global indices. Each source's sparsity,
        L0, pre-activation and AuxK terms are its :class:`FeatureShardedTranscoder`'s. Collective."""
        xs_l = self._split(xs)
        ts = self._split(targets, "targets")
        lead = xs_l[0].shape[:-1]
        if tuple(ts[0].shape) != (*lead, self.d_out):
            raise ValueError(f"targets must be [..., d_out] = {(*lead, self.d_out)} per layer, got {tuple(ts[0].shape)}")
        first = self.layers[0].shard
        cfg = first._cfg
        aux_coef = cfg.aux_coefficient
        dead = [layer.dead_mask() for layer in self.layers] if aux_coef > 0 else None  # before this batch
        encoded = [layer._encode(x, mask, True) for layer, x in zip(self.layers, xs_l)]
        acts = [FeatureShardedTranscoder._unflatten(glob, lead) for glob, _, _ in encoded]
        outs = self._combine([local for _, local, _ in encoded], xs_l, lead)
        losses = {
            "mse": torch.stack([_metrics.mse(o, t, mask) for o, t in zip(outs, ts)]).mean(),
            "fvu": torch.stack([_metrics.fvu(o, t, mask) for o, t in zip(outs, ts)]).mean(),
        }
        per_source = [layer._regularizers(local, extra, mask, lead)
                      for layer, (_, local, extra) in zip(self.layers, encoded)]
        terms = {name: sum(t[name] for t in per_source) for name in per_source[0]}
        losses.update(terms)
        total = first._weighted_regularizers(losses[cfg.reconstruction_loss], terms)
        if aux_coef > 0:
            residuals = [(t - o).detach() for t, o in zip(ts, outs)]
            auxk = [
                layer.auxk_loss(torch.cat(residuals[src:], dim=-1), dead[src], extra, mask, lead)
                for src, (layer, (_, _, extra)) in enumerate(zip(self.layers, encoded))
            ]
            losses["auxk"] = torch.stack(auxk).mean()
            total = total + aux_coef * losses["auxk"]
        losses["loss"] = total
        metrics = {
            "l0": sum(_metrics.l0(a.values.detach(), mask) for a in acts),
            "mse": losses["mse"].detach(),
            "fvu": losses["fvu"].detach(),
            "dead_features": self.count_dead(),
            "n_tokens": _metrics.n_tokens(lead, mask),
        }
        return CrossLayerOutput(outs, acts, losses, metrics)
