"""tckernels: sparse kernels for transcoders and transcoder adapters.

    values, indices = tckernels.encode_topk(x, W_enc, b_enc, k)
    y = tckernels.sparse_decode(values, indices, W_dec, b_dec)
"""
from tckernels._backend import available_backends, use_backend
from tckernels._native import has_cuda_kernels, warn_if_missing
from tckernels._version import __version__
from tckernels.ops import encode_relu, encode_topk, gather_dot, gather_matmul, scatter_matmul, sparse_decode, topk_relu

warn_if_missing(stacklevel=2)

__all__ = [
    "topk_relu",
    "encode_topk",
    "encode_relu",
    "sparse_decode",
    "gather_matmul",
    "gather_dot",
    "scatter_matmul",
    "use_backend",
    "available_backends",
    "has_cuda_kernels",
]

# tckernels.models (Hugging Face) is imported on first use, not here: it imports transformers. Its
# Auto classes are registered as soon as transformers is imported, so that
# AutoModelForCausalLM.from_pretrained works on saved adapter models after `import tckernels`.
from tckernels._hf_registration import register_when_transformers_is_imported  # noqa: E402

register_when_transformers_is_imported()


def __getattr__(name):
    if name in ("models", "nn"):  # subpackages, imported when first reached as attributes
        import importlib

        return importlib.import_module(f"tckernels.{name}")
    raise AttributeError(f"module 'tckernels' has no attribute {name!r}")
