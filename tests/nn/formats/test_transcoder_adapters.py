"""Transcoder-adapter weights inside Hugging Face checkpoints (a state dict, one file, shards, a
pytorch_model.bin) against the adapter branch's own forward."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tckernels.nn.formats import FormatError, MissingKeyError, load_transcoder_adapter_weights
from tests.nn.formats import TOL, truncate

D0, F0 = 12, 40


def _adapter_state_dict(layers=(0, 1, 2), dec_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in layers:
        pre = f"model.layers.{i}.mlp."
        sd[pre + "gate_proj.weight"] = torch.randn(20, D0, generator=g)  # the base MLP: not read
        sd[pre + "transcoder_enc.weight"] = torch.randn(F0, D0, generator=g) / 3
        sd[pre + "transcoder_enc.bias"] = torch.randn(F0, generator=g) / 3
        sd[pre + "transcoder_dec.weight"] = torch.randn(D0, F0, generator=g) / 3
        if dec_bias:
            sd[pre + "transcoder_dec.bias"] = torch.randn(D0, generator=g)
    sd["model.embed_tokens.weight"] = torch.randn(30, D0, generator=g)
    return sd


def adapter_branch(sd, i, x):
    """The release's branch dec(relu(enc(x))) with the saved nn.Linear weights."""
    pre = f"model.layers.{i}.mlp."
    h = F.relu(F.linear(x, sd[pre + "transcoder_enc.weight"], sd[pre + "transcoder_enc.bias"]))
    return F.linear(h, sd[pre + "transcoder_dec.weight"], sd.get(pre + "transcoder_dec.bias"))


def _write_shards(sd, path, n_shards=2):
    os.makedirs(path, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s::n_shards]}
        save_file(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("source", ["dict", "file", "shards", "bin"])
def test_matches_branch(tmp_path, source):
    sd = _adapter_state_dict()
    if source == "dict":
        src = sd
    elif source == "file":
        src = tmp_path / "model.safetensors"
        save_file(sd, src)
    elif source == "shards":
        src = tmp_path / "ckpt"
        _write_shards(sd, src)
    else:
        src = tmp_path / "ckpt_bin"
        os.makedirs(src)
        torch.save(sd, src / "pytorch_model.bin")
    models = load_transcoder_adapter_weights(src)
    assert sorted(models) == [0, 1, 2]
    x = torch.randn(3, 4, D0)
    for i, tc in models.items():
        assert tc.activation == "relu" and tc.layer == i
        torch.testing.assert_close(tc(x), adapter_branch(sd, i, x), **TOL)


def test_options(tmp_path):
    sd = _adapter_state_dict(layers=(0, 5), dec_bias=False)
    models = load_transcoder_adapter_weights(sd, layers=[5], dtype=torch.float64)
    assert list(models) == [5] and models[5].b_dec is None and models[5].W_enc.dtype == torch.float64
    x = torch.randn(6, D0, dtype=torch.float64)
    sd64 = {k: v.double() for k, v in sd.items()}
    torch.testing.assert_close(models[5](x), adapter_branch(sd64, 5, x))
    # bf16 checkpoints stay bf16 and bit-exact
    sdb = {k: v.bfloat16() for k, v in sd.items()}
    tc = load_transcoder_adapter_weights(sdb, layers=[0])[0]
    assert tc.W_enc.dtype == torch.bfloat16
    assert torch.equal(tc.W_dec, sdb["model.layers.0.mlp.transcoder_dec.weight"].T)


def test_errors(tmp_path):
    sd = _adapter_state_dict()
    del sd["model.layers.1.mlp.transcoder_enc.bias"]
    with pytest.raises(MissingKeyError, match=r"model\.layers\.1\.mlp\.transcoder_enc\.bias"):
        load_transcoder_adapter_weights(sd)
    with pytest.raises(MissingKeyError, match=r"layers\.7"):
        load_transcoder_adapter_weights(_adapter_state_dict(), layers=[7])
    sd = _adapter_state_dict()
    sd["model.layers.2.mlp.transcoder_dec.weight"] = torch.randn(D0, F0 + 1)
    with pytest.raises(FormatError, match=r"transcoder_dec\.weight.*shape"):
        load_transcoder_adapter_weights(sd)
    with pytest.raises(MissingKeyError):
        load_transcoder_adapter_weights({"model.embed_tokens.weight": torch.zeros(2, 2)})
    ck = tmp_path / "ck"
    _write_shards(_adapter_state_dict(), ck)
    shard = ck / "model-00002-of-00002.safetensors"
    truncate(shard)
    with pytest.raises(FormatError, match=r"model-00002-of-00002\.safetensors"):
        load_transcoder_adapter_weights(ck)
    # index lists a key the shard does not hold
    ck2 = tmp_path / "ck2"
    _write_shards(_adapter_state_dict(), ck2)
    idx = json.loads((ck2 / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.9.mlp.transcoder_enc.weight"] = "model-00001-of-00002.safetensors"
    (ck2 / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(MissingKeyError, match=r"model-00001-of-00002\.safetensors.*layers\.9"):
        load_transcoder_adapter_weights(ck2, layers=[9])
