"""Shared references for the tckernels.nn tests."""
import torch


class OriginalBilinear(torch.nn.Module):
    """The Pythia bilinear release's original code layout, written literally: head(left(x) * right(x)).

    ``head_bias`` defaults to ``bias``.
    """

    def __init__(self, d_in, d_hidden, d_out, bias, head_bias=None):
        super().__init__()
        self.left = torch.nn.Linear(d_in, d_hidden, bias=bias)
        self.right = torch.nn.Linear(d_in, d_hidden, bias=bias)
        self.head = torch.nn.Linear(d_hidden, d_out, bias=bias if head_bias is None else head_bias)

    def forward(self, x):
        return self.head(self.left(x) * self.right(x))
