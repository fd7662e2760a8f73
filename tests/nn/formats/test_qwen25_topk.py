"""The Qwen2.5-32B per-layer TopK transcoders: files written here in the release's layout, and the
model card's forward."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from tckernels.nn.formats import (
    FormatError,
    MissingKeyError,
    PreNormTranscoder,
    load_qwen25_topk_transcoder,
    load_qwen25_topk_transcoders,
)
from tckernels.nn.transcoder import Transcoder
from tests.nn.formats import TOL, truncate

D1, F1 = 16, 50  # k = int(0.12 * 50) = 6


def _checkpoint_file(path, layer=3, prefix="_orig_mod.", seed=0, drop=None, reshape=None):
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict(
        [
            (prefix + "enc.0.weight", 1 + 0.1 * torch.randn(D1, generator=g)),
            (prefix + "enc.0.bias", torch.randn(D1, generator=g)),
            (prefix + "enc.1.weight", torch.randn(F1, D1, generator=g) / 4),
            (prefix + "enc.1.bias", torch.randn(F1, generator=g) / 4),
            (prefix + "dec.weight", torch.randn(D1, F1, generator=g) / 4),
            (prefix + "dec.bias", torch.randn(D1, generator=g)),
        ]
    )
    if drop:
        del sd[prefix + drop]
    if reshape:
        sd[prefix + reshape] = sd[prefix + reshape][..., :-1]
    ck = {
        "layer": layer,
        "hidden_dim": D1,
        "feature_dim": F1,
        "state_dict": sd,
        "training_metadata": {"steps": 5000, "final_l0_pct": 12.0, "dead_features": 0, "dead_pct": 0.0, "final_rec_loss": 0.1},
    }
    torch.save(ck, path)
    return ck


def card_forward(transcoder, activations):
    """The card's 'Using for Circuit Discovery' code, literally."""
    state_dict = transcoder["state_dict"]
    W_enc = state_dict["_orig_mod.enc.1.weight"]
    b_enc = state_dict["_orig_mod.enc.1.bias"]
    W_dec = state_dict["_orig_mod.dec.weight"]
    b_dec = state_dict["_orig_mod.dec.bias"]
    pre_enc_bias = state_dict["_orig_mod.enc.0.bias"]
    activations_centered = activations + pre_enc_bias
    features = F.linear(activations_centered, W_enc, b_enc)
    features = F.relu(features)
    k = int(0.12 * features.shape[-1])
    topk_values, topk_indices = torch.topk(features, k, dim=-1)
    sparse_features = torch.zeros_like(features)
    sparse_features.scatter_(-1, topk_indices, topk_values)
    return F.linear(sparse_features, W_dec, b_dec)


def test_matches_card_math(tmp_path):
    p = tmp_path / "transcoder_L3.pt"
    ck = _checkpoint_file(p)
    model = load_qwen25_topk_transcoder(p)
    assert isinstance(model, Transcoder)
    assert model.activation == "topk" and model.k == 6 and model.layer == 3
    assert model.training_metadata["steps"] == 5000
    x = torch.randn(2, 7, D1)
    torch.testing.assert_close(model(x), card_forward(ck, x), **TOL)
    # the pre-encoder bias is mapped bit-exactly: x - b_pre == x + enc.0.bias
    assert torch.equal(x - model.b_pre, x + ck["state_dict"]["_orig_mod.enc.0.bias"])


def test_layernorm_reading(tmp_path):
    p = tmp_path / "transcoder_L0.pt"
    ck = _checkpoint_file(p, layer=0, prefix="")  # also: keys saved without torch.compile's prefix
    model = load_qwen25_topk_transcoder(p, pre_encoder="layernorm", layernorm_eps=1e-5)
    assert isinstance(model, PreNormTranscoder)
    sd = ck["state_dict"]
    x = torch.randn(9, D1) * 3 + 1
    xn = F.layer_norm(x, (D1,), sd["enc.0.weight"], sd["enc.0.bias"], 1e-5)
    f = F.relu(F.linear(xn, sd["enc.1.weight"], sd["enc.1.bias"]))
    top = f.topk(6, dim=-1)
    f = torch.zeros_like(f).scatter(-1, top.indices, top.values)
    ref = F.linear(f, sd["dec.weight"], sd["dec.bias"])
    torch.testing.assert_close(model(x), ref, **TOL)
    torch.testing.assert_close(model.decode(model.encode(x)), ref, **TOL)


def test_dir_and_k_override(tmp_path):
    for i in range(3):
        _checkpoint_file(tmp_path / f"transcoder_L{i}.pt", layer=i, seed=i)
    models = load_qwen25_topk_transcoders(tmp_path, layers=[0, 2], k=4)
    assert sorted(models) == [0, 2] and all(m.k == 4 for m in models.values())
    assert sorted(load_qwen25_topk_transcoders(tmp_path)) == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="transcoder_L5.pt"):
        load_qwen25_topk_transcoders(tmp_path, layers=[5])
    _checkpoint_file(tmp_path / "transcoder_L7.pt", layer=8)
    with pytest.raises(FormatError, match="transcoder_L7.pt.*'layer'"):
        load_qwen25_topk_transcoders(tmp_path, layers=[7])


def test_errors_name_file_and_key(tmp_path):
    p = tmp_path / "transcoder_L1.pt"
    _checkpoint_file(p, drop="dec.bias")
    with pytest.raises(MissingKeyError, match=r"transcoder_L1\.pt.*_orig_mod\.dec\.bias") as e:
        load_qwen25_topk_transcoder(p)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    _checkpoint_file(p, reshape="dec.weight")
    with pytest.raises(FormatError, match=r"transcoder_L1\.pt.*_orig_mod\.dec\.weight.*shape"):
        load_qwen25_topk_transcoder(p)
    _checkpoint_file(p)
    truncate(p)
    with pytest.raises(FormatError, match=r"transcoder_L1\.pt.*truncated or corrupt"):
        load_qwen25_topk_transcoder(p)
    with pytest.raises(FileNotFoundError):
        load_qwen25_topk_transcoder(tmp_path / "nope.pt")
