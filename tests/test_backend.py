"""Backend choice (explicit argument > use_backend context > TCK_BACKEND > device default) and the
backend interface every backend module is checked against when it is loaded."""
import dataclasses
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import tckernels
from tckernels import _backend
from tckernels.backends import Backend, reference


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


def test_available_backends_rejects_an_unknown_device_type():
    with pytest.raises(ValueError, match=re.escape("device_type must be one of 'cpu', 'cuda'; got 'gpu'") + "$"):
        tckernels.available_backends("gpu")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_does_not_import_dynamo():
    """torch._dynamo takes seconds to import; the ops and the backend choice must not pull it in
    (torch.compile imports it when it is used)."""
    code = "import sys, tckernels._backend, tckernels.ops; print('torch._dynamo' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"


def test_backend_choice_is_marked_constant_as_torch_compiler_marks_it():
    """_backend marks unavailable_reason itself, as torch.compiler.assume_constant_result would
    (the decorator imports torch._dynamo). If the decorator ever does more than set this
    attribute, this fails and the mark needs revisiting."""
    def fn():
        return None

    assert torch.compiler.assume_constant_result(fn) is fn
    assert vars(fn) == {"_dynamo_marked_constant": True}
    assert vars(_backend.unavailable_reason) == vars(fn)


def test_compile_before_any_eager_call(monkeypatch):
    """With nothing cached yet (the first op call of a process is a compiled one), the backend
    choice is still a constant to dynamo: one graph, no break."""
    import torch._dynamo.testing

    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setattr(_backend, "_reasons", {})
    torch._dynamo.reset()
    W = torch.randn(12, 4)

    def fn(x):
        values, indices = tckernels.encode_topk(x, W, None, 3)
        return tckernels.sparse_decode(values, indices, W)

    counter = torch._dynamo.testing.CompileCounter()
    x = torch.randn(5, 4)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend=counter)(x), fn(x))
    assert counter.frame_count == 1


def test_context_reaches_the_kernel(monkeypatch):
    calls = []
    loaded = _backend.load("reference")
    spy = dataclasses.replace(loaded, gather_matmul=lambda *a: calls.append(1) or loaded.gather_matmul(*a))
    monkeypatch.setitem(_backend._loaded, "reference", spy)
    with tckernels.use_backend("reference"):
        tckernels.gather_matmul(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.ones(3, 4))
    assert calls == [1]


# --- the interface ---------------------------------------------------------------------------

# The fused ops each backend has (the ops compose the others from the required functions).
FUSED = {"reference": {"encode_topk", "encode_relu"}, "cpu": {"encode_relu"}, "cuda": set(),
         "triton": {"encode_topk", "encode_relu"}}


@pytest.mark.parametrize("name", _backend.BACKENDS)
def test_every_backend_meets_the_interface(name):
    try:
        loaded = _backend.load(name)
    except ImportError as exc:  # a backend that cannot be imported here is unavailable, not malformed
        pytest.skip(f"backend {name} cannot be imported: {exc}")
    assert isinstance(loaded, Backend) and loaded.name == name
    assert {op for op in ("encode_topk", "encode_relu") if getattr(loaded, op) is not None} == FUSED[name]


def fake_backend(**changes):
    """A backend module object copied from the reference, with members replaced (or, given
    ``None``, removed)."""
    mod = types.ModuleType("fake_backend")
    for attr in ("DEVICES", "unavailable_reason", "topk_relu", "gather_matmul", "gather_dot", "scatter_matmul",
                 "encode_topk", "encode_relu"):
        setattr(mod, attr, getattr(reference, attr))
    for attr, value in changes.items():
        if value is None:
            delattr(mod, attr)
        else:
            setattr(mod, attr, value)
    return mod


def test_a_module_like_the_reference_is_accepted():
    loaded = Backend.from_module("fake", fake_backend(encode_topk=None, encode_relu=None))
    assert loaded.gather_dot is reference.gather_dot and loaded.devices == ("cpu", "cuda")
    assert loaded.encode_topk is None and loaded.encode_relu is None  # optional: composed by the ops


@pytest.mark.parametrize("missing", ["topk_relu", "gather_matmul", "gather_dot", "scatter_matmul",
                                     "unavailable_reason", "DEVICES"])
def test_missing_required_member_is_rejected(missing):
    with pytest.raises(TypeError, match=rf"^tckernels backend 'fake': module fake_backend does not define {missing}\b"):
        Backend.from_module("fake", fake_backend(**{missing: None}))


@pytest.mark.parametrize("devices", ["cpu", (), ["cpu"], ("gpu",), ("cuda:0",), (0,)], ids=repr)
def test_bad_devices_are_rejected(devices):
    with pytest.raises(TypeError, match=r"^tckernels backend 'fake': DEVICES must be a non-empty tuple of device"):
        Backend.from_module("fake", fake_backend(DEVICES=devices))


@pytest.mark.parametrize("member,value,match", [
    pytest.param("gather_dot", "not a function", r"gather_dot must be a function gather_dot\(G, indices, W\), got str",
                 id="gather_dot-not-callable"),
    pytest.param("gather_dot", lambda G, indices: G, r"gather_dot must accept the call gather_dot\(G, indices, W\), "
                 r"but its signature is gather_dot\(G, indices\)", id="gather_dot-too-few-parameters"),
    pytest.param("scatter_matmul", lambda values, indices, G, n_rows: G, r"scatter_matmul must accept the call",
                 id="scatter_matmul-no-deterministic"),
    pytest.param("unavailable_reason", lambda device: None,
                 r"unavailable_reason must accept the call unavailable_reason\(\)", id="unavailable_reason-parameter"),
    pytest.param("encode_topk", lambda x, W, b: x, r"encode_topk must accept the call encode_topk\(x, W, b, k\)",
                 id="encode_topk-too-few-parameters"),
    pytest.param("encode_relu", 3, r"encode_relu must be a function", id="encode_relu-not-callable"),
])
def test_ill_typed_member_is_rejected(member, value, match):
    with pytest.raises(TypeError, match=rf"^tckernels backend 'fake': {match}"):
        Backend.from_module("fake", fake_backend(**{member: value}))


def test_functions_taking_any_arguments_are_accepted():
    """A stand-in raising when called (the triton backend's, when triton is missing) meets the interface."""
    def missing(*args, **kwargs):
        raise RuntimeError("unavailable")

    loaded = Backend.from_module("fake", fake_backend(topk_relu=missing, encode_topk=missing))
    assert loaded.topk_relu is missing


def test_loading_checks_the_module(monkeypatch):
    """_backend.load (the only way ops reach a backend) rejects a malformed module, and availability
    checks do not mistake that for an unavailable backend."""
    monkeypatch.setitem(sys.modules, "tckernels.backends.fake", fake_backend(gather_dot=None))
    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setattr(_backend, "_reasons", {})
    with pytest.raises(TypeError, match="^tckernels backend 'fake': .* does not define gather_dot"):
        _backend.load("fake")
    with pytest.raises(TypeError, match="^tckernels backend 'fake'"):
        _backend.unavailable_reason("fake", "cpu")
