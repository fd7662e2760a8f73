"""Transcoder: ``y = dec(act(enc(x))) (+ x @ W_skipᵀ)`` on the tckernels sparse ops.

Weights are stored row per feature: ``W_enc [N, d_in]``, ``W_dec [N, d_out]``. The encoder's
dense GEMM is the only dense work for TopK, ReLU and JumpReLU; everything after it, and the whole
backward, works on the ``[tokens, k]`` sparse form (see ``tckernels.nn.activations``). BatchTopK
training materialises the ``[tokens, N]`` pre-activations once in forward (it must rank the whole
batch) but keeps nothing of that size for backward.

Activations (``activation=``):

- ``"topk"``: the ``k`` largest of ``relu(x @ W_encᵀ + b_enc)`` per token.
- ``"batchtopk"``: while training, the ``M·k`` largest over the batch of ``M`` real tokens (a token
  may get more or fewer than ``k``); a running threshold (EMA, factor ``batchtopk_threshold_beta``,
  of the smallest kept value per batch, as in Bussmann et al. 2024) is learned alongside. In eval
  mode the features with ``s > threshold`` are active (through ``tckernels.encode_relu``); before
  any training step (threshold unset) eval falls back to per-token TopK(k).
- ``"relu"``: ``relu(s)``; the sparsity term ``Σ_i f_i·‖W_dec[i]‖₂`` (mean over real tokens, the
  transcoder-adapter paper's S) is weighted by ``l1_coefficient`` in the loss.
- ``"jumprelu"``: ``s·H(s − θ)``, ``θ = exp(log_threshold)``, with the straight-through threshold
  gradient of width ``jumprelu_bandwidth`` (Rajamanoharan et al. 2024); optional L0 term
  (``l0_coefficient``) with the same estimator.

Sparsity options of the published cross-layer-transcoder recipes (Anthropic, "Circuit Tracing"
2025 and "Circuits Updates, January 2025"):

- ``sparsity_tanh_scale = c``: the sparsity term becomes ``Σ_i tanh(c·f_i·‖W_dec[i]‖₂)``.
- ``pre_act_coefficient > 0`` (ReLU, JumpReLU): adds the pre-activation loss
  ``Σ_i ReLU(θ_i − h_i)·‖W_dec[i]‖₂`` over all N features (:meth:`Transcoder.pre_act_loss`), which
  pushes up the pre-activations of features that never fire.
- ``l1_coefficient`` can be changed between steps (``model.l1_coefficient = ...``), to ramp it.

The ReLU-family encoders use a padded width ``k_max``: fixed when given (rows with more active
features keep their ``k_max`` largest), else adaptive from the measured counts (no entry is ever
dropped; one host synchronisation per call). Decoding is sparse or dense by the padded width
(``tckernels.nn.activations.prefer_dense_decode``: dense above N/4 on CPU, N/64 on CUDA); set
``model.decode_mode`` to ``"sparse"`` or ``"dense"`` to force one.

Decoder norm (``normalize_decoder=True``): call ``remove_parallel_gradient_()`` after backward and
before ``optimizer.step()``, and ``normalize_decoder_()`` after it, or let
``attach_decoder_norm_hooks(optimizer)`` do both as optimizer step hooks.

State updated in training-mode forward passes (``model.train()``): the BatchTopK threshold and
the per-feature count of real tokens since each feature last fired (``tokens_since_fired``), from
which dead features (``dead_tokens_threshold`` tokens without firing) and the AuxK loss follow.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from tckernels import ops
from tckernels.nn import metrics as _metrics
from tckernels.nn.activations import (
    AutoWidth,
    JumpReLUResult,
    SparseActivations,
    StepSTE,
    batchtopk_select,
    decode as _decode,
    gathered_pre,
    jumprelu_encode,
    relu_encode,
    topk_encode,
)

__all__ = ["TranscoderConfig", "Transcoder", "TranscoderOutput", "SparseActivations"]

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")
DEC_INITS = ("zero", "unit_norm", "transpose")
RECONSTRUCTION_LOSSES = ("mse", "fvu")
_PARAMETER_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "b_pre", "log_threshold")
#: Entries of the dense pre-activations the pre-activation loss makes at a time (64 MiB in float32).
_PRE_ACT_CHUNK_ENTRIES = 1 << 24


class _PreActLoss(torch.autograd.Function):
    """``Σ_m Σ_i ReLU(θ_i − h[m, i])·norms[i]`` with ``h = x @ W_encᵀ + b_enc``, made a chunk of
    rows at a time; backward makes each chunk of h again instead of keeping it. θ gets no gradient.

    With ``a = [h < θ]``: ``dL/dh = −norms·a``, ``dL/dnorms = Σ_m ReLU(θ − h)``, and from dL/dh the
    usual ``dW_enc = dhᵀx``, ``db_enc = Σ_m dh``, ``dx = dh·W_enc``.
    """

    @staticmethod
    def _chunk_pre(x, W_enc, b_enc, theta, start, chunk):
        xc = x[start:start + chunk]
        h = torch.addmm(b_enc, xc, W_enc.t()) if b_enc is not None else xc @ W_enc.t()
        return xc, theta - h.to(theta.dtype)

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, theta, norms, chunk: int):
        ctx.save_for_backward(x, W_enc, b_enc, theta, norms)
        ctx.chunk = chunk
        total = norms.new_zeros(())
        for start in range(0, x.shape[0], chunk):
            _, gap = _PreActLoss._chunk_pre(x, W_enc, b_enc, theta, start, chunk)
            total = total + gap.clamp_min(0).sum(0) @ norms
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, W_enc, b_enc, theta, norms = ctx.saved_tensors
        need_x, need_w, need_b, _, need_n, _ = ctx.needs_input_grad
        d_x = torch.empty_like(x) if need_x else None
        d_W = torch.zeros_like(W_enc, dtype=theta.dtype) if need_w else None
        d_b = torch.zeros_like(theta) if need_b else None
        d_n = torch.zeros_like(norms) if need_n else None
        neg = -(grad * norms)
        for start in range(0, x.shape[0], ctx.chunk):
            xc, gap = _PreActLoss._chunk_pre(x, W_enc, b_enc, theta, start, ctx.chunk)
            below = gap > 0
            if need_n:
                d_n += gap.clamp_min(0).sum(0) * grad
            d_h = below * neg  # [chunk, N], accumulation dtype
            if need_w:
                d_W += d_h.t() @ xc.to(d_h.dtype)
            if need_b:
                d_b += d_h.sum(0)
            if need_x:
                d_x[start:start + ctx.chunk] = (d_h.to(W_enc.dtype) @ W_enc).to(x.dtype)
        d_W = d_W.to(W_enc.dtype) if d_W is not None else None
        d_b = d_b.to(b_enc.dtype) if d_b is not None else None
        return d_x, d_W, d_b, None, d_n, None


@dataclass
class TranscoderConfig:
    """Everything that defines a transcoder's shape and training behaviour (saved by ``tckernels.nn.formats.tckernels_transcoder``)."""

    d_in: int
    n_features: int
    d_out: Optional[int] = None  # None -> d_in
    activation: str = "topk"  # "topk" | "batchtopk" | "relu" | "jumprelu"
    k: Optional[int] = None  # TopK / BatchTopK
    skip: bool = False  # W_skip [d_out, d_in]: x @ W_skipᵀ added to the output
    pre_bias: bool = False  # b_pre [d_in]: the encoder reads x - b_pre
    dec_bias: bool = True  # b_dec [d_out]
    dec_init: str = "unit_norm"  # "zero" (adapters) | "unit_norm" | "transpose" (W_dec = W_enc normalised)
    normalize_decoder: bool = False  # keep W_dec rows unit-norm; remove the gradient's parallel component
    k_max: Optional[int] = None  # ReLU/JumpReLU/BatchTopK-eval: padded width (None -> adaptive)
    jumprelu_threshold: float = 0.001  # initial θ
    jumprelu_bandwidth: float = 0.001  # ε of the straight-through estimator
    l1_coefficient: float = 0.0  # weight of Σ_i f_i·‖W_dec[i]‖₂ (ReLU, JumpReLU; any activation if > 0)
    l0_coefficient: float = 0.0  # JumpReLU: weight of the L0 term (straight-through)
    aux_k: Optional[int] = None  # AuxK: features per token among the dead ones (None -> d_out // 2)
    aux_k_coefficient: Optional[float] = None  # None -> 1/32 for TopK/BatchTopK, 0 otherwise
    dead_tokens_threshold: int = 10_000_000  # a feature is dead after this many real tokens without firing
    batchtopk_threshold_beta: float = 0.999  # EMA factor of the BatchTopK inference threshold
    reconstruction_loss: str = "mse"  # term in losses["loss"]: "mse" or "fvu"
    sparsity_tanh_scale: Optional[float] = None  # c: sparsity Σ_i tanh(c·f_i·‖W_dec[i]‖₂) instead of Σ_i f_i·‖W_dec[i]‖₂
    pre_act_coefficient: float = 0.0  # ReLU, JumpReLU: weight of Σ_i ReLU(θ_i − h_i)·‖W_dec[i]‖₂

    def __post_init__(self):
        def pos_int(v, name, allow_none=False):
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        pos_int(self.d_in, "d_in")
        pos_int(self.n_features, "n_features")
        pos_int(self.d_out, "d_out", allow_none=True)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise ValueError(f"activation {self.activation!r} needs k (features per token)")
            pos_int(self.k, "k")
            if self.k > self.n_features:
                raise ValueError(f"k must be <= n_features = {self.n_features}, got {self.k}")
        elif self.k is not None:
            pos_int(self.k, "k")
        pos_int(self.k_max, "k_max", allow_none=True)
        if self.k_max is not None and self.k_max > self.n_features:
            raise ValueError(f"k_max must be <= n_features = {self.n_features}, got {self.k_max}")
        pos_int(self.aux_k, "aux_k", allow_none=True)
        pos_int(self.dead_tokens_threshold, "dead_tokens_threshold")
        if self.dec_init not in DEC_INITS:
            raise ValueError(f"dec_init must be one of {DEC_INITS}, got {self.dec_init!r}")
        if self.dec_init == "transpose" and self.out_dim != self.d_in:
            raise ValueError(f"dec_init='transpose' needs d_out == d_in, got d_in={self.d_in}, d_out={self.out_dim}")
        if self.dec_init == "zero" and self.normalize_decoder:
            raise ValueError(
                "normalize_decoder=True keeps decoder rows unit-norm; it cannot start from dec_init='zero'"
            )
        if not self.jumprelu_threshold > 0:
            raise ValueError(f"jumprelu_threshold must be > 0, got {self.jumprelu_threshold!r}")
        if not self.jumprelu_bandwidth > 0:
            raise ValueError(f"jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth!r}")
        for name in ("l1_coefficient", "l0_coefficient", "pre_act_coefficient"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.pre_act_coefficient > 0 and self.activation in ("topk", "batchtopk"):
            # a TopK feature is off because others are larger, not because it is below a
            # threshold: there is no θ to push its pre-activation above
            raise ValueError(
                f"pre_act_coefficient applies to activation 'relu' or 'jumprelu', not {self.activation!r}"
            )
        c = self.sparsity_tanh_scale
        if c is not None and (isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < c < math.inf):
            raise ValueError(f"sparsity_tanh_scale must be a finite number > 0 or None, got {c!r}")
        if self.aux_k_coefficient is not None and not self.aux_k_coefficient >= 0:
            raise ValueError(f"aux_k_coefficient must be >= 0 or None, got {self.aux_k_coefficient!r}")
        if not 0 <= self.batchtopk_threshold_beta < 1:
            raise ValueError(f"batchtopk_threshold_beta must be in [0, 1), got {self.batchtopk_threshold_beta!r}")
        if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, got {self.reconstruction_loss!r}"
            )

    @property
    def out_dim(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    @property
    def aux_coefficient(self) -> float:
        if self.aux_k_coefficient is not None:
            return float(self.aux_k_coefficient)
        return 1.0 / 32.0 if self.activation in ("topk", "batchtopk") else 0.0


def _check_coefficient(value, name: str) -> float:
    """``value`` as a float, if it is a finite real number >= 0 (a loss weight set at run time)."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}") from None
    if not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return v


class TranscoderOutput(NamedTuple):
    output: Tensor  # [..., d_out]
    acts: SparseActivations  # [..., w]
    # "loss" (the total to minimise), "mse", "fvu", and where they apply "sparsity", "l0", "pre_act", "auxk"
    losses: Dict[str, Tensor]
    metrics: Dict[str, Tensor]  # detached: "l0", "mse", "fvu", "dead_features", "n_tokens"


def dead_candidates(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, dead: Tensor, k: int,
                    pre: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """AuxK's candidates: per token the ``k`` largest (ReLU'd) pre-activations among the ``dead``
    rows of ``W_enc``, as ``(values [M, k], row indices [M, k])`` (values differentiable). From
    ``pre`` (the dense pre-activations, when the encoder made them), from one GEMM on the dead rows
    alone when at most half the rows are dead, else from the fused encoder with the live rows
    masked out (no copy of most of W_enc)."""
    dead_idx = dead.nonzero().squeeze(1)
    if pre is not None:
        pre_dead = pre[:, dead_idx]
        top_v, loc = pre_dead.float().clamp_min(0).topk(k, dim=1)
        kept = top_v > 0
        idx = dead_idx[loc]
        return gathered_pre(pre_dead.gather(1, loc) * kept, idx, x_in, W_enc, b_enc, kept), idx
    if 2 * dead_idx.numel() <= W_enc.shape[0]:
        values, loc = ops.encode_topk(x_in, W_enc[dead_idx], b_enc[dead_idx], k)
        return values, dead_idx[loc]
    return ops.encode_topk(x_in, W_enc, b_enc.masked_fill(~dead, float("-inf")), k)


def unexplained_fraction(e: Tensor, e_hat: Tensor, dt: torch.dtype) -> Tensor:
    """``Σ‖e − ê‖² / Σ‖e‖²`` in ``dt`` (AuxK's loss)."""
    num = (e.to(dt) - e_hat.to(dt)).pow(2).sum()
    den = e.to(dt).pow(2).sum()
    return num / den.clamp_min(torch.finfo(dt).tiny)


class Transcoder(nn.Module):
    """Sparse transcoder ``x [..., d_in] -> y [..., d_out]``; see the module docstring."""

    def __init__(
        self,
        d_in: int,
        n_features: int,
        d_out: Optional[int] = None,
        activation: str = "topk",
        *,
        k: Optional[int] = None,
        skip: bool = False,
        pre_bias: bool = False,
        dec_bias: bool = True,
        dec_init: str = "unit_norm",
        normalize_decoder: bool = False,
        k_max: Optional[int] = None,
        jumprelu_threshold: float = 0.001,
        jumprelu_bandwidth: float = 0.001,
        l1_coefficient: float = 0.0,
        dtype: Optional[torch.dtype] = None,
        device=None,
        init: bool = True,
        **extra,
    ):
        super().__init__()
        fields = {f.name for f in dataclasses.fields(TranscoderConfig)}
        unknown = sorted(set(extra) - fields)
        if unknown:
            raise TypeError(f"Transcoder got unexpected keyword argument(s): {', '.join(unknown)}")
        cfg = TranscoderConfig(
            d_in=d_in, n_features=n_features, d_out=d_out, activation=activation, k=k, skip=skip,
            pre_bias=pre_bias, dec_bias=dec_bias, dec_init=dec_init, normalize_decoder=normalize_decoder,
            k_max=k_max, jumprelu_threshold=jumprelu_threshold, jumprelu_bandwidth=jumprelu_bandwidth,
            l1_coefficient=l1_coefficient, **extra,
        )
        self._cfg = cfg
        self.d_in, self.n_features, self.d_out = cfg.d_in, cfg.n_features, cfg.out_dim
        self.activation = cfg.activation
        self.k = cfg.k
        #: "auto" (by padded width), "sparse" or "dense": how decode() runs.
        self.decode_mode = "auto"
        self._init_parameters(dtype, device)

        self._width = self._new_width()
        if init:  # False: the caller overwrites every weight (a loader) or initialises them itself
            self.reset_parameters()

    #: Whether a training-mode forward counts its tokens into ``tokens_since_fired``. A
    #: transcoder adapter cannot: inside a model's forward it does not know which tokens are
    #: padding, so its model counts afterwards with :meth:`update_tokens_since_fired_`.
    counts_fired_in_forward = True

    def _new_width(self) -> AutoWidth:
        """The padded width of the ReLU-family encoders, from its starting point."""
        cfg = self._cfg
        initial = min(self.n_features, 4 * cfg.k) if cfg.activation == "batchtopk" else 64
        return AutoWidth(self.n_features, fixed=cfg.k_max, initial=initial)

    def _init_parameters(self, dtype, device) -> None:
        """Create the parameters and buffers (the one place that knows how they are stored)."""
        cfg = self._cfg
        fk = dict(dtype=dtype, device=device)
        N, di, do = self.n_features, self.d_in, self.d_out
        self.W_enc = nn.Parameter(torch.empty(N, di, **fk))
        self.b_enc = nn.Parameter(torch.zeros(N, **fk))
        self.W_dec = nn.Parameter(torch.empty(N, do, **fk))
        self.b_dec = nn.Parameter(torch.zeros(do, **fk)) if cfg.dec_bias else None
        self.W_skip = nn.Parameter(torch.zeros(do, di, **fk)) if cfg.skip else None
        self.b_pre = nn.Parameter(torch.zeros(di, **fk)) if cfg.pre_bias else None
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((N,), math.log(cfg.jumprelu_threshold), **fk))
        else:
            self.log_threshold = None
        if cfg.activation == "batchtopk":
            # < 0: not learned yet. Kept in float32 unless the whole module is cast.
            self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float32, device=device))
        else:
            self.threshold = None
        self.register_buffer("tokens_since_fired", torch.zeros(N, dtype=torch.int64, device=device))

    # -------------------------------------------------------------------------------------------
    # construction
    # -------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: TranscoderConfig, dtype: Optional[torch.dtype] = None, device=None) -> "Transcoder":
        kw = dataclasses.asdict(cfg)
        d_in, n_features = kw.pop("d_in"), kw.pop("n_features")
        return cls(d_in, n_features, dtype=dtype, device=device, **kw)

    @property
    def config(self) -> TranscoderConfig:
        return dataclasses.replace(self._cfg)

    @property
    def k_max(self) -> Optional[int]:
        """Fixed padded width of the ReLU-family encoders (rows with more active features keep
        their k_max largest), or None: adaptive, no entry dropped, one host sync per forward."""
        return self._cfg.k_max

    @k_max.setter
    def k_max(self, value: Optional[int]) -> None:
        self._cfg = dataclasses.replace(self._cfg, k_max=value)  # validated by the config
        self._width = self._new_width()

    @property
    def l1_coefficient(self) -> float:
        """Weight of the sparsity term in ``forward_with_aux``'s loss. Settable between steps (a
        finite float >= 0), so a training loop can ramp it."""
        return self._cfg.l1_coefficient

    @l1_coefficient.setter
    def l1_coefficient(self, value: float) -> None:
        self._cfg = dataclasses.replace(self._cfg, l1_coefficient=_check_coefficient(value, "l1_coefficient"))

    @torch.no_grad()
    def reset_parameters(self, seed: Optional[int] = None, only: Optional[Iterable[str]] = None) -> None:
        """Encoder rows ~ U(±1/√d_in), biases and W_skip zero, decoder by ``dec_init``,
        JumpReLU thresholds at ``jumprelu_threshold``; the BatchTopK threshold and the
        dead-feature counter restart.

        ``seed``: draw the encoder from a float32 CPU generator with that seed, so the same seed
        gives the same weights on every device and in every dtype. ``only``: names of the
        parameters to initialise (``"W_enc"``, ``"b_enc"``, ``"W_dec"``, ``"b_dec"``, ``"W_skip"``,
        ``"b_pre"``, ``"log_threshold"``); default all, and then the state restarts too.
        """
        wanted = set(_PARAMETER_NAMES) if only is None else set(only)
        unknown = wanted - set(_PARAMETER_NAMES)
        if unknown:
            raise ValueError(f"only: unknown parameter name(s) {sorted(unknown)}; expected some of {_PARAMETER_NAMES}")

        def todo(name):
            p = getattr(self, name)
            return name in wanted and p is not None and p.device.type != "meta"

        if todo("W_enc"):
            bound = 1.0 / math.sqrt(self.d_in)
            if seed is None:
                self.W_enc.uniform_(-bound, bound)
            else:
                g = torch.Generator().manual_seed(int(seed))
                self.W_enc.copy_(torch.empty(self.W_enc.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g))
        if todo("W_dec"):
            init = self._cfg.dec_init
            if init == "zero":
                self.W_dec.zero_()
            elif init == "unit_norm":
                self.W_dec.normal_()
                self.normalize_decoder_()
            else:  # transpose
                self.W_dec.copy_(self.W_enc)
                self.normalize_decoder_()
        for name in ("b_enc", "b_dec", "W_skip", "b_pre"):
            if todo(name):
                getattr(self, name).zero_()
        if todo("log_threshold"):
            self.log_threshold.fill_(math.log(self._cfg.jumprelu_threshold))
        if only is None:
            if self.threshold is not None:
                self.threshold.fill_(-1.0)
            self.tokens_since_fired.zero_()
            self._width = self._new_width()

    def extra_repr(self) -> str:
        c = self._cfg
        s = f"d_in={self.d_in}, n_features={self.n_features}, d_out={self.d_out}, activation={c.activation!r}"
        if c.k is not None:
            s += f", k={c.k}"
        for name in ("skip", "pre_bias", "normalize_decoder"):
            if getattr(c, name):
                s += f", {name}=True"
        return s

    # -------------------------------------------------------------------------------------------
    # decoder norm
    # -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every decoder row to unit L2 norm (zero rows stay zero)."""
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norm.clamp_min(torch.finfo(norm.dtype).tiny))

    @torch.no_grad()
    def remove_parallel_gradient_(self) -> None:
        """Project each decoder row's gradient onto the plane orthogonal to the row:
        ``g_i -= (⟨g_i, w_i⟩ / ‖w_i‖²)·w_i``. Call after backward, before ``optimizer.step()``."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        dt = torch.promote_types(w.dtype, torch.float32)
        wf, gf = w.to(dt), g.to(dt)
        coef = (gf * wf).sum(1, keepdim=True) / (wf * wf).sum(1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
        g.copy_((gf - coef * wf).to(g.dtype))

    def attach_decoder_norm_hooks(self, optimizer: torch.optim.Optimizer):
        """Register optimizer hooks: ``remove_parallel_gradient_`` before each step and
        ``normalize_decoder_`` after it. Returns the two hook handles (``.remove()`` them to stop)."""
        pre = optimizer.register_step_pre_hook(lambda *_: self.remove_parallel_gradient_())
        post = optimizer.register_step_post_hook(lambda *_: self.normalize_decoder_())
        return pre, post

    # -------------------------------------------------------------------------------------------
    # encode / decode
    # -------------------------------------------------------------------------------------------

    def _check_x(self, x: Tensor, name: str = "x") -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"{name} must have last dimension d_in = {self.d_in}, got shape {tuple(x.shape)}")
        if x.dtype != self.W_enc.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but the transcoder's weights are {self.W_enc.dtype}; cast one of them"
            )

    def _encoder_input(self, x: Tensor) -> Tensor:
        return x if self.b_pre is None else x - self.b_pre

    def _encode(self, x: Tensor, mask: Optional[Tensor] = None) -> Tuple[SparseActivations, dict]:
        self._check_x(x)
        lead = x.shape[:-1]
        flat_mask = _metrics.check_mask(mask, lead)
        x_in = self._encoder_input(x)
        extra: dict = {}
        act = self.activation
        if act == "topk":
            acts = topk_encode(x_in, self.W_enc, self.b_enc, self.k)
        elif act == "batchtopk":
            if self.training:
                acts, extra["pre"] = self._batchtopk_train(x_in, flat_mask)
            elif float(self.threshold) > 0:
                thr = self.threshold.to(torch.promote_types(x.dtype, torch.float32)).expand(self.n_features)
                acts, _ = relu_encode(x_in, self.W_enc, self.b_enc, self._width, thr.contiguous())
            else:
                acts = topk_encode(x_in, self.W_enc, self.b_enc, self.k)
        elif act == "relu":
            acts, _ = relu_encode(x_in, self.W_enc, self.b_enc, self._width)
        else:  # jumprelu
            res = jumprelu_encode(
                x_in, self.W_enc, self.b_enc, self.log_threshold, self._cfg.jumprelu_bandwidth, self._width
            )
            acts = res.acts
            extra["jump"] = res
        if self.training and self.counts_fired_in_forward:
            self.update_tokens_since_fired_(acts, mask)
        return acts, extra

    def _batchtopk_train(self, x_in: Tensor, flat_mask: Optional[Tensor]) -> Tuple[SparseActivations, Tensor]:
        lead = x_in.shape[:-1]
        x2 = x_in.reshape(-1, self.d_in)
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x2, self.W_enc.t())
        values, indices, kept, min_kept = batchtopk_select(pre, self.k, flat_mask)
        values = gathered_pre(values, indices, x2, self.W_enc, self.b_enc, kept)
        if min_kept is not None:
            self._update_threshold(min_kept)
        w = values.shape[-1]
        return SparseActivations(values.reshape(*lead, w), indices.reshape(*lead, w)), pre

    @torch.no_grad()
    def _update_threshold(self, min_kept: Tensor) -> None:
        beta = self._cfg.batchtopk_threshold_beta
        v = min_kept.to(self.threshold.dtype)
        t = self.threshold
        self.threshold.copy_(torch.where(t < 0, v, beta * t + (1 - beta) * v))

    def encode(self, x: Tensor, mask: Optional[Tensor] = None) -> SparseActivations:
        """x ``[..., d_in]`` -> sparse activations ``[..., w]`` (w = k for TopK; the padded width
        otherwise). ``mask`` (bool ``[...]``) marks real tokens: padding tokens take no part in
        BatchTopK's batch selection and do not count as seen for dead-feature tracking."""
        return self._encode(x, mask)[0]

    def decode(self, acts: SparseActivations, x: Optional[Tensor] = None) -> Tensor:
        """Sparse activations ``[..., w]`` -> ``[..., d_out]``; ``x`` is needed for the skip term only."""
        values, indices = acts
        y = _decode(SparseActivations(values, indices), self.W_dec, self.b_dec, mode=self.decode_mode)
        return self._add_skip(y, x)

    def _add_skip(self, y: Tensor, x: Optional[Tensor]) -> Tensor:
        """``y`` plus the skip term ``x @ W_skip.T`` when there is one (``x`` required then)."""
        if self.W_skip is None:
            return y
        if x is None:
            raise ValueError("this transcoder has a skip connection: decode(acts, x) needs the input x")
        self._check_x(x)
        return y + x @ self.W_skip.t()

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    # -------------------------------------------------------------------------------------------
    # losses
    # -------------------------------------------------------------------------------------------

    def dead_mask(self) -> Tensor:
        """``[N]`` bool: features that have not fired in the last ``dead_tokens_threshold`` tokens."""
        return _metrics.dead_features(self.tokens_since_fired, self._cfg.dead_tokens_threshold)

    @torch.no_grad()
    def update_tokens_since_fired_(self, acts: SparseActivations, mask: Optional[Tensor] = None) -> Tensor:
        """Advance ``tokens_since_fired`` by the real tokens of ``acts`` (``mask``: bool ``[...]``)
        and reset it for the features active on them. Returns the counter."""
        return _metrics.update_tokens_since_fired_(self.tokens_since_fired, acts.values.detach(), acts.indices, mask)

    def sparsity_per_token(self, acts: SparseActivations) -> Tensor:
        """``Σ_i f_i·‖W_dec[i]‖₂`` for each token, ``[...]``, or ``Σ_i tanh(c·f_i·‖W_dec[i]‖₂)``
        when the config's ``sparsity_tanh_scale`` is c; in float32 (float64 for float64
        weights); differentiable in f (hence in the encoder) and in W_dec. Sums over the sparse
        slots only: padded slots hold f = 0 and add 0 in either form."""
        values, indices = acts
        dt = torch.promote_types(values.dtype, torch.float32)
        norms = self.W_dec.to(dt).norm(dim=1)
        weighted = values.to(dt) * norms[indices]
        c = self._cfg.sparsity_tanh_scale
        if c is not None:
            weighted = torch.tanh(c * weighted)
        return weighted.sum(-1)

    def sparsity_term(self, acts: SparseActivations, mask: Optional[Tensor] = None) -> Tensor:
        """:meth:`sparsity_per_token`, mean over real tokens (the transcoder-adapter paper's S)."""
        return _metrics.masked_mean(self.sparsity_per_token(acts), mask)

    def pre_act_loss(self, x: Tensor, mask: Optional[Tensor] = None, chunk_tokens: Optional[int] = None) -> Tensor:
        """Pre-activation loss ``Σ_i ReLU(θ_i − h_i(x))·‖W_dec[i]‖₂``, mean over real tokens, with
        ``h = x_in @ W_encᵀ + b_enc`` the dense pre-activations of all N features and θ =
        ``exp(log_threshold)`` (JumpReLU) or 0 (ReLU). It pushes up the pre-activations of features
        that do not fire, dead ones included.

        Gradients reach W_enc, b_enc, b_pre (and x) through h and W_dec through the norms. θ is
        detached: the loss would otherwise lower the thresholds, undoing the L0 and sparsity terms
        that set them. The ``[tokens, N]`` pre-activations are made ``chunk_tokens`` rows at a time
        (default: about 2**24 entries) in forward and made again in backward, so no tensor of
        that size is kept between them. Float32 accumulation (float64 for float64 weights).
        """
        self._check_x(x)
        if self.activation not in ("relu", "jumprelu"):
            raise ValueError(
                f"the pre-activation loss (pre_act_coefficient) applies to 'relu' or 'jumprelu', not {self.activation!r}"
            )
        if chunk_tokens is not None and (
                isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1):
            raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
        x_in = self._encoder_input(x).reshape(-1, self.d_in)
        m = _metrics.check_mask(mask, x.shape[:-1])
        if m is not None:
            x_in = x_in[m]
        n_real = x_in.shape[0]
        if n_real == 0:
            return x.new_zeros((), dtype=torch.promote_types(self.W_enc.dtype, torch.float32))
        return self._pre_act_sum(x_in, chunk_tokens) / n_real

    def _pre_act_sum(self, x_in: Tensor, chunk_tokens: Optional[int] = None) -> Tensor:
        """The pre-activation loss summed over the rows of the encoder input ``x_in [M, d_in]``
        (after ``b_pre``, real tokens only): a feature-sharded module sums it over its slices."""
        dt = torch.promote_types(self.W_enc.dtype, torch.float32)
        if self.log_threshold is None:
            theta = torch.zeros(self.n_features, dtype=dt, device=x_in.device)
        else:
            theta = self.log_threshold.detach().to(dt).exp()
        if chunk_tokens is None:
            chunk_tokens = max(1, _PRE_ACT_CHUNK_ENTRIES // self.n_features)
        norms = self.W_dec.to(dt).norm(dim=1)
        return _PreActLoss.apply(x_in, self.W_enc, self.b_enc, theta, norms, chunk_tokens)

    def auxk_loss(
        self,
        x: Tensor,
        residual: Tensor,
        dead: Tensor,
        mask: Optional[Tensor] = None,
        pre: Optional[Tensor] = None,
    ) -> Tensor:
        """AuxK (Gao et al. 2024): reconstruct the residual ``e = target − output`` (pass it
        detached) from the ``aux_k`` largest pre-activations among the dead features:
        ``Σ‖e − ê‖² / Σ‖e‖²`` over real tokens, ê decoded without bias or skip.

        The dead features' pre-activations come from ``pre`` (the dense ``[M, N]`` pre-activations,
        when the encoder already made them) or from one GEMM on the dead encoder rows alone
        (``W_enc[dead]``, M·n_dead·d_in instead of M·N·d_in) when at most half the features are
        dead; above that, from the full-width fused encoder with the live features masked out,
        which needs no copy of most of W_enc.
        """
        dt = torch.promote_types(residual.dtype, torch.float32)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return residual.new_zeros((), dtype=dt)
        k_aux = min(self._cfg.aux_k or max(self.d_out // 2, 1), n_dead)
        x_in = self._encoder_input(x).reshape(-1, self.d_in)
        e = residual.reshape(-1, self.d_out)
        if mask is not None:
            m = _metrics.check_mask(mask, x.shape[:-1])
            x_in, e = x_in[m], e[m]
            if pre is not None:
                pre = pre[m]
        if x_in.shape[0] == 0:
            return residual.new_zeros((), dtype=dt)
        values, gidx = dead_candidates(x_in, self.W_enc, self.b_enc, dead, k_aux, pre)
        e_hat = _decode(SparseActivations(values, gidx), self.W_dec, None, mode=self.decode_mode)
        return unexplained_fraction(e, e_hat, dt)

    def _regularizers(self, x: Tensor, acts: SparseActivations, extra: dict, mask: Optional[Tensor]) -> Dict[str, Tensor]:
        """The unweighted terms "sparsity", "l0" and "pre_act" where they apply, for the
        activations and ``extra`` that ``_encode(x, mask)`` returned."""
        cfg = self._cfg
        terms: Dict[str, Tensor] = {}
        if self.activation in ("relu", "jumprelu") or cfg.l1_coefficient > 0:
            terms["sparsity"] = self.sparsity_term(acts, mask)
        if self.activation == "jumprelu":
            res: JumpReLUResult = extra["jump"]
            step = StepSTE.apply(res.s, res.theta, res.valid, float(cfg.jumprelu_bandwidth))
            terms["l0"] = _metrics.masked_mean(step.sum(-1), mask)
        if cfg.pre_act_coefficient > 0:
            terms["pre_act"] = self.pre_act_loss(x, mask)
        return terms

    def _weighted_regularizers(self, total: Tensor, terms: Dict[str, Tensor]) -> Tensor:
        """``total`` plus each of :meth:`_regularizers`' terms times its coefficient (those > 0)."""
        cfg = self._cfg
        weights = (
            ("sparsity", cfg.l1_coefficient), ("l0", cfg.l0_coefficient), ("pre_act", cfg.pre_act_coefficient)
        )
        for name, coef in weights:
            if name in terms and coef > 0:
                total = total + coef * terms[name]
        return total

    def _target(self, x: Tensor, target: Optional[Tensor]) -> Tensor:
        """``forward_with_aux``'s target, checked against ``x`` (default: x itself when d_out == d_in)."""
        self._check_x(x)
        lead = x.shape[:-1]
        if target is None:
            if self.d_out != self.d_in:
                raise ValueError(f"target is required when d_out ({self.d_out}) != d_in ({self.d_in})")
            return x
        if tuple(target.shape) != (*lead, self.d_out):
            raise ValueError(f"target must have shape {(*lead, self.d_out)}, got {tuple(target.shape)}")
        return target

    def forward_with_aux(
        self, x: Tensor, target: Optional[Tensor] = None, mask: Optional[Tensor] = None
    ) -> TranscoderOutput:
        """Forward pass with the training losses and metrics.

        target ``[..., d_out]`` (default: x, which needs d_out == d_in); mask bool ``[...]`` marks
        the real tokens: losses and metrics count them only. ``losses["loss"]`` is the objective:
        the reconstruction term (``reconstruction_loss``: "mse" or "fvu") plus
        ``l1_coefficient·sparsity`` + ``l0_coefficient·l0`` (JumpReLU) +
        ``pre_act_coefficient·pre_act`` (:meth:`pre_act_loss`) + ``aux_k_coefficient·auxk``.
        """
        cfg = self._cfg
        target = self._target(x, target)
        lead = x.shape[:-1]
        _metrics.check_mask(mask, lead)
        aux_coef = cfg.aux_coefficient
        dead = self.dead_mask() if aux_coef > 0 else None  # dead before this batch

        acts, extra = self._encode(x, mask)
        output = self.decode(acts, x)

        losses: Dict[str, Tensor] = {}
        losses["mse"] = _metrics.mse(output, target, mask)
        losses["fvu"] = _metrics.fvu(output, target, mask)
        terms = self._regularizers(x, acts, extra, mask)
        losses.update(terms)
        total = self._weighted_regularizers(losses[cfg.reconstruction_loss], terms)
        if aux_coef > 0:
            losses["auxk"] = self.auxk_loss(x, (target - output).detach(), dead, mask, extra.get("pre"))
            total = total + aux_coef * losses["auxk"]
        losses["loss"] = total

        metrics = {
            "l0": _metrics.l0(acts.values.detach(), mask),
            "mse": losses["mse"].detach(),
            "fvu": losses["fvu"].detach(),
            "dead_features": _metrics.count_dead(self.tokens_since_fired, cfg.dead_tokens_threshold),
            "n_tokens": _metrics.n_tokens(lead, mask, device=x.device),
        }
        return TranscoderOutput(output, acts, losses, metrics)
