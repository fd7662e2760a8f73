"""Every op under ``torch.autocast(dtype=bfloat16)``: float32 inputs run as bfloat16 ones would (the
same kernel on the cast inputs, bit for bit), and gradients reach the float32 inputs in float32.
Outside autocast nothing is cast."""
import pytest
import torch

import tckernels
from tckernels import ops

M, D, N, K = 12, 16, 40, 4


def _indices(g):
    return torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(M)])


def make(op, g):
    """(args with float32 tensors that require grad, the positions of the floating-point ones)."""
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    if op == "encode_topk":
        return [r(M, D), r(N, D), r(N), K], (0, 1, 2)
    if op == "encode_relu":
        return [r(M, D), r(N, D), r(N), N], (0, 1, 2)
    if op == "topk_relu":
        return [r(M, N), K, r(N)], (0, 2)
    if op in ("sparse_decode", "gather_matmul"):
        return [r(M, K), _indices(g), r(N, D), r(D)], (0, 2, 3)
    if op == "gather_dot":
        return [r(M, D), _indices(g), r(N, D)], (0, 2)
    if op == "scatter_matmul":
        return [r(M, K), _indices(g), r(M, D), N], (0, 2)
    raise AssertionError(op)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("op", tckernels.ops.__all__)
def test_autocast_runs_the_op_in_bfloat16(op):
    g = torch.Generator().manual_seed(0)
    args, floating = make(op, g)
    fn = getattr(ops, op)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*args)
    # the reference: the same op on inputs cast by hand, outside autocast
    cast = [a.detach().to(torch.bfloat16).requires_grad_() if i in floating else a for i, a in enumerate(args)]
    want = fn(*cast)
    assert _first(got).dtype == torch.bfloat16
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(a, b)
    seed = torch.randn(_first(want).shape, generator=g)
    _first(got).float().mul(seed).sum().backward()
    _first(want).float().mul(seed).sum().backward()
    for i in floating:
        if cast[i].grad is None:  # an input the op has no gradient for (e.g. topk_relu's bias is used)
            assert args[i].grad is None
            continue
        assert args[i].grad.dtype == torch.float32  # the float32 master receives it
        torch.testing.assert_close(args[i].grad, cast[i].grad.float(), rtol=0, atol=0)


@pytest.mark.parametrize("op", tckernels.ops.__all__)
def test_no_autocast_leaves_the_dtype_alone(op):
    args, floating = make(op, torch.Generator().manual_seed(1))
    assert _first(getattr(ops, op)(*args)).dtype == torch.float32


def test_autocast_transcoder_step_is_the_bfloat16_step_with_float32_masters():
    """A whole TopK transcoder objective under autocast computes what the same transcoder cast to
    bfloat16 computes (its selections and output bit for bit), while its gradients land on the
    float32 weights. (Against float32 it differs by more than rounding: bf16 flips near-tied TopK
    selections.)"""
    from tckernels.nn import Transcoder

    torch.manual_seed(0)
    tc = Transcoder(32, 256, 32, "topk", k=8)
    low = Transcoder(32, 256, 32, "topk", k=8, dtype=torch.bfloat16)
    low.load_state_dict(tc.state_dict())
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tc.forward_with_aux(x, y)
    out.losses["loss"].backward()
    want = low.forward_with_aux(x.bfloat16(), y.bfloat16())
    want.losses["loss"].backward()
    assert torch.equal(out.acts.indices, want.acts.indices)
    assert torch.equal(out.output, want.output)
    assert out.losses["loss"].item() == pytest.approx(want.losses["loss"].item(), rel=1e-2)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        got, ref = getattr(tc, name).grad, getattr(low, name).grad.float()
        assert got.dtype == torch.float32
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2, name
