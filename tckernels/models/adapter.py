"""Transcoder adapters for any decoder whose layers have an ``.mlp``: ``mlp(x) + dec(act(enc(x)))``.

:class:`TranscoderAdapterMLP` wraps a layer's MLP. It reads the MLP's own input (in Qwen2, Llama,
Qwen3, Mistral: the output of ``post_attention_layernorm``) and adds a sparse transcoder branch to
the MLP's output. Its state-dict keys are those of the transcoder-adapter release (seed 000)::

    gate_proj.*, up_proj.*, down_proj.*   the wrapped MLP's own modules, under their own names
    transcoder_enc.weight   [F, d]        W_enc, row per feature
    transcoder_enc.bias     [F]
    transcoder_dec.weight   [d, F]        the seed's nn.Linear(F, d) layout
    transcoder_dec.bias     [d]           only with ``dec_bias=True`` (the seed's default is False)
    transcoder_log_threshold [F]          JumpReLU only (not in the seed, which is ReLU-only)

so checkpoints written by the seed load unchanged, and ours load in the seed's code: the config
that ``Qwen2ForCausalLMWithTranscoder.save_pretrained`` writes carries the RoPE fields in the form
transformers 4.57 reads as well as transformers 5's (``tckernels.models.qwen2``).

Decoder layout: ``transcoder_dec.weight`` has the seed's shape ``[d, F]`` but its memory is row
per feature: it is the transpose view of a contiguous ``[F, d]`` tensor, so ``weight.t()`` is the
``W_dec [F, d]`` that ``tckernels.sparse_decode`` gathers rows from, with no copy per forward.
Its gradient has the same strides (autograd's layout contract), ``model.to(...)`` keeps them, and
``torch.nn.Module.load_state_dict`` copies into it in place. Loaders that replace parameters
(Hugging Face ``from_pretrained``) are followed by :func:`relayout_adapters_`;
``state_dict()`` exports a contiguous ``[d, F]`` copy (so ``safetensors`` can write it).
A decoder whose layout was lost still computes correctly (the op copies it); the first eager
forward puts it back.

Activations: ``"relu"`` (the paper; sparsity from the L1-style term :meth:`sparsity_term`),
``"topk"`` (``k`` per token) and ``"jumprelu"`` (learned thresholds, straight-through gradient),
all through ``tckernels.nn.activations``: one dense GEMM for the encoder, then the padded sparse
form ``[tokens, w]``; the decoder is sparse (gather-matmul) once the padded width ``w`` is a small
fraction of ``F`` and dense before that (``prefer_dense_decode``; ReLU at initialisation has about
half its features active).

Dtype: adapter parameters are created in the dtype of the wrapped MLP's parameters (they follow
the model through ``model.to``). The branch computes in its parameters' dtype: the input is cast
to it and the result cast back to the input's dtype when they differ, so adapters may be kept in
float32 (``add_transcoder_adapters(..., dtype=torch.float32)`` or ``cast_adapters_``) while the
base model runs in bfloat16; with equal dtypes nothing is cast.

Interventions (:meth:`TranscoderAdapterMLP.add_intervention`, model-level helpers in
``tckernels.models.interventions``) act on the features between encoder and decoder; recording
and statistics read the encoder's activations before any intervention.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from tckernels.nn import metrics as _metrics
from tckernels.nn.activations import (
    AutoWidth,
    SparseActivations,
    decode as _decode,
    jumprelu_encode,
    relu_encode,
    topk_encode,
)

__all__ = [
    "ACTIVATIONS",
    "TranscoderEncoder",
    "TranscoderDecoder",
    "TranscoderAdapterMLP",
    "LastActivations",
    "find_decoder_layers",
    "adapter_modules",
    "check_layers",
    "add_transcoder_adapters",
    "remove_transcoder_adapters",
    "init_adapters_",
    "adapter_parameters",
    "freeze_base_",
    "relayout_adapters_",
    "cast_adapters_",
    "build_hybrid",
]

ACTIVATIONS = ("relu", "topk", "jumprelu")
INTERVENTION_KINDS = ("zero", "scale", "clamp", "add")

FeatureSpec = Union[int, Sequence[int], Tensor, str, None]


# ------------------------------------------------------------------------------------------------
# encoder / decoder parameter holders
# ------------------------------------------------------------------------------------------------


class TranscoderEncoder(nn.Module):
    """``weight [F, d]`` (W_enc, row per feature) and ``bias [F]``: the seed's ``nn.Linear(d, F)``.

    Not an ``nn.Linear`` on purpose: quantizers and tensor-parallel plans that rewrite every
    Linear of a model must leave the adapter's weights alone (the sparse ops read them directly).
    """

    def __init__(self, d_model: int, n_features: int, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = d_model, n_features
        self.weight = nn.Parameter(torch.empty(n_features, d_model, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(n_features, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:  # dense pre-activations, for analysis
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"d_model={self.in_features}, n_features={self.out_features}"


def _row_per_feature(t: Tensor) -> Tensor:
    """``[d, F]`` tensor -> the same values as the transpose view of a contiguous ``[F, d]``."""
    return t.t().contiguous().t()


class TranscoderDecoder(nn.Module):
    """``weight [d, F]`` (the seed's ``nn.Linear(F, d)`` shape, stored row per feature, so
    :attr:`W_dec` ``= weight.t()`` is a contiguous ``[F, d]`` view) and ``bias [d]`` or None."""

    def __init__(self, n_features: int, d_model: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = n_features, d_model
        self.weight = nn.Parameter(torch.empty(n_features, d_model, dtype=dtype, device=device).t())
        self.bias = nn.Parameter(torch.empty(d_model, dtype=dtype, device=device)) if bias else None
        self._register_state_dict_hook(_TranscoderDecoderStateHook())
        self.register_load_state_dict_post_hook(_relayout_after_load)

    @property
    def W_dec(self) -> Tensor:
        """``[F, d]`` row per feature (a view of ``weight``; contiguous unless the layout was lost)."""
        return self.weight.t()

    def has_layout(self) -> bool:
        return self.weight.t().is_contiguous()

    @torch.no_grad()
    def ensure_layout_(self) -> "TranscoderDecoder":
        """Give ``weight`` its row-per-feature memory again (in place: the Parameter object, its
        ``requires_grad`` and any optimizer state keyed on it stay)."""
        w = self.weight
        if not w.t().is_contiguous() and w.device.type != "meta":
            w.data = _row_per_feature(w.data)
        return self

    def forward(self, f: Tensor) -> Tensor:  # dense decode, for analysis
        return nn.functional.linear(f, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"n_features={self.in_features}, d_model={self.out_features}, bias={self.bias is not None}"


def _relayout_after_load(module: "TranscoderDecoder", _incompatible_keys) -> None:
    module.ensure_layout_()  # load_state_dict(assign=True) replaces the weight


class _TranscoderDecoderStateHook:
    """state_dict hook: export the decoder weight as a contiguous ``[d, F]`` tensor (the seed's
    memory layout too), unless the caller asked for the Parameters themselves (keep_vars)."""

    def __call__(self, module, state_dict, prefix, local_metadata):
        key = prefix + "weight"
        t = state_dict.get(key)
        if t is not None and not isinstance(t, nn.Parameter) and not t.is_contiguous():
            state_dict[key] = t.contiguous()
        return state_dict


# ------------------------------------------------------------------------------------------------
# the adapter module
# ------------------------------------------------------------------------------------------------


class LastActivations(NamedTuple):
    """The encoder's activations in the last forward (before interventions)."""

    values: Tensor  # [..., w]; padded slots 0; differentiable when the forward was
    indices: Tensor  # [..., w] int64
    counts: Tensor  # [...] int64: active entries per token (may exceed w for a fixed k_max)


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


class InterventionHandle:
    """Removes the intervention(s) it stands for: ``handle.remove()``, or use it as a context
    manager (``with ablate_features(model, ...):``). Removing twice is harmless."""

    def __init__(self, entries: List[Tuple["TranscoderAdapterMLP", int]]):
        self._entries = entries

    def remove(self) -> None:
        for mlp, key in self._entries:
            mlp.remove_intervention(key)
        self._entries = []

    def __enter__(self) -> "InterventionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class TranscoderAdapterMLP(nn.Module):
    """``mlp(x) + dec(act(enc(x)))`` around an existing MLP module (see the module docstring).

    Parameters: ``mlp`` the module to wrap (its modules and parameters are registered here under
    their own names), ``n_features`` F, ``d_model`` the hidden size (inferred from the MLP when
    None), ``activation`` "relu" | "topk" | "jumprelu", ``k`` (TopK), ``k_max`` fixed padded width
    for ReLU/JumpReLU (None: adaptive, no entry ever dropped, one host sync per forward),
    ``dec_bias``, ``jumprelu_threshold`` (initial θ) and ``jumprelu_bandwidth`` (ε),
    ``dtype``/``device`` (default: the MLP's), ``init`` (apply the seed's initialisation).

    State: ``enabled`` (False: the wrapped MLP alone, bit for bit), ``record`` (keep the last
    forward's activations for :attr:`last_acts`, :meth:`sparsity_term`, :meth:`l0` and the
    feature statistics; default True), ``decode_mode`` ("auto" | "sparse" | "dense"),
    ``layer_index``.
    """

    def __init__(
        self,
        mlp: nn.Module,
        n_features: int,
        *,
        d_model: Optional[int] = None,
        activation: str = "relu",
        k: Optional[int] = None,
        k_max: Optional[int] = None,
        dec_bias: bool = False,
        jumprelu_threshold: float = 1e-3,
        jumprelu_bandwidth: float = 1e-3,
        dtype: Optional[torch.dtype] = None,
        device=None,
        init: bool = True,
        layer_index: Optional[int] = None,
    ):
        if isinstance(mlp, TranscoderAdapterMLP):
            raise TypeError("mlp already has a transcoder adapter (it is a TranscoderAdapterMLP)")
        if not isinstance(mlp, nn.Module):
            raise TypeError(f"mlp must be an nn.Module, got {type(mlp).__name__}")
        super().__init__()
        _check_pos_int(n_features, "n_features")
        inferred = infer_hidden_size(mlp)
        if d_model is None:
            if inferred is None:
                raise ValueError(f"cannot infer the hidden size of {type(mlp).__name__}; pass d_model")
            d_model = inferred
        _check_pos_int(d_model, "d_model")
        if inferred is not None and inferred != d_model:
            raise ValueError(
                f"d_model = {d_model} does not match the hidden size of the MLP ({type(mlp).__name__}: {inferred})"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if activation == "topk":
            if k is None:
                raise ValueError("activation 'topk' needs k (features per token)")
            _check_pos_int(k, "k")
            if k > n_features:
                raise ValueError(f"k must be <= n_features = {n_features}, got {k}")
        if k_max is not None:
            _check_pos_int(k_max, "k_max")
            if k_max > n_features:
                raise ValueError(f"k_max must be <= n_features = {n_features}, got {k_max}")
        for name, v in (("jumprelu_threshold", jumprelu_threshold), ("jumprelu_bandwidth", jumprelu_bandwidth)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")

        ref = next(iter(mlp.parameters()), None)
        dtype = dtype or (ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype())
        device = device if device is not None else (ref.device if ref is not None else None)

        # The wrapped MLP, not registered as a child: its modules/parameters/buffers are
        # registered on this module under their own names (the seed's keys), shared with it.
        for name, child in mlp.named_children():
            self.add_module(name, child)
        for name, p in mlp.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in mlp.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in mlp._non_persistent_buffers_set)
        self.__dict__["_base"] = mlp  # after the registrations (attribute look-ups fall back to it)

        self.d_model, self.n_features = d_model, n_features
        self.activation, self.k = activation, k
        self._k_max = k_max
        self.jumprelu_bandwidth = float(jumprelu_bandwidth)
        self.jumprelu_threshold = float(jumprelu_threshold)
        self.transcoder_enc = TranscoderEncoder(d_model, n_features, dtype=dtype, device=device)
        self.transcoder_dec = TranscoderDecoder(n_features, d_model, bias=dec_bias, dtype=dtype, device=device)
        if activation == "jumprelu":
            self.transcoder_log_threshold = nn.Parameter(torch.empty(n_features, dtype=dtype, device=device))
        else:
            self.transcoder_log_threshold = None

        self.enabled = True
        self.record = True
        self.decode_mode = "auto"
        self.layer_index = layer_index
        self._width = AutoWidth(n_features, fixed=k_max, initial=64)
        self._last: Optional[LastActivations] = None
        self._sinks: Dict[int, Callable] = {}
        self._interventions: Dict[int, Tuple[str, Tensor, Optional[Tensor]]] = {}
        self._next_key = 0
        self._affine = None  # cache: (scale [F] or None, shift_idx, shift_coef) on CPU float64
        self._affine_dev: Dict[tuple, tuple] = {}
        #: per feature, real tokens since it last fired (None until update_feature_stats_)
        self.tokens_since_fired: Optional[Tensor] = None
        if init:
            self.reset_adapter_parameters()

    # -------------------------------------------------------------------------------------------
    # wrapping
    # -------------------------------------------------------------------------------------------

    @property
    def k_max(self) -> Optional[int]:
        """Fixed padded width of the ReLU/JumpReLU encoders (rows with more active features keep
        their k_max largest), or None: adaptive, no entry dropped, one host sync per forward."""
        return self._k_max

    @k_max.setter
    def k_max(self, value: Optional[int]) -> None:
        if value is not None:
            _check_pos_int(value, "k_max")
            if value > self.n_features:
                raise ValueError(f"k_max must be <= n_features = {self.n_features}, got {value}")
        self._k_max = value
        self._width = AutoWidth(self.n_features, fixed=value, initial=64)

    @property
    def base_mlp(self) -> nn.Module:
        """The wrapped MLP module."""
        return self.__dict__["_base"]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None or name.startswith("_"):  # private state (hooks, flags) is not forwarded
                raise
            return getattr(base, name)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # keep the wrapped MLP's own modules/parameters in step with the ones registered here
        base = self.__dict__.get("_base")
        if base is not None and (name in base._modules or name in base._parameters or name in base._buffers):
            setattr(base, name, value)

    def _sync_base_(self) -> None:
        """Point the wrapped MLP at the modules/parameters registered here (after a loader
        replaced some of them with ``setattr`` on this module)."""
        base = self.base_mlp
        for name in list(base._modules):
            if name in self._modules and base._modules[name] is not self._modules[name]:
                base._modules[name] = self._modules[name]
        for name in list(base._parameters):
            if name in self._parameters and base._parameters[name] is not self._parameters[name]:
                base._parameters[name] = self._parameters[name]
        for name in list(base._buffers):
            if name in self._buffers and base._buffers[name] is not self._buffers[name]:
                base._buffers[name] = self._buffers[name]

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, n_features={self.n_features}, activation={self.activation!r}"
        if self.k is not None:
            s += f", k={self.k}"
        if self.k_max is not None:
            s += f", k_max={self.k_max}"
        if not self.enabled:
            s += ", enabled=False"
        return s

    # -------------------------------------------------------------------------------------------
    # parameters
    # -------------------------------------------------------------------------------------------

    @property
    def W_enc(self) -> Tensor:
        return self.transcoder_enc.weight

    @property
    def b_enc(self) -> Tensor:
        return self.transcoder_enc.bias

    @property
    def W_dec(self) -> Tensor:
        """``[F, d]`` row per feature (a view of ``transcoder_dec.weight``)."""
        return self.transcoder_dec.weight.t()

    @property
    def b_dec(self) -> Optional[Tensor]:
        return self.transcoder_dec.bias

    def adapter_parameters(self) -> List[nn.Parameter]:
        ps = [self.transcoder_enc.weight, self.transcoder_enc.bias, self.transcoder_dec.weight]
        if self.transcoder_dec.bias is not None:
            ps.append(self.transcoder_dec.bias)
        if self.transcoder_log_threshold is not None:
            ps.append(self.transcoder_log_threshold)
        return ps

    @torch.no_grad()
    def reset_adapter_parameters(self, seed: Optional[int] = None, only: Optional[Iterable[str]] = None) -> None:
        """The seed's initialisation: encoder weight ~ U(±1/√d), encoder bias 0, decoder weight and
        bias 0 (the branch adds exactly 0, so the model starts as the wrapped MLP), JumpReLU
        thresholds at ``jumprelu_threshold``. ``seed``: draw the encoder from a CPU generator with
        that seed (the same weights on every device). ``only``: names (as in this module's state
        dict, e.g. ``"transcoder_dec.weight"``) of the parameters to initialise; default all."""
        named = {
            "transcoder_enc.weight": self.transcoder_enc.weight,
            "transcoder_enc.bias": self.transcoder_enc.bias,
            "transcoder_dec.weight": self.transcoder_dec.weight,
            "transcoder_dec.bias": self.transcoder_dec.bias,
            "transcoder_log_threshold": self.transcoder_log_threshold,
        }
        wanted = set(named) if only is None else set(only)

        def todo(name):
            p = named[name]
            return name in wanted and p is not None and p.device.type != "meta"

        if todo("transcoder_enc.weight"):
            W = self.transcoder_enc.weight
            bound = 1.0 / math.sqrt(self.d_model)
            if seed is None:
                W.uniform_(-bound, bound)
            else:
                g = torch.Generator().manual_seed(int(seed))
                W.copy_(torch.empty(W.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g))
        for name in ("transcoder_enc.bias", "transcoder_dec.weight", "transcoder_dec.bias"):
            if todo(name):
                named[name].zero_()
        if todo("transcoder_log_threshold"):
            self.transcoder_log_threshold.fill_(math.log(self.jumprelu_threshold))
        self.transcoder_dec.ensure_layout_()
        self._width = AutoWidth(self.n_features, fixed=self.k_max, initial=64)
        self.tokens_since_fired = None
        self._last = None

    @torch.no_grad()
    def load_transcoder_(self, transcoder) -> "TranscoderAdapterMLP":
        """Copy the weights of a ``tckernels.nn.Transcoder`` (e.g. one of ``load_adapter000``'s)
        into this adapter; shapes must match (``d_in == d_out == d_model``, same ``n_features``)."""
        W_enc, W_dec = transcoder.W_enc, transcoder.W_dec
        if W_enc.shape[1] != self.d_model or W_dec.shape[1] != self.d_model:
            raise ValueError(
                f"transcoder has hidden size d_in={W_enc.shape[1]}, d_out={W_dec.shape[1]}; "
                f"this adapter's d_model is {self.d_model}"
            )
        if W_enc.shape[0] != self.n_features:
            raise ValueError(f"transcoder has n_features={W_enc.shape[0]}; this adapter has {self.n_features}")
        if (transcoder.b_dec is not None) != (self.b_dec is not None):
            raise ValueError(
                f"transcoder {'has' if transcoder.b_dec is not None else 'has no'} decoder bias; "
                f"this adapter {'has' if self.b_dec is not None else 'has none'}"
            )
        if getattr(transcoder, "W_skip", None) is not None or getattr(transcoder, "b_pre", None) is not None:
            raise ValueError("transcoder has a skip connection or pre-encoder bias, which an adapter does not have")
        self.transcoder_enc.weight.copy_(W_enc)
        self.transcoder_enc.bias.copy_(transcoder.b_enc)
        self.W_dec.copy_(W_dec)
        if self.b_dec is not None:
            self.b_dec.copy_(transcoder.b_dec)
        if self.transcoder_log_threshold is not None and getattr(transcoder, "log_threshold", None) is not None:
            self.transcoder_log_threshold.copy_(transcoder.log_threshold)
        return self

    # -------------------------------------------------------------------------------------------
    # forward
    # -------------------------------------------------------------------------------------------

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"hidden_states must have last dimension d_model = {self.d_model} (layer "
                f"{self.layer_index}), got shape {tuple(x.shape)}"
            )

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        self._check_input(hidden_states)
        out = self.base_mlp(hidden_states, *args, **kwargs)
        if not self.enabled:
            self._last = None
            return out
        delta = self.adapter_output(hidden_states)
        if isinstance(out, tuple):  # MLP blocks that return (output, extras)
            return (out[0] + delta,) + tuple(out[1:])
        return out + delta

    def encode(self, x: Tensor) -> Tuple[SparseActivations, Tensor]:
        """x ``[..., d]`` (in the adapter's dtype) -> (activations ``[..., w]``, counts ``[...]``)."""
        W, b = self.transcoder_enc.weight, self.transcoder_enc.bias
        if self.activation == "relu":
            return relu_encode(x, W, b, self._width)
        if self.activation == "topk":
            acts = topk_encode(x, W, b, self.k)
            return acts, (acts.values > 0).sum(-1)
        res = jumprelu_encode(x, W, b, self.transcoder_log_threshold, self.jumprelu_bandwidth, self._width)
        return res.acts, res.counts

    def decode(self, acts: SparseActivations) -> Tensor:
        """Sparse activations ``[..., w]`` -> ``[..., d]`` (with the decoder bias)."""
        dec = self.transcoder_dec
        if not dec.has_layout() and not _compiling():
            dec.ensure_layout_()  # once, after a loader replaced the weight (eager mode only)
        return _decode(acts, dec.weight.t(), dec.bias, mode=self.decode_mode)

    def adapter_output(self, hidden_states: Tensor) -> Tensor:
        """The branch alone, ``dec(act(enc(x)))`` with the interventions, in the input's dtype."""
        dt = self.transcoder_enc.weight.dtype
        x = hidden_states if hidden_states.dtype == dt else hidden_states.to(dt)
        acts, counts = self.encode(x)
        recompute = _in_backward()  # activation checkpointing re-running this forward: not a new pass
        if not recompute:
            self._last = LastActivations(acts.values, acts.indices, counts) if self.record else None
        if self._sinks and not recompute:
            v, i = acts.values.detach(), acts.indices
            for sink in list(self._sinks.values()):
                sink(self.layer_index, v, i)
        shift = None
        if self._interventions:
            scale, shift_idx, shift_coef = self._affine_on(acts.values.device, acts.values.dtype)
            if scale is not None:
                acts = SparseActivations(acts.values * scale[acts.indices], acts.indices)
            if shift_idx is not None:
                shift = (shift_coef.unsqueeze(1) * self.W_dec[shift_idx]).sum(0)
        y = self.decode(acts)
        if shift is not None:
            y = y + shift
        return y if y.dtype == hidden_states.dtype else y.to(hidden_states.dtype)

    # -------------------------------------------------------------------------------------------
    # last forward: activations, sparsity, statistics
    # -------------------------------------------------------------------------------------------

    @property
    def last_acts(self) -> Optional[LastActivations]:
        """(values, indices, counts) of the last forward, detached; None when the adapter was off
        or ``record`` is False."""
        last = self._last
        if last is None:
            return None
        return LastActivations(last.values.detach(), last.indices, last.counts)

    def _require_last(self, what: str) -> LastActivations:
        if self._last is None:
            raise RuntimeError(
                f"{what} needs the activations of a forward pass with this adapter enabled and record=True "
                f"(layer {self.layer_index})"
            )
        return self._last

    def _mask(self, mask: Optional[Tensor], lead) -> Optional[Tensor]:
        if mask is None:
            return None
        if isinstance(mask, Tensor) and mask.dtype != torch.bool and not mask.is_floating_point():
            mask = mask != 0  # an attention mask of 0/1
        if isinstance(mask, Tensor):
            mask = mask.to(self._last.values.device if self._last is not None else mask.device)
        _metrics.check_mask(mask, lead, "mask")
        return mask

    def sparsity_per_token(self) -> Tensor:
        """``Σ_i f_i·‖W_dec[i]‖₂`` for each token of the last forward, ``[...]`` (the tokens'
        leading shape), in float32 (float64 for float64 adapters); differentiable in f (hence in
        the encoder) and in W_dec. Reduce it as you like (per sequence, over a loss mask)."""
        last = self._require_last("sparsity_per_token")
        values, indices = last.values, last.indices
        dt = torch.promote_types(values.dtype, torch.float32)
        norms = self.W_dec.to(dt).norm(dim=1)
        return (values.to(dt) * norms[indices]).sum(-1)

    def sparsity_term(self, mask: Optional[Tensor] = None) -> Tensor:
        """The adapter paper's sparsity term S: :meth:`sparsity_per_token` averaged over the real
        tokens of the last forward. ``mask``: bool (or 0/1) tensor with the tokens' leading shape,
        e.g. the attention mask."""
        per_token = self.sparsity_per_token()
        return _metrics.masked_mean(per_token, self._mask(mask, per_token.shape))

    def l0(self, mask: Optional[Tensor] = None) -> Tensor:
        """Mean number of active features per real token in the last forward (0-d, no host sync)."""
        last = self._require_last("l0")
        return _metrics.l0(last.values.detach(), self._mask(mask, last.values.shape[:-1]))

    def fire_counts(self, mask: Optional[Tensor] = None) -> Tensor:
        """``[F]`` int64: on how many real tokens of the last forward each feature was active."""
        last = self._require_last("fire_counts")
        v = last.values.detach()
        return _metrics.feature_fire_counts(v, last.indices, self.n_features, self._mask(mask, v.shape[:-1]))

    @torch.no_grad()
    def update_feature_stats_(self, mask: Optional[Tensor] = None) -> Tensor:
        """Advance :attr:`tokens_since_fired` by the real tokens of the last forward and reset it
        for the features that fired on them. Returns the counter."""
        last = self._require_last("update_feature_stats_")
        v = last.values.detach()
        m = self._mask(mask, v.shape[:-1])
        if self.tokens_since_fired is None or self.tokens_since_fired.device != v.device:
            old = self.tokens_since_fired
            self.tokens_since_fired = (
                torch.zeros(self.n_features, dtype=torch.int64, device=v.device) if old is None else old.to(v.device)
            )
        return _metrics.update_tokens_since_fired_(self.tokens_since_fired, v, last.indices, m)

    def dead_features(self, threshold: int) -> Tensor:
        """``[F]`` bool: features that have not fired in the last ``threshold`` real tokens counted
        by :meth:`update_feature_stats_` (all False before any update)."""
        if self.tokens_since_fired is None:
            return torch.zeros(self.n_features, dtype=torch.bool, device=self.W_enc.device)
        return _metrics.dead_features(self.tokens_since_fired, threshold)

    def reset_feature_stats_(self) -> None:
        self.tokens_since_fired = None

    # -------------------------------------------------------------------------------------------
    # interventions
    # -------------------------------------------------------------------------------------------

    def add_intervention(self, kind: str, features: FeatureSpec, value=None) -> InterventionHandle:
        """Change features between encoder and decoder, on every token, until removed.

        ``kind``: ``"zero"`` (ablate: f_i = 0), ``"scale"`` (f_i *= value), ``"clamp"`` (f_i = value
        on every token, active or not) or ``"add"`` (f_i += value, i.e. add ``value·W_dec[i]``, the
        feature's decoder direction, to the output). ``features``: an index, a sequence, a tensor or
        ``"all"``; ``value``: a number or one per feature. Interventions compose in the order they
        were added (each feature's f ↦ a·f + c). Returns a handle (``.remove()``, or ``with``).
        """
        if kind not in INTERVENTION_KINDS:
            raise ValueError(f"kind must be one of {INTERVENTION_KINDS}, got {kind!r}")
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
        self._interventions[key] = (kind, idx, val)
        self._invalidate()
        return InterventionHandle([(self, key)])

    def remove_intervention(self, key: int) -> None:
        if self._interventions.pop(key, None) is not None:
            self._invalidate()

    def clear_interventions(self) -> None:
        self._interventions.clear()
        self._invalidate()

    @property
    def interventions(self) -> List[Tuple[str, Tensor, Optional[Tensor]]]:
        return list(self._interventions.values())

    def _invalidate(self) -> None:
        self._affine = None
        self._affine_dev = {}

    def _affine_cpu(self):
        if self._affine is None:
            n = self.n_features
            a = torch.ones(n, dtype=torch.float64)
            c = torch.zeros(n, dtype=torch.float64)
            for kind, idx, val in self._interventions.values():
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

    def _affine_on(self, device, dtype):
        key = (device, dtype)
        hit = self._affine_dev.get(key)
        if hit is None:
            scale, idx, coef = self._affine_cpu()
            hit = (
                None if scale is None else scale.to(device=device, dtype=dtype),
                None if idx is None else idx.to(device),
                None if coef is None else coef.to(device=device, dtype=dtype),
            )
            self._affine_dev[key] = hit
        return hit

    # -------------------------------------------------------------------------------------------
    # recording sinks (used by interventions.record_features)
    # -------------------------------------------------------------------------------------------

    def add_sink(self, fn: Callable[[Optional[int], Tensor, Tensor], None]) -> int:
        key = self._next_key
        self._next_key += 1
        self._sinks[key] = fn
        return key

    def remove_sink(self, key: int) -> None:
        self._sinks.pop(key, None)


def _in_backward() -> bool:
    """True inside a backward pass (e.g. activation checkpointing recomputing a forward)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and not _compiling() and fn() != -1


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def _check_pos_int(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def infer_hidden_size(mlp: nn.Module) -> Optional[int]:
    """The hidden size an MLP reads and writes, from its attributes or projections; None if unknown."""
    h = getattr(mlp, "hidden_size", None)
    if isinstance(h, int) and not isinstance(h, bool):
        return h
    for name in ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2"):
        m = getattr(mlp, name, None)
        if isinstance(m, nn.Linear):
            return m.out_features
    for name in ("gate_proj", "up_proj", "fc1", "c_fc", "dense_h_to_4h", "w1"):
        m = getattr(mlp, name, None)
        if isinstance(m, nn.Linear):
            return m.in_features
    return None


# ------------------------------------------------------------------------------------------------
# model-level helpers
# ------------------------------------------------------------------------------------------------


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


def check_layers(layers: Optional[Iterable[int]], available: Sequence[int], what: str = "layers") -> List[int]:
    """Validate a layer selection against the available layer indices (None: all of them)."""
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
            raise ValueError(f"{what}: unknown layer index {i}; layers with adapters: {desc if shown else 'none'}")
        if i not in out:
            out.append(i)
    return out


def _selected_adapters(model: nn.Module, layers=None, what: str = "layers") -> Dict[int, TranscoderAdapterMLP]:
    mods = adapter_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no transcoder adapters (add_transcoder_adapters adds them)")
    return {i: mods[i] for i in check_layers(layers, sorted(mods), what)}


def add_transcoder_adapters(
    model: nn.Module,
    n_features: int,
    *,
    layers: Optional[Iterable[int]] = None,
    activation: str = "relu",
    k: Optional[int] = None,
    k_max: Optional[int] = None,
    dec_bias: bool = False,
    jumprelu_threshold: float = 1e-3,
    jumprelu_bandwidth: float = 1e-3,
    d_model: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    init: bool = True,
    seed: Optional[int] = None,
    freeze: bool = True,
) -> nn.Module:
    """Wrap the MLP of each selected decoder layer in a :class:`TranscoderAdapterMLP` (in place).

    Works for any model whose decoder layers have an ``.mlp`` (Qwen2, Qwen3, Llama, Mistral, ...).
    ``layers``: indices (default: every layer); layers that already have an adapter raise.
    ``d_model``: checked against the model's hidden size (default: inferred). ``dtype``: the
    adapters' parameter dtype (default: the MLP's). ``init``/``seed``: the seed's initialisation
    (see :meth:`TranscoderAdapterMLP.reset_adapter_parameters`; layer i draws from ``seed + i``).
    ``freeze``: make the adapter parameters the only trainable ones. Returns the model.
    """
    decoder = find_decoder_layers(model)
    n_layers = len(decoder)
    selected = check_layers(layers, range(n_layers), "layers")
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
            layer.mlp, n_features, d_model=hidden, activation=activation, k=k, k_max=k_max, dec_bias=dec_bias,
            jumprelu_threshold=jumprelu_threshold, jumprelu_bandwidth=jumprelu_bandwidth, dtype=dtype,
            init=False, layer_index=i,
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
        mlp._sync_base_()
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
    """Apply the seed's initialisation to the adapters (all, or ``layers``): encoder U(±1/√d),
    biases 0, decoder 0, so the adapted model computes exactly what it computes without them.
    With ``seed``, layer i's encoder is drawn from a CPU generator seeded ``seed + i``."""
    for i, mlp in _selected_adapters(model, layers).items():
        mlp.reset_adapter_parameters(seed=None if seed is None else seed + i)
    return model


def adapter_parameters(model: nn.Module, layers: Optional[Iterable[int]] = None) -> List[nn.Parameter]:
    """The adapters' parameters, layer by layer (encoder weight, encoder bias, decoder weight,
    decoder bias, JumpReLU log-thresholds where present)."""
    out: List[nn.Parameter] = []
    for _, mlp in sorted(_selected_adapters(model, layers).items()):
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
        mlp._sync_base_()
    return model


@torch.no_grad()
def cast_adapters_(model: nn.Module, dtype: torch.dtype, layers: Optional[Iterable[int]] = None) -> nn.Module:
    """Cast the adapter parameters (only) to ``dtype``, e.g. float32 adapters on a bfloat16 model.
    The branch then computes in ``dtype`` (input cast in, result cast back). ``model.to(dtype)``
    casts everything again."""
    for mlp in _selected_adapters(model, layers).values():
        for p in mlp.adapter_parameters():
            p.data = p.data.to(dtype)
        mlp.transcoder_dec.ensure_layout_()
        mlp._invalidate()
    return model


def _plain_mlp(mlp: nn.Module) -> nn.Module:
    if isinstance(mlp, TranscoderAdapterMLP):
        mlp._sync_base_()
        return mlp.base_mlp
    return mlp


@torch.no_grad()
def build_hybrid(
    target_model: nn.Module, base_model: nn.Module, n_features: Optional[int] = None, **adapter_kwargs
) -> nn.Module:
    """The hybrid of the transcoder-adapter paper (the seed's ``backbone: target``): the target
    (fine-tuned) model with every MLP's weights replaced by the base model's, plus adapters.

    In place on ``target_model`` (``base_model`` is only read). If the target already has adapters
    (e.g. a ``Qwen2ForCausalLMWithTranscoder``) they are kept as they are; otherwise they are
    added with ``add_transcoder_adapters(target, n_features, **adapter_kwargs)`` and the seed's
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
        t_mlp, b_mlp = _plain_mlp(tl.mlp), _plain_mlp(bl.mlp)
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
    try:
        from tckernels.models.qwen2 import convert_to_transcoder_model, is_plain_qwen2_causal_lm
    except ImportError:  # transformers missing: a generic model
        is_plain_qwen2_causal_lm = None
    if is_plain_qwen2_causal_lm is not None and is_plain_qwen2_causal_lm(target_model):
        return convert_to_transcoder_model(target_model, n_features, **adapter_kwargs)
    return add_transcoder_adapters(target_model, n_features, **adapter_kwargs)

