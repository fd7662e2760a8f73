"""Qwen2 with a transcoder adapter on every MLP, as released with the transcoder-adapter paper
on Hugging Face transformers.

- :class:`Qwen2TranscoderConfig`: ``Qwen2Config`` plus the release's ``transcoder_n_features`` and
  ``transcoder_dec_bias`` (same names and defaults: 512, False) and ours: ``transcoder_activation``
  ("relu" | "topk" | "jumprelu"), ``transcoder_k`` (TopK), ``transcoder_k_max`` (fixed padded
  width; None adapts), ``transcoder_jumprelu_threshold`` / ``_bandwidth``, ``transcoder_layers``
  (None: every layer). ``model_type`` is ``"qwen2_transcoder"`` so the Auto classes find the model;
  configs written by the release's code (``model_type: "qwen2"`` with the two transcoder fields) load too.
- :class:`Qwen2ForCausalLMWithTranscoder`: ``Qwen2ForCausalLM`` whose ``model.layers[i].mlp`` are
  :class:`~tckernels.models.adapter.TranscoderAdapterMLP` (parameter names of the release, so its
  checkpoints load unchanged). Construction and ``from_pretrained`` freeze everything but the
  adapters; adapter weights missing from a checkpoint (e.g. loading a plain Qwen2 checkpoint)
  get the release's initialisation, so the model then computes exactly what the checkpoint's model
  computes.
- Importing this module registers both with ``AutoConfig`` / ``AutoModelForCausalLM``: after
  ``import tckernels.models``, ``AutoModelForCausalLM.from_pretrained(path)`` loads a saved
  adapter model. (Release checkpoints say ``model_type: "qwen2"``, which the Auto classes map to the
  plain Qwen2; load those with ``Qwen2ForCausalLMWithTranscoder.from_pretrained`` — saving them
  again writes ``qwen2_transcoder``.)
"""
from typing import Optional

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tckernels.models.adapter import ACTIVATIONS, ADAPTER_OPTIONS
from tckernels.models.interventions import set_adapters_enabled
from tckernels.models.surgery import add_transcoder_adapters, adapter_modules, freeze_base_, relayout_adapters_

__all__ = [
    "Qwen2TranscoderConfig",
    "Qwen2ForCausalLMWithTranscoder",
    "convert_to_transcoder_model",
    "is_plain_qwen2_causal_lm",
]

# add_transcoder_adapters keyword -> config field
_FIELDS = {name: f"transcoder_{name}" for name in (*ADAPTER_OPTIONS, "layers")}


def _transformers4_rope_fields(rope_parameters) -> dict:
    """``{"rope_theta", "rope_scaling"}`` for a flat ``rope_parameters`` dict (none for nested or missing)."""
    if not isinstance(rope_parameters, dict) or "rope_theta" not in rope_parameters:
        return {}
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    scaling = None if rope_type == "default" else {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    return {"rope_theta": rope_parameters["rope_theta"], "rope_scaling": scaling}


class Qwen2TranscoderConfig(Qwen2Config):
    """``Qwen2Config`` with the transcoder-adapter fields (see the module docstring)."""

    model_type = "qwen2_transcoder"

    transcoder_n_features: int = 512
    transcoder_dec_bias: bool = False
    transcoder_activation: str = "relu"
    transcoder_k: Optional[int] = None
    transcoder_k_max: Optional[int] = None
    transcoder_jumprelu_threshold: float = 1e-3
    transcoder_jumprelu_bandwidth: float = 1e-3
    transcoder_layers: Optional[list] = None

    if hasattr(Qwen2Config, "__post_init__"):  # transformers 5: configs are dataclasses

        def __post_init__(self, **kwargs):
            kwargs.pop("model_type", None)  # a release config says "qwen2"; this class is qwen2_transcoder
            super().__post_init__(**kwargs)
            self._check_transcoder_fields()

    else:  # transformers 4: keyword arguments, the class attributes above as defaults

        def __init__(self, **kwargs):
            kwargs.pop("model_type", None)
            super().__init__(**kwargs)
            self._check_transcoder_fields()

    def _check_transcoder_fields(self) -> None:
        def pos_int(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}")

        pos_int("transcoder_n_features")
        pos_int("transcoder_k", allow_none=True)
        pos_int("transcoder_k_max", allow_none=True)
        n = self.transcoder_n_features
        if self.transcoder_activation not in ACTIVATIONS:
            raise ValueError(f"transcoder_activation must be one of {ACTIVATIONS}, got {self.transcoder_activation!r}")
        if self.transcoder_activation == "topk" and self.transcoder_k is None:
            raise ValueError("transcoder_activation 'topk' needs transcoder_k (features per token)")
        for name in ("transcoder_k", "transcoder_k_max"):
            v = getattr(self, name)
            if v is not None and v > n:
                raise ValueError(f"{name} must be <= transcoder_n_features = {n}, got {v}")
        if not isinstance(self.transcoder_dec_bias, bool):
            raise ValueError(f"transcoder_dec_bias must be a bool, got {self.transcoder_dec_bias!r}")
        for name in ("transcoder_jumprelu_threshold", "transcoder_jumprelu_bandwidth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        layers = self.transcoder_layers
        if layers is not None:
            if isinstance(layers, tuple):
                layers = self.transcoder_layers = list(layers)
            if not isinstance(layers, list):
                raise ValueError(f"transcoder_layers must be a list of layer indices or None, got {layers!r}")
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hidden_layers:
                    raise ValueError(
                        f"transcoder_layers: unknown layer index {i!r}; the model has num_hidden_layers = "
                        f"{self.num_hidden_layers}"
                    )

    def to_dict(self) -> dict:
        """The config as transformers 5 writes it, plus the RoPE fields as transformers 4 reads them
        (``rope_theta``, ``rope_scaling``): transformers 5 keeps them only inside ``rope_parameters``,
        which transformers 4 (and the release's code on 4.57) ignores, falling back to theta 10000."""
        d = super().to_dict()
        d.update(_transformers4_rope_fields(d.get("rope_parameters")))
        return d

    def adapter_kwargs(self) -> dict:
        """Keyword arguments of ``add_transcoder_adapters`` that this config describes."""
        return {kw: getattr(self, field) for kw, field in _FIELDS.items()}

    @classmethod
    def from_qwen2_config(cls, config: Qwen2Config, **transcoder_fields) -> "Qwen2TranscoderConfig":
        """A Qwen2 config (or the release's config class) plus transcoder fields."""
        d = config.to_dict()
        d.pop("model_type", None)
        d.pop("transformers_version", None)
        d.update(transcoder_fields)
        return cls(**d)


class Qwen2ForCausalLMWithTranscoder(Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` with a :class:`TranscoderAdapterMLP` on the MLP of every layer (or of
    ``config.transcoder_layers``). See the module docstring and ``tckernels.models.adapter``."""

    config_class = Qwen2TranscoderConfig
    config: Qwen2TranscoderConfig

    def __init__(self, config):
        if not isinstance(config, Qwen2TranscoderConfig):
            if not isinstance(config, Qwen2Config):
                raise TypeError(f"config must be a Qwen2TranscoderConfig, got {type(config).__name__}")
            extra = {f: getattr(config, f) for f in _FIELDS.values() if hasattr(config, f)}
            if hasattr(config, "transcoder_n_features"):
                extra["transcoder_n_features"] = config.transcoder_n_features
            config = Qwen2TranscoderConfig.from_qwen2_config(config, **extra)
        super().__init__(config)
        add_transcoder_adapters(self, config.transcoder_n_features, freeze=True, **config.adapter_kwargs())

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``; then adapter parameters missing from the checkpoint
        (e.g. a plain Qwen2 checkpoint) get the release's initialisation, the decoder weights their
        row-per-feature layout, and everything but the adapters is frozen."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = set(info.get("missing_keys", ())) | {k[0] for k in info.get("mismatched_keys", ())}
        init_missing_adapter_parameters_(model, missing)
        relayout_adapters_(model)
        freeze_base_(model)
        return (model, info) if want_info else model

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """As ``PreTrainedModel``'s, non-reentrant unless told otherwise: the frozen base's inputs need
        no gradient, and reentrant checkpointing (transformers 4's default) then gives the adapters none."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # thin conveniences (the functions in tckernels.models work on any adapted model)

    def adapters(self):
        """``{layer index: TranscoderAdapterMLP}``."""
        return adapter_modules(self)

    def set_adapters_enabled(self, enabled: bool, layers=None):
        set_adapters_enabled(self, enabled, layers)
        return self


def init_missing_adapter_parameters_(model: nn.Module, missing_keys) -> None:
    """The release's initialisation for the adapter parameters named (fully, e.g.
    ``model.layers.3.mlp.transcoder_dec.weight``) in ``missing_keys``."""
    names = {id(m): n for n, m in model.named_modules()}
    missing = set(missing_keys)
    for mlp in adapter_modules(model).values():
        prefix = names[id(mlp)] + "."
        local = {k[len(prefix):] for k in missing if k.startswith(prefix)}
        local = {k for k in local if k.startswith("transcoder_")}
        if local:
            mlp.reset_adapter_parameters(only=local)


def is_plain_qwen2_causal_lm(model: nn.Module) -> bool:
    return type(model) is Qwen2ForCausalLM


def convert_to_transcoder_model(
    model: Qwen2ForCausalLM, n_features: int, **adapter_kwargs
) -> Qwen2ForCausalLMWithTranscoder:
    """Turn a ``Qwen2ForCausalLM`` into a ``Qwen2ForCausalLMWithTranscoder`` in place (its class
    and config change, its weights stay) and add the adapters. ``adapter_kwargs``: those of
    ``add_transcoder_adapters`` (the ones the config records are written to it)."""
    if not is_plain_qwen2_causal_lm(model):
        raise TypeError(f"model must be a Qwen2ForCausalLM, got {type(model).__name__}")
    fields = {"transcoder_n_features": n_features}
    for kw, field in _FIELDS.items():
        if kw in adapter_kwargs:
            v = adapter_kwargs[kw]
            fields[field] = list(v) if kw == "layers" and v is not None else v
    old = model.config
    config = Qwen2TranscoderConfig.from_qwen2_config(old, **fields)
    config._attn_implementation = getattr(old, "_attn_implementation", None)
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = config
    model.__class__ = Qwen2ForCausalLMWithTranscoder
    rest = {k: v for k, v in adapter_kwargs.items() if k not in _FIELDS}
    rest.setdefault("freeze", True)
    add_transcoder_adapters(model, n_features, **config.adapter_kwargs(), **rest)
    return model


AutoConfig.register(Qwen2TranscoderConfig.model_type, Qwen2TranscoderConfig, exist_ok=True)
AutoModelForCausalLM.register(Qwen2TranscoderConfig, Qwen2ForCausalLMWithTranscoder, exist_ok=True)
