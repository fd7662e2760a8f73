"""Checkpoint formats: tckernels' own, and loaders (and exporters) for published transcoder releases.

Each loader reproduces the format's own forward exactly (up to floating-point summation order)
with tckernels modules:

====================  =======================================  =======================================  ========================
module                format                                   functions                                gives
====================  =======================================  =======================================  ========================
tckernels_transcoder  tckernels' own: ``config.json`` +        :func:`save_transcoder`,                 ``Transcoder``,
                      ``model.safetensors``                    :func:`load_transcoder`                  ``CrossLayerTranscoder``,
                                                                                                        ``BilinearTranscoder``,
                                                                                                        ``BilinearMLP``
qwen25_topk           Qwen2.5-32B TopK ``transcoder_L{i}.pt``  :func:`load_qwen25_topk_transcoder`,     ``Transcoder`` (TopK)
                                                               :func:`load_qwen25_topk_transcoders`
bilinear_pythia       Pythia-410m bilinear ``.pt``             :func:`load_bilinear_pythia`             ``BilinearTranscoder``
transcoder_adapters   transcoder-adapter weights in a          :func:`load_transcoder_adapter_weights`  ``{layer: Transcoder}``
                      Hugging Face model checkpoint
circuit_tracer        circuit-tracer 0.5 per-layer             :func:`load_circuit_tracer`,             ``Transcoder``
                      transcoders                              :func:`save_circuit_tracer`
                      circuit-tracer 0.5 cross-layer           :func:`load_circuit_tracer_clt`,         ``CrossLayerTranscoder``
                      transcoder                               :func:`save_circuit_tracer` (either),
                                                               :func:`save_circuit_tracer_clt`
sparsify              EleutherAI sparsify 1.3 ``<hookpoint>/`` :func:`load_sparsify`,                   ``Transcoder`` (TopK)
                      ``cfg.json`` + ``sae.safetensors``       :func:`load_sparsify_dir`,
                      (SAEs, transcoders, skip)                :func:`save_sparsify`,
                                                               :func:`save_sparsify_dir`
saelens               SAELens 6 ``cfg.json`` +                 :func:`load_saelens`,                    ``Transcoder``
                      ``sae_weights.safetensors`` (standard,   :func:`save_saelens`,
                      topk, jumprelu, transcoders)             :func:`read_saelens_sparsity`
====================  =======================================  =======================================  ========================

The circuit-tracer, sparsify and SAELens modules are checked against the released packages
(circuit-tracer 0.5.0, eai-sparsify 1.3.3, sae-lens 6.54.12), in both directions; what a package's
release cannot represent exactly is refused, never written or read as something that runs differently.

Safety: nothing here runs code stored in a checkpoint. ``.pt`` files are read with
``torch.load(weights_only=True)``; a pickled object of a class torch does not allowlist (the
bilinear checkpoints' ``config``) is rebuilt as an inert :class:`PickledObject` placeholder that only
records its fields, and ``trust_pickle=True`` is the explicit opt-in for a full unpickle
(``weights_only=False``). Every problem with a file -- missing key, wrong shape, truncated or
corrupt file -- raises :class:`FormatError` (a ``ValueError``; :class:`MissingKeyError` is also a
``KeyError``) naming the file and the key. The shared reading helpers are in
:mod:`tckernels.nn.formats.reading`.
"""
from tckernels.nn.errors import FormatError, MissingKeyError
from tckernels.nn.formats.bilinear_pythia import load_bilinear_pythia
from tckernels.nn.formats.circuit_tracer import (
    load_circuit_tracer,
    load_circuit_tracer_clt,
    load_circuit_tracer_file,
    save_circuit_tracer,
    save_circuit_tracer_clt,
)
from tckernels.nn.formats.qwen25_topk import PreNormTranscoder, load_qwen25_topk_transcoder, load_qwen25_topk_transcoders
from tckernels.nn.formats.reading import PickledObject, check_shape, get_key, torch_load
from tckernels.nn.formats.saelens import load_saelens, read_saelens_sparsity, save_saelens
from tckernels.nn.formats.sparsify import load_sparsify, load_sparsify_dir, save_sparsify, save_sparsify_dir
from tckernels.nn.formats.tckernels_transcoder import load_transcoder, save_transcoder
from tckernels.nn.formats.transcoder_adapters import load_transcoder_adapter_weights

__all__ = [
    "FormatError",
    "MissingKeyError",
    "PickledObject",
    "torch_load",
    "get_key",
    "check_shape",
    "save_transcoder",
    "load_transcoder",
    "load_qwen25_topk_transcoder",
    "load_qwen25_topk_transcoders",
    "PreNormTranscoder",
    "load_bilinear_pythia",
    "load_transcoder_adapter_weights",
    "load_circuit_tracer",
    "load_circuit_tracer_file",
    "save_circuit_tracer",
    "load_circuit_tracer_clt",
    "save_circuit_tracer_clt",
    "load_sparsify",
    "load_sparsify_dir",
    "save_sparsify",
    "save_sparsify_dir",
    "load_saelens",
    "save_saelens",
    "read_saelens_sparsity",
]
