"""The tckernels transcoder format: bit-exact save/load round trip and clear errors for broken checkpoints."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tckernels.nn import FormatError, load_transcoder, save_transcoder
from tckernels.nn.formats import tckernels_transcoder
from tckernels.nn.transcoder import Transcoder


def _trained(activation, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    if activation in ("topk", "batchtopk"):
        kw.setdefault("k", 3)
    m = Transcoder(12, 40, 9, activation, dtype=dtype, **kw)
    x = torch.randn(4, 5, 12).to(dtype)
    t = torch.randn(4, 5, 9).to(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):  # non-trivial values in every parameter and buffer
        opt.zero_grad()
        m.forward_with_aux(x, t).losses["loss"].float().backward()
        opt.step()
    with torch.no_grad():
        m.b_dec.add_(0.5) if m.b_dec is not None else None
        m.tokens_since_fired.add_(torch.arange(40))
    return m


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    assert a.config == b.config


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, activation, dtype):
    m = _trained(activation, dtype, skip=True, pre_bias=True, l1_coefficient=0.01)
    save_transcoder(m, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    m2 = load_transcoder(tmp_path / "ckpt")
    _assert_same(m, m2)
    for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert isinstance(p2, torch.nn.Parameter) and p2.requires_grad, n
    x = torch.randn(3, 12).to(dtype)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))


def test_load_with_dtype_and_device(tmp_path):
    m = _trained("relu", dec_bias=False)
    save_transcoder(m, tmp_path)
    m2 = load_transcoder(tmp_path, dtype=torch.float64, device="cpu")
    assert m2.W_enc.dtype == torch.float64 and m2.tokens_since_fired.dtype == torch.int64
    assert torch.equal(m2.W_enc.float(), m.W_enc)
    assert m2.b_dec is None
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["format"] == tckernels_transcoder.FORMAT and meta["format_version"] == tckernels_transcoder.FORMAT_VERSION
    assert meta["dtype"] == "float32" and meta["config"]["activation"] == "relu"


def _saved(tmp_path, activation="topk"):
    m = _trained(activation)
    save_transcoder(m, tmp_path)
    return m, tmp_path / "model.safetensors", tmp_path / "config.json"


def test_missing_key_names_file_and_key(tmp_path):
    _, wfile, _ = _saved(tmp_path)
    t = load_file(str(wfile))
    del t["W_dec"]
    save_file(t, str(wfile))
    with pytest.raises(FormatError, match=r"model\.safetensors.*missing key 'W_dec'") as e:
        load_transcoder(tmp_path)
    assert e.value.path == wfile  # the error family's attributes say where


def test_wrong_shape_names_file_and_key(tmp_path):
    _, wfile, _ = _saved(tmp_path)
    t = load_file(str(wfile))
    t["b_enc"] = torch.zeros(41)
    save_file(t, str(wfile))
    match = r"model\.safetensors.*'b_enc' has shape \(41,\), expected \(40,\)"
    with pytest.raises(FormatError, match=match):
        load_transcoder(tmp_path)


def test_wrong_dtype_and_unexpected_key(tmp_path):
    _, wfile, _ = _saved(tmp_path)
    t = load_file(str(wfile))
    t["W_enc"] = t["W_enc"].half()
    save_file(t, str(wfile))
    with pytest.raises(FormatError, match="'W_enc' has dtype float16"):
        load_transcoder(tmp_path)
    t["W_enc"] = t["W_enc"].float()
    t["extra"] = torch.zeros(1)
    save_file(t, str(wfile))
    with pytest.raises(FormatError, match="unexpected key 'extra'"):
        load_transcoder(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 10])
def test_truncated_weights(tmp_path, keep):
    _, wfile, _ = _saved(tmp_path)
    data = wfile.read_bytes()
    n = int(len(data) * keep) if keep < 1 else keep
    wfile.write_bytes(data[:n])
    with pytest.raises(FormatError, match=r"model\.safetensors.*truncated or corrupt"):
        load_transcoder(tmp_path)


def test_missing_files_and_bad_config(tmp_path):
    with pytest.raises(FormatError, match="not a directory"):
        load_transcoder(tmp_path / "nope")
    _, wfile, cfile = _saved(tmp_path)
    text = cfile.read_text()

    cfile.write_text("{not json")
    with pytest.raises(FormatError, match=r"config\.json: not valid JSON"):
        load_transcoder(tmp_path)

    meta = json.loads(text)
    for mutate, match in [
        (lambda d: d.pop("config"), "missing key 'config'"),
        (lambda d: d.update(format="something"), "key 'format'"),
        (lambda d: d.update(format_version=99), "newer"),
        (lambda d: d["config"].update(colour="red"), "unknown config key"),
        (lambda d: d["config"].update(activation="gelu"), "invalid config"),
        (lambda d: d.update(dtype="int8"), "dtype"),
        (lambda d: d["config"].update(n_features=41), "'W_enc' has shape"),
    ]:
        d = json.loads(text)
        mutate(d)
        cfile.write_text(json.dumps(d))
        with pytest.raises(FormatError, match=match):
            load_transcoder(tmp_path)

    cfile.write_text(text)
    wfile.unlink()
    with pytest.raises(FormatError, match=r"model\.safetensors: file not found"):
        load_transcoder(tmp_path)
    cfile.unlink()
    with pytest.raises(FormatError, match=r"config\.json: file not found"):
        load_transcoder(tmp_path)
    assert meta["config"]["n_features"] == 40


def test_save_rejects_other_modules(tmp_path):
    with pytest.raises(TypeError, match="Transcoder"):
        save_transcoder(torch.nn.Linear(2, 2), tmp_path)
