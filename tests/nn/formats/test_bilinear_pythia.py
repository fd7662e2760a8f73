"""The Pythia-410m bilinear transcoders: checkpoints written as the release's training script writes
them (with a pickled config class), its published ``Bilinear`` class, and no code run on load."""
import dataclasses
import sys
import types

import pytest
import torch

from tckernels.nn.bilinear import BilinearMLP, BilinearTranscoder
from tckernels.nn.formats import FormatError, MissingKeyError, PickledObject, load_bilinear_pythia
from tests.nn import OriginalBilinear
from tests.nn.formats import SIDE_EFFECTS, TOL, Evil, truncate

class PublishedBilinear(torch.nn.Module):
    """The ``Bilinear`` class as published with the checkpoints."""

    def __init__(self, n_inputs, n_hidden, n_outputs, bias=True):
        super().__init__()
        self.W_left = torch.nn.Linear(n_hidden, n_outputs, bias=bias)
        self.W_right = torch.nn.Linear(n_inputs, n_hidden, bias=False)

    def forward(self, x):
        right = self.W_right(x)
        hadamard = x.unsqueeze(-1) * right.unsqueeze(-2)
        return self.W_left(hadamard.sum(dim=-2))


def _bilinear_checkpoint(path, bias=True, config_module="train_bilinear", extra=None, seed=0):
    """Write a checkpoint as the release's training script does; its config class lives in a module
    that is importable only while saving (like a training script's __main__)."""
    torch.manual_seed(seed)
    model = PublishedBilinear(12, 24, 10, bias)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 12)).square().mean().backward()
    opt.step()
    mod = types.ModuleType(config_module)

    @dataclasses.dataclass
    class TranscoderConfig:
        n_inputs: int
        n_hidden: int
        n_outputs: int
        bias: bool = True

    TranscoderConfig.__module__ = config_module
    TranscoderConfig.__qualname__ = "TranscoderConfig"
    mod.TranscoderConfig = TranscoderConfig
    sys.modules[config_module] = mod
    try:
        ck = {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "config": TranscoderConfig(12, 24, 10, bias),
            "mse_losses": [0.5, 0.25],
            "variance_explained": [0.9, 0.95],
            "fvu_values": [0.1, 0.05],
            "layer_idx": 3,
            "d_model": 12,
        }
        ck.update(extra or {})
        torch.save(ck, path)
    finally:
        del sys.modules[config_module]
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_bilinear_pythia_matches_published_class(tmp_path, bias):
    p = tmp_path / "transcoder_weights_l3_bilinear_muon_3000b.pt"
    ref = _bilinear_checkpoint(p, bias)
    with pytest.raises(Exception):  # the format really needs more than weights_only=True
        torch.load(p, weights_only=True)
    m = load_bilinear_pythia(p)
    assert isinstance(m, BilinearTranscoder) and m.layer == 3
    assert isinstance(m.config, PickledObject)
    assert (m.config.n_inputs, m.config.n_hidden, m.config.n_outputs, m.config.bias) == (12, 24, 10, bias)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(m(x), ref(x), **TOL)


def test_bilinear_pythia_runs_no_code_without_trust(tmp_path):
    p = tmp_path / "ck.pt"
    _bilinear_checkpoint(p, extra={"payload": Evil()})
    SIDE_EFFECTS.clear()
    m = load_bilinear_pythia(p)
    assert SIDE_EFFECTS == []  # the reduce function was never called
    assert isinstance(m, BilinearTranscoder)
    # The explicit opt-in really unpickles: here it fails, since the config class is not importable.
    with pytest.raises(FormatError, match="weights_only=False"):
        load_bilinear_pythia(p, trust_pickle=True)


@pytest.mark.parametrize("bias", [True, False])
def test_bilinear_original_layout(tmp_path, bias):
    ref = OriginalBilinear(8, 16, 6, bias, head_bias=False)
    p = tmp_path / "orig.pt"
    torch.save({"model_state_dict": ref.state_dict()}, p)
    m = load_bilinear_pythia(p)
    assert isinstance(m, BilinearMLP)
    x = torch.randn(5, 8)
    torch.testing.assert_close(m(x), ref(x), **TOL)
    torch.save(ref.state_dict(), p)  # bare state dict
    torch.testing.assert_close(load_bilinear_pythia(p)(x), ref(x), **TOL)


def test_bilinear_pythia_errors(tmp_path):
    p = tmp_path / "bad.pt"
    sd = PublishedBilinear(4, 6, 4).state_dict()
    del sd["W_right.weight"]
    torch.save({"model_state_dict": sd}, p)
    with pytest.raises(MissingKeyError, match=r"bad\.pt.*W_right\.weight"):
        load_bilinear_pythia(p)
    sd = PublishedBilinear(4, 6, 4).state_dict()
    sd["W_right.weight"] = torch.randn(5, 4)
    torch.save({"model_state_dict": sd}, p)
    with pytest.raises(FormatError, match=r"bad\.pt.*W_right\.weight.*shape"):
        load_bilinear_pythia(p)
    torch.save({"model_state_dict": PublishedBilinear(4, 6, 4).state_dict(), "config": {"n_inputs": 4, "n_hidden": 7}}, p)
    with pytest.raises(FormatError, match=r"config\.n_hidden"):
        load_bilinear_pythia(p)
    _bilinear_checkpoint(p)
    truncate(p, 0.6)
    with pytest.raises(FormatError, match=r"bad\.pt"):
        load_bilinear_pythia(p)
