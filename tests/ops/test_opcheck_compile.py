"""torch.library.opcheck on every op, and a compiled TopK transcoder step with no graph break."""
import pytest
import torch
import torch._dynamo.testing

import tckernels
from tests.helpers import backend_params

BACKENDS = backend_params()


def _op_samples(device, backend, dtype):
    """custom op -> [(overload, args)]; the sparse ops take indices as the public wrappers pass
    them, after tckernels::checked_indices."""
    g = torch.Generator().manual_seed(0)
    M, k, N, D = 5, 3, 13, 6

    def r(*s, grad=True):
        t = torch.randn(*s, generator=g).to(dtype).to(device)
        return t.requires_grad_() if grad else t

    idx = torch.randint(0, N, (M, k), generator=g).to(device)
    ops = torch.ops.tckernels
    return {
        "checked_indices": [(ops.checked_indices.default, (idx, N)), (ops.checked_indices.default, (idx.int(), N))],
        "gather_matmul": [(ops.gather_matmul.default, (r(M, k), idx, r(N, D), r(D), backend)),
                          (ops.gather_matmul.default, (r(M, k), idx.int(), r(N, D), None, backend))],
        "gather_dot": [(ops.gather_dot.default, (r(M, D), idx, r(N, D), backend))],
        "scatter_matmul": [(ops.scatter_matmul.default, (r(M, k), idx, r(M, D), N, False, backend)),
                           (ops.scatter_matmul.default, (r(M, k), idx, r(M, D), N, True, backend))],
        "topk_relu": [(ops.topk_relu.default, (r(M, N), k, r(N), backend)),
                      (ops.topk_relu.default, (r(M, N), k, None, backend))],
        "encode_topk": [(ops.encode_topk.default, (r(M, D), r(N, D), r(N), k, backend))],
        "encode_relu": [(ops.encode_relu.default, (r(M, D), r(N, D), r(N), k, None, 0.0, backend)),
                        (ops.encode_relu.default, (r(M, D), r(N, D), None, k, r(N, grad=False).abs(), 0.0, backend))],
    }


# sparse_decode is tckernels::gather_matmul under its decoder name: the compiled test below runs it.
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", list(_op_samples("cpu", "reference", torch.float32)))
def test_opcheck(op, device, backend, dtype):
    for overload, args in _op_samples(device, backend, dtype)[op]:
        torch.library.opcheck(overload, args)


def test_checked_indices_rejects_out_of_range_and_returns_a_copy():
    idx = torch.tensor([[0, 3], [2, 1]], dtype=torch.int32)
    out = torch.ops.tckernels.checked_indices(idx, 4)
    assert out.dtype == torch.int64 and torch.equal(out, idx.long())
    same = torch.tensor([[0, 3]])
    assert torch.ops.tckernels.checked_indices(same, 4).data_ptr() != same.data_ptr()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        torch.ops.tckernels.checked_indices(idx, 3)


class TopKTranscoder(torch.nn.Module):
    def __init__(self, d, n, k):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.k = k
        self.W_enc = torch.nn.Parameter(torch.randn(n, d, generator=g) / d**0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(n))
        self.W_dec = torch.nn.Parameter(torch.randn(n, d, generator=g) / n**0.5)
        self.b_dec = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x):
        values, indices = tckernels.encode_topk(x, self.W_enc, self.b_enc, self.k)
        return tckernels.sparse_decode(values, indices, self.W_dec, self.b_dec)


def test_compile_fullgraph_encode_topk_and_sparse_decode_match_eager():
    """A TopK transcoder step (forward and backward) in one graph, index check included."""
    torch._dynamo.reset()
    model = TopKTranscoder(24, 96, 6)
    x = torch.randn(3, 5, 24)

    def loss_fn(m, inp):
        return ((m(inp) - inp) ** 2).mean()

    eager = loss_fn(model, x)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    loss = compiled(model, x)
    loss.backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, eager)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("op", ["gather_matmul", "sparse_decode", "gather_dot", "scatter_matmul"])
def test_compiled_op_still_rejects_out_of_range_indices(op):
    """The index check is an op of its own in the graph: compiling keeps it (no graph break, not
    pruned), and an index from outside [0, N) still raises before any kernel runs."""
    torch._dynamo.reset()
    N, D = 7, 4
    fn = {
        "gather_matmul": lambda v, i, w: tckernels.gather_matmul(v, i, w),
        "sparse_decode": lambda v, i, w: tckernels.sparse_decode(v, i, w),
        "gather_dot": lambda v, i, w: tckernels.gather_dot(w[:3], i, w),
        "scatter_matmul": lambda v, i, w: tckernels.scatter_matmul(v, i, w[:3], N),
    }[op]
    compiled = torch.compile(fn, fullgraph=True)
    v, w = torch.randn(3, 2), torch.randn(N, D)
    good = torch.tensor([[0, 6], [1, 2], [3, 3]])
    torch.testing.assert_close(compiled(v, good, w), fn(v, good, w))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 7\)"):
        compiled(v, good.clone().fill_(7), w)
