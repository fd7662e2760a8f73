"""Registers the Hugging Face model classes of ``tckernels.models`` once transformers is imported.

``tckernels.models`` registers ``Qwen2TranscoderConfig`` / ``Qwen2ForCausalLMWithTranscoder`` with
``AutoConfig`` / ``AutoModelForCausalLM`` when it is imported, and importing it imports transformers
(seconds). Kernel-only users should not pay that at ``import tckernels``, yet
``AutoModelForCausalLM.from_pretrained(saved_adapter_model)`` after ``import tckernels`` must work.
So ``import tckernels`` calls :func:`register_when_transformers_is_imported`: if transformers is
already imported, ``tckernels.models`` is imported now; otherwise a one-shot import hook imports it
right after transformers' own module has run (which anyone calling ``AutoModelForCausalLM`` does).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["register_when_transformers_is_imported"]


def _register() -> None:
    try:
        importlib.import_module("tckernels.models")
    except Exception as e:  # an incompatible transformers must not break the user's own import of it
        warnings.warn(
            f"tckernels: could not register the transcoder-adapter models with transformers' Auto classes "
            f"({type(e).__name__}: {e}); `import tckernels.models` shows the full error",
            stacklevel=3,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Runs transformers' own loader, then registers."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # afterwards transformers looks as if imported normally (resources, source lines, reloads)
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the find_spec below from finding us again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def register_when_transformers_is_imported() -> None:
    if "transformers" in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None and not any(
        isinstance(f, _AfterTransformersImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterTransformersImport())
