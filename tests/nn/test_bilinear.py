import pytest
import torch

from tckernels.nn.bilinear import BilinearMLP, BilinearTranscoder
from tests.nn import OriginalBilinear


class PublishedBilinear(torch.nn.Module):
    """The Pythia bilinear release's ``Bilinear`` class, literally as published on the model card."""

    def __init__(self, n_inputs, n_hidden, n_outputs, bias=True):
        super().__init__()
        self.W_left = torch.nn.Linear(n_hidden, n_outputs, bias=bias)
        self.W_right = torch.nn.Linear(n_inputs, n_hidden, bias=False)

    def forward(self, x):
        right = self.W_right(x)
        hadamard = x.unsqueeze(-1) * right.unsqueeze(-2)
        return self.W_left(hadamard.sum(dim=-2))


def _tol(dtype):
    return {"atol": 1e-9, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 2e-4, "rtol": 2e-4}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(7,), (2, 5), ()])
def test_bilinear_matches_published_class(bias, dtype, lead):
    torch.manual_seed(0)
    n_in, n_hid, n_out = 12, 20, 9
    ref = PublishedBilinear(n_in, n_hid, n_out, bias).to(dtype)
    ours = BilinearTranscoder(n_in, n_hid, n_out, bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())  # same parameter names as the checkpoints
    x = torch.randn(*lead, n_in, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), ours(x2)
    assert y.shape == (*lead, n_out)
    torch.testing.assert_close(y, y_ref, **_tol(dtype))
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, **_tol(dtype))
    for (name, p), (name_r, p_r) in zip(ours.named_parameters(), ref.named_parameters()):
        assert name == name_r
        torch.testing.assert_close(p.grad, p_r.grad, **_tol(dtype), msg=name)


def test_bilinear_is_not_the_card_formula():
    # The card's `W_left @ (x ⊙ (W_right @ x))` is a different function (when it is even defined).
    torch.manual_seed(1)
    m = BilinearTranscoder(8, 8, 8, bias=False, dtype=torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64)
    card = (x * (x @ m.W_right.weight.T)) @ m.W_left.weight.T
    assert not torch.allclose(m(x), card)
    published = (x.sum(-1, keepdim=True) * (x @ m.W_right.weight.T)) @ m.W_left.weight.T
    torch.testing.assert_close(m(x), published)


def test_bilinear_gradcheck():
    torch.manual_seed(2)
    m = BilinearTranscoder(5, 6, 4, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_bilinear_no_outer_product_intermediate():
    # The [.., n_in, n_hidden] tensor would be 64 * 256 * 512 * 4 B = 32 MiB; none of the saved
    # activations may be that large.
    m = BilinearTranscoder(256, 512, 8, bias=True)
    x = torch.randn(64, 256, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x).sum().backward()
    assert max(sizes) < 64 * 256 * 512 / 16


@pytest.mark.parametrize("bias", [True, False])
def test_bilinear_mlp_matches_original_layout(bias):
    torch.manual_seed(3)
    ref = OriginalBilinear(10, 14, 6, bias).double()
    ours = BilinearMLP(10, 14, 6, bias=bias, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x))
    (gx,) = torch.autograd.grad(ours(x).square().sum(), x)
    (gx_ref,) = torch.autograd.grad(ref(x).square().sum(), x)
    torch.testing.assert_close(gx, gx_ref)


def test_bilinear_bad_input_dim():
    m = BilinearTranscoder(4, 6, 4)
    with pytest.raises(ValueError, match="n_inputs"):
        m(torch.randn(2, 5))
