"""sparsify's hook-point folders (cfg.json + sae.safetensors): round trips, the forward as sparsify
defines it, refusals and bad files. Needs no sparsify install (test_sparsify_release.py runs the
real package)."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tckernels.nn.errors import FormatError, MissingKeyError
from tckernels.nn.formats.sparsify import load_sparsify, load_sparsify_dir, save_sparsify, save_sparsify_dir
from tckernels.nn.transcoder import Transcoder
from tests.nn.formats import TOL, truncate

D, N = 12, 48


def random_transcoder(*, k=4, skip=False, sae=False, dec_bias=True, dtype=torch.float32, seed=0, **kw):
    """A TopK transcoder with every parameter random; ``sae``: b_pre tied to b_dec."""
    tc = Transcoder(D, N, D, "topk", k=k, skip=skip, pre_bias=sae, dec_bias=dec_bias, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(dtype))
        tc.W_enc /= D ** 0.5
        if tc.W_skip is not None:
            tc.W_skip /= D ** 0.5
        if sae:
            tc.b_pre.copy_(tc.b_dec)
    return tc


def sparsify_math(folder, x):
    """sparsify 1.3.3's SparseCoder.forward written out from its files: an SAE subtracts b_dec,
    then relu, the k largest, the decoder rows and b_dec, plus the skip."""
    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    sd = load_file(os.path.join(folder, "sae.safetensors"))
    h = x if cfg.get("transcode", False) else x - sd["b_dec"]
    pre = F.relu(F.linear(h, sd["encoder.weight"], sd["encoder.bias"]))
    vals, idx = pre.topk(cfg.get("k", 32), dim=-1)
    y = F.embedding_bag(idx, sd["W_dec"], per_sample_weights=vals, mode="sum") + sd["b_dec"]
    if cfg.get("skip_connection", False):
        y = y + x @ sd["W_skip"].mT
    return y, vals, idx


def dense(acts, n=N):
    v, i = acts
    return torch.zeros(*v.shape[:-1], n, dtype=v.dtype).scatter_add_(-1, i, v)


def x_batch(rows=20, seed=1, dtype=torch.float32):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def write_folder(folder, cfg, tensors):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(folder, "sae.safetensors"))


def good_tensors(skip=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    t = {"encoder.weight": torch.randn(N, D, generator=g), "encoder.bias": torch.randn(N, generator=g),
         "W_dec": torch.randn(N, D, generator=g), "b_dec": torch.randn(D, generator=g)}
    if skip:
        t["W_skip"] = torch.randn(D, D, generator=g)
    return {k: v.to(dtype) for k, v in t.items()}


def good_cfg(**kw):
    return {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": 5,
            "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **kw}


# ------------------------------------------------------------------------------------------------
# round trips and the forward


@pytest.mark.parametrize("kind", ["sae", "sae_skip", "transcoder", "transcoder_skip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_round_trip_is_bit_exact(tmp_path, kind, dtype):
    tc = random_transcoder(k=6, skip=kind.endswith("skip"), sae=kind.startswith("sae"), dtype=dtype,
                           normalize_decoder=True)
    save_sparsify(tc, tmp_path / "hook")
    cfg = json.load(open(tmp_path / "hook" / "cfg.json"))
    assert cfg == {"activation": "topk", "expansion_factor": N // D, "normalize_decoder": True, "num_latents": N,
                   "k": 6, "multi_topk": False, "skip_connection": kind.endswith("skip"),
                   "transcode": kind.startswith("transcoder"), "d_in": D}
    sd = load_file(tmp_path / "hook" / "sae.safetensors")
    assert set(sd) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} | ({"W_skip"} if "skip" in kind else set())
    back = load_sparsify(tmp_path / "hook")
    assert back.config == tc.config
    for (name, p), (name2, q) in zip(tc.named_parameters(), back.named_parameters()):
        assert name == name2 and p.dtype == q.dtype and torch.equal(p, q), name
    x = x_batch(dtype=dtype)
    with torch.no_grad():
        assert torch.equal(tc(x), back(x))


@pytest.mark.parametrize("kind", ["sae", "sae_skip", "transcoder", "transcoder_skip"])
def test_forward_is_sparsify_math(tmp_path, kind):
    tc = random_transcoder(k=5, skip=kind.endswith("skip"), sae=kind.startswith("sae"), seed=4)
    save_sparsify(tc, tmp_path)
    x = x_batch(seed=5)
    want, vals, idx = sparsify_math(tmp_path, x)
    got = load_sparsify(tmp_path)
    with torch.no_grad():
        acts = got.encode(x)
        torch.testing.assert_close(got(x), want, **TOL)
    torch.testing.assert_close(dense(acts), dense((vals, idx)), **TOL)
    if kind.startswith("sae"):  # the b_dec shift matters, so the mapping onto b_pre is checked
        with torch.no_grad():
            got.b_pre.zero_()
            assert (got(x) - want).abs().max() > 1e-2


def test_no_decoder_bias_is_written_as_zero(tmp_path):
    tc = random_transcoder(dec_bias=False, seed=6)
    save_sparsify(tc, tmp_path)
    assert torch.equal(load_file(tmp_path / "sae.safetensors")["b_dec"], torch.zeros(D))
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_sparsify(tmp_path)(x), tc(x), atol=0, rtol=0)


def test_save_dtype_and_load_dtype(tmp_path):
    tc = random_transcoder(sae=True)
    save_sparsify(tc, tmp_path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "sae.safetensors").values())
    back = load_sparsify(tmp_path, dtype=torch.float64)
    assert back.W_enc.dtype == torch.float64
    assert torch.equal(back.W_enc, tc.W_enc.to(torch.bfloat16).double())
    assert torch.equal(back.b_pre, back.b_dec)


def test_k_override_and_defaults(tmp_path):
    cfg = good_cfg()
    for key in ("activation", "normalize_decoder", "k", "multi_topk", "skip_connection", "transcode", "num_latents"):
        del cfg[key]  # sparsify fills these with its defaults
    t = good_tensors()
    write_folder(tmp_path, cfg, t)
    tc = load_sparsify(tmp_path)
    assert tc.k == 32 and tc.b_pre is not None and tc.W_skip is None and tc.config.normalize_decoder
    assert tc.sparsify_cfg["k"] == 32 and tc.sparsify_cfg["d_in"] == D
    assert load_sparsify(tmp_path, k=7).k == 7
    with pytest.raises(ValueError, match="k must be"):
        load_sparsify(tmp_path, k=N + 1)


def test_fields_of_other_versions_at_neutral_values_load(tmp_path):
    write_folder(tmp_path, good_cfg(signed=False, embed_skip=False, gram_lookup=False, lookup_max_order=4,
                                    gram_table_hash=None, naive_decoder=True), good_tensors())
    assert load_sparsify(tmp_path).k == 5


def test_multi_topk_loads_the_k_model(tmp_path):
    write_folder(tmp_path, good_cfg(multi_topk=True, transcode=True), good_tensors())
    assert load_sparsify(tmp_path).k == 5


def test_main_environment_does_not_import_sparsify():
    assert "sparsify" not in sys.modules


# ------------------------------------------------------------------------------------------------
# refusals when saving


@pytest.mark.parametrize("activation, extra", [("relu", {}), ("jumprelu", {}), ("batchtopk", {"k": 4})])
def test_save_refuses_other_activations(tmp_path, activation, extra):
    tc = Transcoder(D, N, D, activation, **extra)
    with pytest.raises(ValueError, match="activation"):
        save_sparsify(tc, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_refuses_d_out_other_than_d_in(tmp_path):
    with pytest.raises(ValueError, match="d_out"):
        save_sparsify(Transcoder(D, N, D + 1, "topk", k=3), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_refuses_a_pre_bias_other_than_b_dec(tmp_path):
    tc = random_transcoder(sae=True)
    with torch.no_grad():
        tc.b_pre[0] += 1e-3
    with pytest.raises(ValueError, match="pre_bias"):
        save_sparsify(tc, tmp_path / "out")
    tc2 = Transcoder(D, N, D, "topk", k=3, pre_bias=True, dec_bias=False)
    with torch.no_grad():
        tc2.b_pre.fill_(1.0)
    with pytest.raises(ValueError, match="pre_bias"):
        save_sparsify(tc2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_refuses_other_modules(tmp_path):
    with pytest.raises(TypeError, match="Transcoder"):
        save_sparsify(torch.nn.Linear(D, D), tmp_path / "out")


def test_save_dir_checks_everything_first(tmp_path):
    good, bad = random_transcoder(), Transcoder(D, N, D, "relu")
    with pytest.raises(ValueError, match="'layers.1'.*activation"):
        save_sparsify_dir({"layers.0": good, "layers.1": bad}, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    for name in ("../up", "/abs", "", "a/b/c", 3):
        with pytest.raises(ValueError, match="hook point name"):
            save_sparsify_dir({name: good}, tmp_path / "run")


# ------------------------------------------------------------------------------------------------
# run folders


def test_dir_round_trip_with_seeds_and_best(tmp_path):
    tcs = {"layers.0.mlp": random_transcoder(seed=1), "layers.1.mlp": random_transcoder(sae=True, seed=2),
           "layers.2/seed0": random_transcoder(skip=True, seed=3), "layers.2/seed1": random_transcoder(seed=4)}
    save_sparsify_dir(tcs, tmp_path / "run")
    save_sparsify(random_transcoder(seed=9), tmp_path / "run" / "best" / "layers.0.mlp")  # the trainer's best copy
    torch.save({"global_step": 1}, tmp_path / "run" / "state.pt")
    got = load_sparsify_dir(tmp_path / "run")
    assert sorted(got) == sorted(tcs)
    x = x_batch()
    with torch.no_grad():
        for name, tc in tcs.items():
            assert torch.equal(got[name](x), tc(x)), name
    some = load_sparsify_dir(tmp_path / "run", ["layers.1.mlp", "best/layers.0.mlp"], dtype=torch.float64)
    assert sorted(some) == ["best/layers.0.mlp", "layers.1.mlp"] and some["layers.1.mlp"].W_enc.dtype == torch.float64
    with pytest.raises(FileNotFoundError, match="layers.7"):
        load_sparsify_dir(tmp_path / "run", ["layers.7"])
    with pytest.raises(FileNotFoundError, match="load_sparsify_dir"):
        load_sparsify(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no hook-point folders"):
        load_sparsify_dir(tmp_path / "run" / "layers.0.mlp")


# ------------------------------------------------------------------------------------------------
# bad files


def _expect(tmp_path, cfg, tensors, match, *, key=None, exc=FormatError):
    write_folder(tmp_path, cfg, tensors)
    with pytest.raises(exc, match=match) as e:
        load_sparsify(tmp_path)
    assert str(tmp_path) in str(e.value)
    if key is not None:
        assert key in str(e.value)


@pytest.mark.parametrize("key", ["encoder.weight", "encoder.bias", "W_dec", "b_dec"])
def test_missing_tensor(tmp_path, key):
    t = good_tensors()
    del t[key]
    _expect(tmp_path, good_cfg(), t, "missing", key=repr(key), exc=MissingKeyError)


def test_missing_skip_tensor(tmp_path):
    _expect(tmp_path, good_cfg(skip_connection=True), good_tensors(), "missing", key="'W_skip'", exc=MissingKeyError)


def test_unexpected_tensors(tmp_path):
    _expect(tmp_path, good_cfg(), good_tensors(skip=True), "skip_connection is false", key="'W_skip'")
    _expect(tmp_path, good_cfg(), {**good_tensors(), "b_pre": torch.zeros(D)}, "unexpected", key="'b_pre'")


@pytest.mark.parametrize("key, shape", [("encoder.weight", (D, N)), ("encoder.bias", (N + 1,)), ("W_dec", (D, N)),
                                        ("b_dec", (N,)), ("W_skip", (D, D + 1))])
def test_wrong_shape(tmp_path, key, shape):
    t = good_tensors(skip=True)
    t[key] = torch.zeros(shape)
    _expect(tmp_path, good_cfg(skip_connection=True), t, "shape", key=repr(key))


def test_wrong_dtypes(tmp_path):
    t = good_tensors()
    t["encoder.bias"] = torch.zeros(N, dtype=torch.int64)
    _expect(tmp_path, good_cfg(), t, "floating-point", key="'encoder.bias'")
    t = good_tensors()
    t["W_dec"] = t["W_dec"].double()
    _expect(tmp_path, good_cfg(), t, "one dtype", key="'W_dec'")


def test_truncated_weights(tmp_path):
    write_folder(tmp_path, good_cfg(), good_tensors())
    truncate(tmp_path / "sae.safetensors")
    with pytest.raises(FormatError, match="truncated") as e:
        load_sparsify(tmp_path)
    assert "sae.safetensors" in str(e.value)


def test_missing_weights_file(tmp_path):
    write_folder(tmp_path, good_cfg(), good_tensors())
    os.remove(tmp_path / "sae.safetensors")
    with pytest.raises(FileNotFoundError, match="sae.safetensors"):
        load_sparsify(tmp_path)


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_cfg_json(tmp_path, text, match):
    write_folder(tmp_path, good_cfg(), good_tensors())
    (tmp_path / "cfg.json").write_text(text)
    with pytest.raises(FormatError, match=match) as e:
        load_sparsify(tmp_path)
    assert "cfg.json" in str(e.value)


@pytest.mark.parametrize("change, field, match", [
    ({"activation": "groupmax"}, "activation", "groupmax"),
    ({"signed": True}, "signed", "only False"),
    ({"embed_skip": True}, "embed_skip", "only False"),
    ({"gram_lookup": True}, "gram_lookup", "only False"),
    ({"jumprelu": True}, "jumprelu", "unknown"),
    ({"k": N + 1}, "k", "must be in"),
    ({"k": 0}, "k", "must be in"),
    ({"k": True}, "k", "int"),
    ({"num_latents": 2.5}, "num_latents", "int"),
    ({"d_in": "12"}, "d_in", "int"),
    ({"transcode": 1}, "transcode", "true or false"),
    ({"expansion_factor": 0}, "num_latents", "no latents"),
    ({"d_sae": N + 1}, "d_sae", "latents"),
])
def test_bad_cfg_fields(tmp_path, change, field, match):
    _expect(tmp_path, good_cfg(**change), good_tensors(), match, key=f"field {field!r}")


def test_missing_d_in(tmp_path):
    cfg = good_cfg()
    del cfg["d_in"]
    _expect(tmp_path, cfg, good_tensors(), "missing", key="field 'd_in'")


def test_wrong_width_from_cfg(tmp_path):
    _expect(tmp_path, good_cfg(num_latents=N - 1), good_tensors(), "shape", key="'encoder.weight'")


def test_missing_cfg(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sparsify(tmp_path)
