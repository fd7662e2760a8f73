"""Transcoder adapters for any decoder whose layers have an ``.mlp``: ``mlp(x) + dec(act(enc(x)))``.

:class:`TranscoderAdapterMLP` wraps a layer's MLP. It reads the MLP's own input (in Qwen2, Llama,
Qwen3, Mistral: the output of ``post_attention_layernorm``) and adds the output of one
:class:`~tckernels.models.adapter_transcoder.AdapterTranscoder` (a ``tckernels.nn.Transcoder``
stored under the transcoder-adapter checkpoint names) to the MLP's output.

State-dict keys are those of the transcoder-adapter release::

    gate_proj.*, up_proj.*, down_proj.*   the wrapped MLP's own modules, under their own names
    transcoder_enc.*, transcoder_dec.*, transcoder_log_threshold   the transcoder's (see adapter_transcoder)

The wrapped MLP and the transcoder are not registered as children: their modules and parameters
are registered on the adapter under their own names (shared with them), which is what gives the
flat key layout, so checkpoints written by the release load unchanged and ours load in the
release's code.

Activations: ``"relu"`` (the paper; sparsity from the transcoder's ``sparsity_term``), ``"topk"``
(``k`` per token) and ``"jumprelu"`` (learned thresholds, straight-through gradient), all those of
``tckernels.nn.Transcoder`` that work token by token (BatchTopK ranks a whole batch, which a layer
inside a model's forward does not see).

Dtype: adapter parameters are created in the dtype of the wrapped MLP's parameters (they follow
the model through ``model.to``). The branch computes in its parameters' dtype: the input is cast
to it and the result cast back to the input's dtype when they differ, so adapters may be kept in
float32 while the base model runs in bfloat16; with equal dtypes nothing is cast.

The features between encoder and decoder are reachable through two documented channels:

- feature hooks (:meth:`TranscoderAdapterMLP.register_feature_hook`): called on every forward
  with the encoder's activations, before any edit; ``tckernels.models.features`` records through
  them, and the training loss gets the activations it needs that way;
- one feature edit (:attr:`TranscoderAdapterMLP.feature_edit`): a callable that may change the
  activations before they are decoded; ``tckernels.models.interventions`` installs it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tckernels.models.adapter_transcoder import AdapterTranscoder
from tckernels.nn import metrics as _metrics
from tckernels.nn.activations import SparseActivations
from tckernels.nn.transcoder import ACTIVATIONS as _TRANSCODER_ACTIVATIONS

__all__ = ["ACTIVATIONS", "ADAPTER_OPTIONS", "TranscoderAdapterMLP", "infer_hidden_size"]

#: The transcoder activations an adapter offers: those that select features token by token.
ACTIVATIONS = tuple(a for a in _TRANSCODER_ACTIVATIONS if a != "batchtopk")

#: The adapter's options (keyword arguments of TranscoderAdapterMLP and add_transcoder_adapters;
#: ``tckernels.models.qwen2`` stores each as the config field ``transcoder_<option>``).
ADAPTER_OPTIONS = ("activation", "k", "k_max", "dec_bias", "jumprelu_threshold", "jumprelu_bandwidth")

#: ``hook(adapter, acts)``; ``acts`` the encoder's activations ``[..., w]`` (values differentiable
#: when the forward is), before any edit.
FeatureHook = Callable[["TranscoderAdapterMLP", SparseActivations], None]

#: ``edit(acts, W_dec) -> (acts, shift)``: the activations to decode and an optional ``[d]``
#: vector added to the decoded output (or None).
FeatureEdit = Callable[[SparseActivations, Tensor], Tuple[SparseActivations, Optional[Tensor]]]


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


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class TranscoderAdapterMLP(nn.Module):
    """``mlp(x) + dec(act(enc(x)))`` around an existing MLP module (see the module docstring).

    Parameters: ``mlp`` the module to wrap, ``n_features`` F, ``d_model`` the hidden size
    (inferred from the MLP when None), ``activation`` "relu" | "topk" | "jumprelu", ``k`` (TopK),
    ``k_max`` fixed padded width for ReLU/JumpReLU (None: adaptive, no entry ever dropped, one
    host sync per forward), ``dec_bias``, ``jumprelu_threshold`` (initial θ) and
    ``jumprelu_bandwidth`` (ε), ``dtype``/``device`` (default: the MLP's), ``init`` (apply the
    release's initialisation: encoder U(±1/√d), biases and decoder 0, so the adapted layer starts
    as the wrapped MLP).

    State: ``enabled`` (False: the wrapped MLP alone, bit for bit), ``decode_mode`` ("auto" |
    "sparse" | "dense"), ``layer_index``, and the transcoder's dead-feature counter
    (:meth:`update_feature_stats_`, :meth:`dead_features`).
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
        for name, v in (("jumprelu_threshold", jumprelu_threshold), ("jumprelu_bandwidth", jumprelu_bandwidth)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")

        ref = next(iter(mlp.parameters()), None)
        dtype = dtype or (ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype())
        device = device if device is not None else (ref.device if ref is not None else None)
        transcoder = AdapterTranscoder(
            d_model, n_features, activation, k=k, k_max=k_max, dec_bias=dec_bias,
            jumprelu_threshold=float(jumprelu_threshold), jumprelu_bandwidth=float(jumprelu_bandwidth),
            dtype=dtype, device=device, init=init,
        )
        for held in (mlp, transcoder):
            self._register_shared(held)
        # after the registrations (attribute look-ups fall back to the wrapped MLP)
        self.__dict__["_base"] = mlp
        self.__dict__["_transcoder"] = transcoder

        self.enabled = True
        self.layer_index = layer_index
        #: the one edit applied between encoder and decoder (``tckernels.models.interventions``)
        self.feature_edit: Optional[FeatureEdit] = None
        self._feature_hooks: OrderedDict = OrderedDict()  # weak-referenceable, for RemovableHandle

    # -------------------------------------------------------------------------------------------
    # the two held modules
    # -------------------------------------------------------------------------------------------

    def _register_shared(self, held: nn.Module) -> None:
        """Register ``held``'s modules, parameters and persistent buffers here, under their names."""
        for name, child in held.named_children():
            self.add_module(name, child)
        for name, p in held.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in held.named_buffers(recurse=False):
            if name not in held._non_persistent_buffers_set:
                self.register_buffer(name, b)

    def _sync_held_(self) -> None:
        """Point the held modules at the modules/parameters/buffers registered here (after a
        loader or ``to_empty`` replaced some of them on this module)."""
        for held in (self.__dict__["_base"], self.__dict__["_transcoder"]):
            for store in ("_modules", "_parameters", "_buffers"):
                mine, theirs = getattr(self, store), getattr(held, store)
                for name in list(theirs):
                    if name in mine and theirs[name] is not mine[name]:
                        theirs[name] = mine[name]

    @property
    def base_mlp(self) -> nn.Module:
        """The wrapped MLP module."""
        return self.__dict__["_base"]

    @property
    def transcoder(self) -> AdapterTranscoder:
        """The adapter's transcoder (a ``tckernels.nn.Transcoder``)."""
        return self.__dict__["_transcoder"]

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
        # keep the held modules in step with what is registered here
        held = "_transcoder" in self.__dict__
        if held and (name in self._modules or name in self._parameters or name in self._buffers):
            self._sync_held_()

    def train(self, mode: bool = True) -> "TranscoderAdapterMLP":
        super().train(mode)
        self.transcoder.train(mode)
        return self

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
    # the transcoder's shape, options and parameters
    # -------------------------------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        return self.transcoder.d_in

    @property
    def n_features(self) -> int:
        return self.transcoder.n_features

    @property
    def activation(self) -> str:
        return self.transcoder.activation

    @property
    def k(self) -> Optional[int]:
        return self.transcoder.k

    @property
    def k_max(self) -> Optional[int]:
        """See ``tckernels.nn.Transcoder.k_max`` (settable)."""
        return self.transcoder.k_max

    @k_max.setter
    def k_max(self, value: Optional[int]) -> None:
        self.transcoder.k_max = value

    @property
    def jumprelu_threshold(self) -> float:
        return self.transcoder.config.jumprelu_threshold

    @property
    def jumprelu_bandwidth(self) -> float:
        return self.transcoder.config.jumprelu_bandwidth

    @property
    def decode_mode(self) -> str:
        """"auto" (by padded width), "sparse" or "dense": how the decoder runs (settable)."""
        return self.transcoder.decode_mode

    @decode_mode.setter
    def decode_mode(self, value: str) -> None:
        self.transcoder.decode_mode = value

    @property
    def W_enc(self) -> Tensor:
        return self.transcoder.W_enc

    @property
    def b_enc(self) -> Tensor:
        return self.transcoder.b_enc

    @property
    def W_dec(self) -> Tensor:
        """``[F, d]`` row per feature (a view of ``transcoder_dec.weight``)."""
        return self.transcoder.W_dec

    @property
    def b_dec(self) -> Optional[Tensor]:
        return self.transcoder.b_dec

    def adapter_parameters(self) -> List[nn.Parameter]:
        """Encoder weight, encoder bias, decoder weight, decoder bias and JumpReLU log-thresholds
        (those that exist), in that order."""
        return list(self.transcoder.checkpoint_parameters().values())

    def reset_adapter_parameters(self, seed: Optional[int] = None, only=None) -> None:
        """The release's initialisation (see the class docstring); ``seed``: draw the encoder from a
        CPU generator with that seed (the same weights on every device). ``only``: checkpoint names
        (``"transcoder_dec.weight"``) of the parameters to initialise; default all."""
        self.transcoder.reset_parameters(seed=seed, only=only)

    @torch.no_grad()
    def load_transcoder_(self, transcoder) -> "TranscoderAdapterMLP":
        """Copy the weights of a ``tckernels.nn.Transcoder`` (e.g. one read by
        ``tckernels.nn.formats``) into this adapter; shapes must match (``d_in == d_out ==
        d_model``, same ``n_features``)."""
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
        self.W_enc.copy_(W_enc)
        self.b_enc.copy_(transcoder.b_enc)
        self.W_dec.copy_(W_dec)
        if self.b_dec is not None:
            self.b_dec.copy_(transcoder.b_dec)
        mine, theirs = self.transcoder.log_threshold, getattr(transcoder, "log_threshold", None)
        if mine is not None and theirs is not None:
            mine.copy_(theirs)
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
        if not _compiling():
            self._sync_held_()
        out = self.base_mlp(hidden_states, *args, **kwargs)
        if not self.enabled:
            return out
        delta = self.adapter_output(hidden_states)
        if isinstance(out, tuple):  # MLP blocks that return (output, extras)
            return (out[0] + delta,) + tuple(out[1:])
        return out + delta

    def encode(self, x: Tensor) -> SparseActivations:
        """x ``[..., d]`` in the adapter's dtype -> the encoder's activations ``[..., w]``."""
        return self.transcoder.encode(x)

    def decode(self, acts: SparseActivations) -> Tensor:
        """Sparse activations ``[..., w]`` -> ``[..., d]`` (with the decoder bias)."""
        return self.transcoder.decode(acts)

    def adapter_output(self, hidden_states: Tensor) -> Tensor:
        """The branch alone, ``dec(edit(act(enc(x))))``, in the input's dtype; calls the feature
        hooks with the encoder's activations."""
        dt = self.W_enc.dtype
        x = hidden_states if hidden_states.dtype == dt else hidden_states.to(dt)
        acts = self.encode(x)
        for hook in list(self._feature_hooks.values()):
            hook(self, acts)
        shift = None
        if self.feature_edit is not None:
            acts, shift = self.feature_edit(acts, self.W_dec)
        y = self.decode(acts)
        if shift is not None:
            y = y + shift
        return y if y.dtype == hidden_states.dtype else y.to(hidden_states.dtype)

    def register_feature_hook(self, hook: FeatureHook) -> RemovableHandle:
        """Call ``hook(adapter, acts)`` on every forward with the adapter enabled, with the
        encoder's activations (``SparseActivations``, values differentiable when the forward is,
        padded slots 0), before any edit. A forward that activation checkpointing re-runs during
        backward calls the hook again. Returns a handle: ``handle.remove()``."""
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._feature_hooks)
        self._feature_hooks[handle.id] = hook
        return handle

    # -------------------------------------------------------------------------------------------
    # dead-feature counter (the transcoder's)
    # -------------------------------------------------------------------------------------------

    def _counter(self, device=None) -> Tensor:
        """The transcoder's counter on ``device`` (default: the weights'). It is not registered
        here (it is not saved), so model-wide moves and meta-device loading do not reach it."""
        tc = self.transcoder
        device = torch.device(device) if device is not None else self.W_enc.device
        counter = tc.tokens_since_fired
        if counter.device.type == "meta":
            counter = torch.zeros(self.n_features, dtype=torch.int64)
        if counter.device != device:
            tc.tokens_since_fired = counter = counter.to(device)
        return counter

    @property
    def tokens_since_fired(self) -> Tensor:
        """``[F]`` int64: real tokens counted by :meth:`update_feature_stats_` since each feature fired."""
        return self._counter()

    @torch.no_grad()
    def update_feature_stats_(self, acts: SparseActivations, mask: Optional[Tensor] = None) -> Tensor:
        """Advance the dead-feature counter by the real tokens of ``acts`` (this adapter's
        activations of one forward; ``mask`` bool ``[...]``) and reset it for the features that
        fired on them. Returns the counter."""
        self._counter(acts.values.device)
        return self.transcoder.update_tokens_since_fired_(acts, mask)

    def dead_features(self, threshold: int) -> Tensor:
        """``[F]`` bool: features that have not fired in the last ``threshold`` real tokens counted
        by :meth:`update_feature_stats_` (all False before any update)."""
        return _metrics.dead_features(self._counter(), threshold)

    def reset_feature_stats_(self) -> None:
        self._counter().zero_()
