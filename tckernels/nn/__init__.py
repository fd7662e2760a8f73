"""nn.Modules built on the tckernels ops: transcoders with every activation, cross-layer and
bilinear transcoders, standardisation folded into saved weights, our checkpoint format (save_transcoder / load_transcoder) and, in
``tckernels.nn.formats``, loaders for other published checkpoint formats."""
from tckernels.nn import metrics
from tckernels.nn.activations import SparseActivations
from tckernels.nn.bilinear import BilinearMLP, BilinearTranscoder
from tckernels.nn.crosslayer import CrossLayerOutput, CrossLayerTranscoder
from tckernels.nn.errors import FormatError, MissingKeyError
from tckernels.nn.formats.tckernels_transcoder import load_transcoder, save_transcoder
from tckernels.nn.standardize import Standardization, Standardizer, fold_standardization_
from tckernels.nn.transcoder import Transcoder, TranscoderConfig, TranscoderOutput

__all__ = [
    "Transcoder",
    "TranscoderConfig",
    "TranscoderOutput",
    "SparseActivations",
    "CrossLayerTranscoder",
    "CrossLayerOutput",
    "BilinearTranscoder",
    "BilinearMLP",
    "save_transcoder",
    "load_transcoder",
    "FormatError",
    "MissingKeyError",
    "Standardization",
    "Standardizer",
    "fold_standardization_",
    "metrics",
]
