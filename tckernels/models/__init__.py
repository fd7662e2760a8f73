"""Thin Hugging Face model wrappers with transcoder adapters (needs ``transformers``).

    from tckernels.models import Qwen2TranscoderConfig, Qwen2ForCausalLMWithTranscoder
    model = Qwen2ForCausalLMWithTranscoder.from_pretrained(path)       # or AutoModelForCausalLM
    add_transcoder_adapters(any_hf_decoder, n_features=8192)           # Qwen2/Qwen3/Llama/Mistral

Modules, bottom to top: ``adapter_transcoder`` (the adapter's ``nn.Transcoder`` in the checkpoint
layout), ``adapter`` (the module around a layer's MLP), ``surgery`` (adding, removing and
preparing a model's adapters), ``interventions`` and ``features`` (editing and recording
features), ``qwen2`` (the Qwen2 model and config), ``hybrid`` (building adapted models).

Importing this package registers ``Qwen2TranscoderConfig`` (model_type ``"qwen2_transcoder"``)
and ``Qwen2ForCausalLMWithTranscoder`` with ``AutoConfig`` / ``AutoModelForCausalLM``.
"""
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "tckernels.models needs Hugging Face transformers: pip install 'tckernels[models]'"
    ) from e

from tckernels.models.adapter import ACTIVATIONS, ADAPTER_OPTIONS, TranscoderAdapterMLP
from tckernels.models.adapter_transcoder import AdapterTranscoder, TranscoderDecoder, TranscoderEncoder
from tckernels.models.features import (
    FeatureRecorder,
    adapter_stats,
    dead_feature_counts,
    fired_features,
    l0_per_layer,
    record_features,
    sparsity_loss,
    update_feature_stats_,
)
from tckernels.models.hybrid import adapt_model, build_hybrid
from tckernels.models.interventions import (
    FeatureInterventions,
    InterventionHandle,
    ablate_features,
    add_intervention,
    adapters_enabled,
    clamp_features,
    clear_interventions,
    interventions_of,
    scale_features,
    set_adapters_enabled,
    steer_features,
)
from tckernels.models.qwen2 import (
    Qwen2ForCausalLMWithTranscoder,
    Qwen2TranscoderConfig,
    convert_to_transcoder_model,
)
from tckernels.models.surgery import (
    adapter_modules,
    adapter_parameters,
    add_transcoder_adapters,
    cast_adapters_,
    find_decoder_layers,
    freeze_base_,
    init_adapters_,
    relayout_adapters_,
    remove_transcoder_adapters,
)

__all__ = [
    "Qwen2TranscoderConfig",
    "Qwen2ForCausalLMWithTranscoder",
    "convert_to_transcoder_model",
    "ACTIVATIONS",
    "ADAPTER_OPTIONS",
    "TranscoderAdapterMLP",
    "AdapterTranscoder",
    "TranscoderEncoder",
    "TranscoderDecoder",
    "add_transcoder_adapters",
    "remove_transcoder_adapters",
    "adapter_modules",
    "adapter_parameters",
    "init_adapters_",
    "freeze_base_",
    "relayout_adapters_",
    "cast_adapters_",
    "find_decoder_layers",
    "adapt_model",
    "build_hybrid",
    "set_adapters_enabled",
    "adapters_enabled",
    "FeatureInterventions",
    "InterventionHandle",
    "interventions_of",
    "add_intervention",
    "ablate_features",
    "scale_features",
    "clamp_features",
    "steer_features",
    "clear_interventions",
    "FeatureRecorder",
    "record_features",
    "sparsity_loss",
    "l0_per_layer",
    "fired_features",
    "update_feature_stats_",
    "dead_feature_counts",
    "adapter_stats",
]
