"""torch.library.opcheck on every op, and a compiled TopK transcoder step with no graph break."""
import pytest
import torch
import torch._dynamo.testing

import tckernels
from tests.helpers import backend_params

BACKENDS = backend_params()


def _op_samples(device, backend, dtype):
    g = torch.Generator().manual_seed(0)
    M, k, N, D = 5, 3, 13, 6

    def r(*s, grad=True):
        t = torch.randn(*s, generator=g).to(dtype).to(device)
        return t.requires_grad_() if grad else t

    idx = torch.randint(0, N, (M, k), generator=g).to(device)
    ops = torch.ops.tckernels
    return [
        (ops.gather_matmul.default, (r(M, k), idx, r(N, D), r(D), backend, True)),
        (ops.gather_matmul.default, (r(M, k), idx.int(), r(N, D), None, backend, True)),
        (ops.gather_dot.default, (r(M, D), idx, r(N, D), backend, True)),
        (ops.scatter_matmul.default, (r(M, k), idx, r(M, D), N, False, backend, True)),
        (ops.scatter_matmul.default, (r(M, k), idx, r(M, D), N, True, backend, True)),
        (ops.topk_relu.default, (r(M, N), k, r(N), backend)),
        (ops.topk_relu.default, (r(M, N), k, None, backend)),
        (ops.encode_topk.default, (r(M, D), r(N, D), r(N), k, backend)),
        (ops.encode_relu.default, (r(M, D), r(N, D), r(N), k, None, 0.0, backend)),
        (ops.encode_relu.default, (r(M, D), r(N, D), None, k, r(N, grad=False).abs(), 0.0, backend)),
    ]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, backend, dtype):
    for op, args in _op_samples(device, backend, dtype):
        torch.library.opcheck(op, args)


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


def test_compile_fullgraph_forward_backward_matches_eager():
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
