"""Every bad call raises TypeError or ValueError naming the argument, before native code runs.

Each case is a valid call of one public op (CALLS) with one argument replaced; ids start with the
op's name, so ``pytest -k <op>`` finds them.
"""
import importlib
import re

import pytest
import torch

import tckernels

N, D, M, K = 20, 8, 4, 3


def _args():
    g = torch.Generator().manual_seed(0)
    return dict(
        values=torch.randn(M, K, generator=g),
        indices=torch.randint(0, N, (M, K), generator=g),
        W=torch.randn(N, D, generator=g),
        bias=torch.randn(D, generator=g),
        G=torch.randn(M, D, generator=g),
        x=torch.randn(M, D, generator=g),
        b_enc=torch.randn(N, generator=g),
        pre=torch.randn(M, N, generator=g),
        k=K,
        n_rows=N,
        threshold=None,
    )


CALLS = {
    "topk_relu": lambda a, **kw: tckernels.topk_relu(a["pre"], a["k"], a["b_enc"], **kw),
    "encode_topk": lambda a, **kw: tckernels.encode_topk(a["x"], a["W"], a["b_enc"], a["k"], **kw),
    "encode_relu": lambda a, **kw: tckernels.encode_relu(a["x"], a["W"], a["b_enc"], a["k"], a["threshold"], **kw),
    "sparse_decode": lambda a, **kw: tckernels.sparse_decode(a["values"], a["indices"], a["W"], a["bias"], **kw),
    "gather_matmul": lambda a, **kw: tckernels.gather_matmul(a["values"], a["indices"], a["W"], a["bias"], **kw),
    "gather_dot": lambda a, **kw: tckernels.gather_dot(a["G"], a["indices"], a["W"], **kw),
    "scatter_matmul": lambda a, **kw: tckernels.scatter_matmul(a["values"], a["indices"], a["G"], a["n_rows"], **kw),
}
INDEX_OPS = ["sparse_decode", "gather_matmul", "gather_dot", "scatter_matmul"]


def call(op, replace=None, **kw):
    """CALLS[op] with arguments replaced: a value, or a function of the valid arguments."""
    a = _args()
    a.update({name: v(a) if callable(v) else v for name, v in (replace or {}).items()})
    return CALLS[op](a, **kw)


@pytest.mark.parametrize("op", list(CALLS))
def test_valid_call_passes(op):
    call(op)


def bad(op, what, exc, match, **replace):
    return pytest.param(op, replace, exc, match, id=f"{op}-{what}")


BAD_ARGUMENTS = [
    # k out of range, or not an int
    *(bad("topk_relu", f"k={k}", ValueError, "k must satisfy 1 <= k <= N = 20", k=k) for k in (0, -1, N + 1)),
    *(bad("encode_topk", f"k={k}", ValueError, "k must satisfy 1 <= k <= N = 20", k=k) for k in (0, -1, N + 1)),
    bad("encode_relu", "k_max=0", ValueError, "k_max must satisfy 1 <= k_max <= N = 20", k=0),
    bad("topk_relu", "k-float", TypeError, "k must be an int", k=2.0),
    bad("topk_relu", "k-bool", TypeError, "k must be an int", k=True),
    # dtypes
    bad("gather_matmul", "indices-float", TypeError, "indices must have dtype in",
        indices=lambda a: a["indices"].float()),
    bad("gather_matmul", "indices-int16", TypeError, "indices must have dtype in",
        indices=lambda a: a["indices"].short()),
    bad("gather_matmul", "values-bf16", TypeError, "values has dtype bfloat16 but W has float32",
        values=lambda a: a["values"].bfloat16()),
    bad("gather_matmul", "W-list", TypeError, "W must be a torch.Tensor", W=[[1.0]]),
    bad("sparse_decode", "b_dec-f16", TypeError, "b_dec has dtype float16", bias=lambda a: a["bias"].half()),
    bad("sparse_decode", "indices-float", TypeError, "indices must have dtype in",
        indices=lambda a: a["indices"].float()),
    bad("topk_relu", "pre-int", TypeError, "pre must have dtype in", pre=lambda a: a["pre"].int()),
    bad("encode_topk", "x-f16", TypeError, "x has dtype float16 but W_enc has float32", x=lambda a: a["x"].half()),
    bad("encode_relu", "x-f16", TypeError, "x has dtype float16 but W_enc has float32", x=lambda a: a["x"].half()),
    bad("gather_dot", "G-f64", TypeError, "G has dtype", G=lambda a: a["G"].double()),
    bad("scatter_matmul", "G-f64", TypeError, "values has dtype float32 but G has float64",
        G=lambda a: a["G"].double()),
    # shapes
    bad("gather_matmul", "indices-shape", ValueError, "indices must have shape",
        indices=lambda a: a["indices"][:, :2]),
    bad("gather_matmul", "W-3d", ValueError, "W must be 2-D", W=lambda a: a["W"][None]),
    bad("gather_matmul", "bias-shape", ValueError, "bias must have shape", bias=lambda a: a["bias"][:3]),
    bad("sparse_decode", "W_dec-3d", ValueError, "W_dec must be 2-D", W=lambda a: a["W"][None]),
    bad("encode_topk", "b_enc-shape", ValueError, "b_enc must have shape", b_enc=lambda a: a["bias"]),
    bad("encode_topk", "x-width", ValueError, "x must have last dimension D", x=lambda a: a["x"][:, :3]),
    bad("encode_relu", "x-width", ValueError, "x must have last dimension D", x=lambda a: a["x"][:, :3]),
    bad("encode_relu", "threshold-negative", ValueError, r"threshold must be None, a float >= 0 or a \[N\] tensor",
        threshold=-1.0),
    bad("encode_relu", "threshold-shape", ValueError, "threshold must have shape", threshold=lambda a: a["bias"]),
    bad("gather_dot", "G-width", ValueError, "G must have last dimension", G=lambda a: a["G"][:, :3]),
    bad("gather_dot", "G-rows", ValueError, "indices must have the leading shape of G", G=lambda a: a["G"][:2]),
    bad("scatter_matmul", "G-rows", ValueError, "G must have the leading shape of values", G=lambda a: a["G"][:2]),
    bad("scatter_matmul", "n_rows-negative", ValueError, "n_rows must be a non-negative int", n_rows=-1),
    bad("topk_relu", "bias-shape", ValueError, "bias must have shape", b_enc=lambda a: a["b_enc"][:5]),
    # devices
    bad("gather_matmul", "W-meta", ValueError, "W is on meta but values is on cpu", W=lambda a: a["W"].to("meta")),
    bad("sparse_decode", "W_dec-meta", ValueError, "W_dec is on meta but values is on cpu",
        W=lambda a: a["W"].to("meta")),
    bad("gather_dot", "W-meta", ValueError, "W is on meta but G is on cpu", W=lambda a: a["W"].to("meta")),
    bad("scatter_matmul", "G-meta", ValueError, "G is on meta but values is on cpu", G=lambda a: a["G"].to("meta")),
    bad("encode_topk", "W_enc-meta", ValueError, "W_enc is on meta but x is on cpu", W=lambda a: a["W"].to("meta")),
    bad("encode_relu", "W_enc-meta", ValueError, "W_enc is on meta but x is on cpu", W=lambda a: a["W"].to("meta")),
    bad("topk_relu", "bias-meta", ValueError, "bias is on meta but pre is on cpu",
        b_enc=lambda a: a["b_enc"].to("meta")),
]


@pytest.mark.parametrize("op,replace,exc,match", BAD_ARGUMENTS)
def test_bad_argument(op, replace, exc, match):
    with pytest.raises(exc, match=match):
        call(op, replace)


def exactly(message):
    return "^" + re.escape(message) + "$"


def linear_layout(a):
    """The weight as nn.Linear stores a decoder: [D, N], the transpose of row per feature."""
    return a["W"].t()


def indices_8_to_19(a):
    """Indices that fit the 20 columns of the transposed [8, 20] weight but not its 8 rows."""
    return torch.arange(8, 8 + M * K).reshape(M, K)


LINEAR_LAYOUT_HINT = "weights are row per feature [N, D]; if {w} is in nn.Linear layout [D, N], pass {w}.t()"
ENCODER_TRANSPOSED = ("W_enc looks transposed: its shape (8, 20) is [D, N] for x's D = 8, but W_enc must be [N, D] "
                      "(row per feature, the layout of nn.Linear(D, N).weight); pass W_enc.t()")

# A wrong argument that another argument's check used to be blamed for (the message named the
# rows of the weight, x, or a bias, where a transposed weight or a small n_rows was the cause).
BLAMED_ARGUMENTS = [
    *(bad(op, f"{w}-linear-layout", ValueError, exactly(
        f"indices must lie in [0, 8) (the rows of {w}), found values in [8, 19]. {w} has shape (8, 20) and they "
        f"would fit its 20 columns: " + LINEAR_LAYOUT_HINT.format(w=w)),
        W=linear_layout, bias=None, indices=indices_8_to_19)
      for op, w in (("sparse_decode", "W_dec"), ("gather_matmul", "W"))),
    *(bad(op, f"{w}-linear-layout-with-{b}", ValueError, exactly(
        f"{b} must have shape (20,) ([D] with D = {w}.shape[1]), got (8,). That is {w}.shape[0], so {w} "
        f"(shape (8, 20)) may be transposed: " + LINEAR_LAYOUT_HINT.format(w=w)), W=linear_layout)
      for op, w, b in (("sparse_decode", "W_dec", "b_dec"), ("gather_matmul", "W", "bias"))),
    bad("gather_dot", "W-linear-layout", ValueError, exactly(
        "W looks transposed: its shape (8, 20) is [D, N] for G's D = 8: " + LINEAR_LAYOUT_HINT.format(w="W")),
        W=linear_layout),
    bad("scatter_matmul", "n_rows-too-small", ValueError, exactly(
        "indices must lie in [0, 5) (n_rows, the rows of the output), found values in [0, 11]"),
        n_rows=5, indices=lambda a: torch.arange(M * K).reshape(M, K)),
    bad("encode_topk", "W_enc-transposed", ValueError, exactly(ENCODER_TRANSPOSED), W=linear_layout),
    bad("encode_relu", "W_enc-transposed", ValueError, exactly(ENCODER_TRANSPOSED), W=linear_layout),
]


@pytest.mark.parametrize("op,replace,exc,match", BLAMED_ARGUMENTS)
def test_message_blames_the_argument_at_fault(op, replace, exc, match):
    with pytest.raises(exc, match=match):
        call(op, replace)


BOUND = {"sparse_decode": "the rows of W_dec", "gather_matmul": "the rows of W", "gather_dot": "the rows of W",
         "scatter_matmul": "n_rows, the rows of the output"}


@pytest.mark.parametrize("backend", tckernels.available_backends("cpu"))
@pytest.mark.parametrize("op", INDEX_OPS)
def test_index_out_of_range(op, backend):
    for bad_index in (N, -1, 10**6):
        for dtype in (torch.int64, torch.int32):
            def indices(a):
                idx = a["indices"].clone()
                idx[0, 0], idx[1, 2] = 0, bad_index
                idx[2, 1] = N - 1
                return idx.to(dtype)

            # no transposed-weight hint: the indices would not fit W's 8 columns either
            lo, hi = min(bad_index, 0), max(bad_index, N - 1)
            with pytest.raises(ValueError, match=exactly(
                    f"indices must lie in [0, 20) ({BOUND[op]}), found values in [{lo}, {hi}]")):
                call(op, dict(indices=indices), backend=backend)


@pytest.mark.parametrize("op", INDEX_OPS)
def test_index_check_can_be_disabled_and_kernels_stay_in_bounds(op, monkeypatch):
    """With TCK_CHECK_INDICES=0 the native kernels skip out-of-range indices instead of reading
    outside W (documented: it is then the caller's responsibility)."""
    if "cpu" not in tckernels.available_backends("cpu"):
        pytest.skip("native cpu backend not built")
    monkeypatch.setenv("TCK_CHECK_INDICES", "0")

    def indices(a):
        idx = a["indices"].clone()
        idx[0, 0] = 10**9
        return idx

    out = call(op, dict(indices=indices), backend="cpu")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("op", list(CALLS))
def test_unknown_backend(op, monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        call(op, backend="nope")
    monkeypatch.setenv("TCK_BACKEND", "nope")
    with pytest.raises(ValueError, match="TCK_BACKEND environment variable must be one of"):
        call(op)


CPU_BACKENDS = ", ".join(tckernels.available_backends("cpu"))


@pytest.mark.parametrize("how", ["argument", "use_backend", "TCK_BACKEND"])
@pytest.mark.parametrize("op", list(CALLS))
def test_backend_for_another_device(op, how, monkeypatch):
    """Asking for a backend that does not run on the tensors' device is bad input (ValueError
    naming the backend and both devices), not an error of the install."""
    try:  # the module imports wherever the package does; only a broken install cannot import it
        importlib.import_module("tckernels.backends.cuda")
    except ImportError:
        pytest.skip("tckernels.backends.cuda cannot be imported")
    source = {"argument": "", "use_backend": " (from use_backend('cuda'))", "TCK_BACKEND": " (from TCK_BACKEND=cuda)"}
    message = (f"backend 'cuda'{source[how]} runs on cuda tensors; these are on cpu "
               f"(backends for cpu tensors: {CPU_BACKENDS})")
    monkeypatch.setenv("TCK_BACKEND", "cuda" if how == "TCK_BACKEND" else "reference")
    with pytest.raises(ValueError, match=exactly(message)):
        if how == "use_backend":
            with tckernels.use_backend("cuda"):
                call(op)
        else:
            call(op, **({"backend": "cuda"} if how == "argument" else {}))


def test_use_backend_rejects_an_unknown_name():
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of"):
        tckernels.use_backend("nope").__enter__()
