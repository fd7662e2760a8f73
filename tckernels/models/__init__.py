"""Thin Hugging Face model wrappers with transcoder adapters (needs ``transformers``).

    from tckernels.models import Qwen2TranscoderConfig, Qwen2ForCausalLMWithTranscoder
    model = Qwen2ForCausalLMWithTranscoder.from_pretrained(path)       # or AutoModelForCausalLM
    add_transcoder_adapters(any_hf_decoder, n_features=8192)           # Qwen2/Qwen3/Llama/Mistral

Importing this package registers ``Qwen2TranscoderConfig`` (model_type ``"qwen2_transcoder"``)
and ``Qwen2ForCausalLMWithTranscoder`` with ``AutoConfig`` / ``AutoModelForCausalLM``.
"""
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "tckernels.models needs Hugging Face transformers: pip install 'tckernels[models]'"
    ) from e

from tckernels.models.adapter import (
    InterventionHandle,
    LastActivations,
    TranscoderAdapterMLP,
    TranscoderDecoder,
    TranscoderEncoder,
    adapter_modules,
    adapter_parameters,
    add_transcoder_adapters,
    build_hybrid,
    cast_adapters_,
    find_decoder_layers,
    freeze_base_,
    init_adapters_,
    relayout_adapters_,
    remove_transcoder_adapters,
)
from tckernels.models.interventions import (
    FeatureRecorder,
    ablate_features,
    adapter_stats,
    adapters_enabled,
    clamp_features,
    clear_interventions,
    dead_feature_counts,
    l0_per_layer,
    record_features,
    scale_features,
    set_adapters_enabled,
    sparsity_loss,
    steer_features,
    update_feature_stats_,
)
from tckernels.models.qwen2 import (
    Qwen2ForCausalLMWithTranscoder,
    Qwen2TranscoderConfig,
    convert_to_transcoder_model,
)

__all__ = [
    "Qwen2TranscoderConfig",
    "Qwen2ForCausalLMWithTranscoder",
    "convert_to_transcoder_model",
    "TranscoderAdapterMLP",
    "TranscoderEncoder",
    "TranscoderDecoder",
    "LastActivations",
    "InterventionHandle",
    "add_transcoder_adapters",
    "remove_transcoder_adapters",
    "adapter_modules",
    "adapter_parameters",
    "init_adapters_",
    "freeze_base_",
    "relayout_adapters_",
    "cast_adapters_",
    "find_decoder_layers",
    "build_hybrid",
    "set_adapters_enabled",
    "adapters_enabled",
    "ablate_features",
    "scale_features",
    "clamp_features",
    "steer_features",
    "clear_interventions",
    "FeatureRecorder",
    "record_features",
    "sparsity_loss",
    "l0_per_layer",
    "update_feature_stats_",
    "dead_feature_counts",
    "adapter_stats",
]
