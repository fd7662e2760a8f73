"""Backend choice: explicit argument > use_backend context > TCK_BACKEND > device default."""
import torch

import tckernels
from tckernels import _backend


def test_precedence(monkeypatch):
    monkeypatch.delenv("TCK_BACKEND", raising=False)
    default = _backend.resolve(None, "cpu")
    assert default == ("cpu" if "cpu" in tckernels.available_backends("cpu") else "reference")
    monkeypatch.setenv("TCK_BACKEND", "reference")
    assert _backend.resolve(None, "cpu") == "reference"
    with tckernels.use_backend(default):
        assert _backend.resolve(None, "cpu") == default
        with tckernels.use_backend("reference"):
            assert _backend.resolve(None, "cpu") == "reference"
        assert _backend.resolve("reference", "cpu") == "reference"
    assert _backend.resolve(None, "cpu") == "reference"


def test_reference_always_available():
    assert "reference" in tckernels.available_backends("cpu")


def test_context_reaches_the_kernel(monkeypatch):
    calls = []
    mod = _backend.backend_module("reference")
    real = mod.gather_matmul
    monkeypatch.setattr(mod, "gather_matmul", lambda *a: calls.append(1) or real(*a))
    with tckernels.use_backend("reference"):
        tckernels.gather_matmul(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.ones(3, 4))
    assert calls == [1]
