"""SAELens' folder format without sae_lens installed: round trips, the forward as SAELens' sources
define it (written out here in plain torch), refusals and bad files."""
import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tckernels.nn.formats import FormatError, MissingKeyError
from tckernels.nn.formats.saelens import SAELENS_VERSION, load_saelens, read_saelens_sparsity, save_saelens
from tckernels.nn.transcoder import Transcoder
from tests.nn.formats import TOL, truncate

D, N = 8, 48


def dense(acts, n):
    """Sparse activations -> dense ``[..., n]`` (padded slots hold 0)."""
    v, i = acts
    return torch.zeros(*v.shape[:-1], n, dtype=v.dtype).scatter_add(-1, i, v)


def random_transcoder(activation, d_in=D, n=N, d_out=None, *, skip=False, b_pre="tied", k=5, seed=0, dtype=torch.float32):
    """A Transcoder with every parameter random. ``b_pre``: "tied" (equal to b_dec), "free" or None."""
    torch.manual_seed(seed)
    tc = Transcoder(d_in, n, d_out, activation, k=k if activation in ("topk", "batchtopk") else None, skip=skip,
                    pre_bias=b_pre is not None, dtype=dtype)
    with torch.no_grad():
        for name, p in tc.named_parameters():
            if name == "log_threshold":
                p.copy_(torch.randn(n) * 0.7 - 1.5)
                p[::9] = -math.inf  # θ = 0: plain ReLU
            elif name.startswith("W"):
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape) * 0.3)
        if b_pre == "tied":
            tc.b_pre.copy_(tc.b_dec)
    return tc.eval()


def saelens_forward(folder, x):
    """SAELens 6.54.12's encode and forward, from the folder as its loader reads it (see the
    saelens module docstring for the lines of its sources this follows)."""
    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    sd = load_file(os.path.join(folder, "sae_weights.safetensors"))
    dt = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    sd = {k: v.to(dt) for k, v in sd.items()}
    arch = cfg["architecture"]
    x = x.to(dt)
    sae_in = x - sd["b_dec"] * cfg["apply_b_dec_to_input"] if "transcoder" not in arch else x
    h = sae_in @ sd["W_enc"] + sd["b_enc"]
    W_dec = sd["W_dec"]
    if arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            h = h * W_dec.norm(dim=-1)
        v, i = torch.topk(h, cfg["k"], dim=-1)
        acts = torch.zeros_like(h).scatter(-1, i, v.relu())
        a = acts / W_dec.norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else acts
        out = a @ W_dec + sd["b_dec"]
    else:
        acts = h.relu()
        if "jumprelu" in arch:
            acts = acts * (h > sd["threshold"])
        out = acts @ W_dec + sd["b_dec"]
    if "skip" in arch:
        out = out + x @ sd["W_skip"].T
    return acts, out


CASES = [  # (activation, d_out, skip, b_pre)
    ("relu", None, False, "tied"),
    ("relu", None, False, None),
    ("topk", None, False, "tied"),
    ("jumprelu", None, False, "tied"),
    ("jumprelu", None, False, None),
    ("relu", 12, False, None),
    ("relu", 12, True, None),
    ("jumprelu", 12, False, None),
    ("jumprelu", 12, True, None),
    ("relu", None, True, None),  # d_out == d_in with a skip: a skip transcoder
]
ARCH = {("relu", False): "standard", ("topk", False): "topk", ("jumprelu", False): "jumprelu",
        ("relu", True): "transcoder", ("jumprelu", True): "jumprelu_transcoder"}


@pytest.mark.parametrize("activation,d_out,skip,b_pre", CASES)
def test_round_trip_is_bit_exact_and_matches_saelens_math(tmp_path, activation, d_out, skip, b_pre):
    tc = random_transcoder(activation, d_out=d_out, skip=skip, b_pre=b_pre)
    save_saelens(tc, tmp_path, hook_name="blocks.3.ln2.hook_normalized", hook_name_out="blocks.3.hook_mlp_out"
                 if d_out or skip else None, model_name="gpt2")
    cfg = json.load(open(tmp_path / "cfg.json"))
    is_tc = bool(d_out or skip)
    arch = ARCH[(activation, is_tc)]
    if skip:
        arch = arch.replace("transcoder", "skip_transcoder")
    assert cfg["architecture"] == arch
    assert cfg["apply_b_dec_to_input"] is (b_pre == "tied")
    assert cfg["metadata"]["hook_name"] == "blocks.3.ln2.hook_normalized"
    assert cfg["metadata"]["sae_lens_version"] == SAELENS_VERSION
    assert (cfg.get("d_out") is not None) == is_tc

    back = load_saelens(tmp_path)
    for name, p in tc.named_parameters():
        q = getattr(back, name)
        if name == "log_threshold":  # θ is what the forward uses; see the module docstring
            assert torch.equal(p.exp(), q.exp()), name
        else:
            assert q is not None and q.dtype == p.dtype and torch.equal(p, q), name
    assert back.activation == tc.activation and back.k == tc.k and back.d_out == tc.d_out
    assert back.saelens_metadata["model_name"] == "gpt2"

    x = torch.randn(64, D)
    with torch.no_grad():
        y, y2 = tc(x), back(x)
        assert torch.equal(y, y2)
        acts_ref, out_ref = saelens_forward(tmp_path, x)
        acts = dense(back.encode(x), N)
    torch.testing.assert_close(y2, out_ref, **TOL)
    torch.testing.assert_close(acts, acts_ref, **TOL)
    assert torch.equal(acts > 0, acts_ref > 0)
    assert "sae_lens" not in sys.modules


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_round_trip_other_dtypes(tmp_path, dtype):
    tc = random_transcoder("jumprelu", dtype=dtype)
    save_saelens(tc, tmp_path, hook_name="blocks.0.hook_resid_pre")
    assert json.load(open(tmp_path / "cfg.json"))["dtype"] == str(dtype).split(".")[1]
    back = load_saelens(tmp_path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "b_pre"):
        assert torch.equal(getattr(tc, name), getattr(back, name)), name
    assert torch.equal(tc.log_threshold.exp(), back.log_threshold.exp())
    assert load_saelens(tmp_path, dtype=torch.float32).W_enc.dtype == torch.float32


def test_untied_pre_bias_is_folded_into_b_enc(tmp_path):
    tc = random_transcoder("relu", b_pre="free")
    save_saelens(tc, tmp_path, hook_name="h")
    assert json.load(open(tmp_path / "cfg.json"))["apply_b_dec_to_input"] is False
    back = load_saelens(tmp_path)
    assert back.b_pre is None
    x = torch.randn(32, D)
    with torch.no_grad():
        torch.testing.assert_close(back(x), tc(x), **TOL)
        torch.testing.assert_close(saelens_forward(tmp_path, x)[1], tc(x), **TOL)


def test_batchtopk_exports_its_inference_rule(tmp_path):
    tc = random_transcoder("batchtopk", b_pre=None)
    x = torch.randn(32, D)
    save_saelens(tc, tmp_path / "unset", hook_name="h")  # no threshold learned: eval is TopK(k)
    assert json.load(open(tmp_path / "unset" / "cfg.json"))["architecture"] == "topk"
    tc.threshold.fill_(0.25)
    save_saelens(tc, tmp_path / "set", hook_name="h")
    cfg = json.load(open(tmp_path / "set" / "cfg.json"))
    assert cfg["architecture"] == "jumprelu"
    assert torch.equal(load_file(tmp_path / "set" / "sae_weights.safetensors")["threshold"], torch.full((N,), 0.25))
    with torch.no_grad():
        torch.testing.assert_close(saelens_forward(tmp_path / "set", x)[1], tc(x), **TOL)
        torch.testing.assert_close(load_saelens(tmp_path / "set")(x), tc(x), **TOL)


# ------------------------------------------------------------------------------------------------
# files in SAELens' layout, written here as SAELens' save_model would
# ------------------------------------------------------------------------------------------------


def write_folder(folder, architecture="standard", *, d_in=D, d_sae=N, d_out=None, cfg=None, seed=0, drop=(), extra=None,
                 thresholds=True):
    g = torch.Generator().manual_seed(seed)
    d_o = d_out or d_in
    sd = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5, "b_enc": torch.randn(d_sae, generator=g) * 0.2,
          "W_dec": torch.randn(d_sae, d_o, generator=g) * torch.rand(d_sae, 1, generator=g) * 2 / d_sae ** 0.5,
          "b_dec": torch.randn(d_o, generator=g) * 0.2}
    if "jumprelu" in architecture and thresholds:
        t = torch.rand(d_sae, generator=g) * 0.4
        t[::7] = 0.0
        t[3::11] = -0.3
        sd["threshold"] = t
    if "skip" in architecture:
        sd["W_skip"] = torch.randn(d_o, d_in, generator=g) / d_in ** 0.5
    for k in drop:
        sd.pop(k)
    sd.update(extra or {})
    c = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
         "apply_b_dec_to_input": "transcoder" not in architecture, "normalize_activations": "none",
         "reshape_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post", "sae_lens_version": "6.54.12"},
         "architecture": architecture}
    if architecture == "topk":
        c["k"] = 6
        c["rescale_acts_by_decoder_norm"] = False
    if "transcoder" in architecture:
        c["d_out"] = d_o
    c.update(cfg or {})
    c = {k: v for k, v in c.items() if v is not _DROP}
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(c, f)
    return folder


_DROP = object()

FILE_CASES = [
    ("standard", None, {}),
    ("standard", None, {"apply_b_dec_to_input": False}),
    ("topk", None, {}),
    ("topk", None, {"rescale_acts_by_decoder_norm": True}),
    # written by TrainingSAE.save_model: training-only fields, the training default for rescale
    ("topk", None, {"rescale_acts_by_decoder_norm": True, "decoder_init_norm": 0.1, "use_sparse_activations": False,
                    "aux_loss_coefficient": 1.0}),
    ("jumprelu", None, {"jumprelu_bandwidth": 0.05, "l0_coefficient": 1.0, "jumprelu_init_threshold": 0.01}),
    ("transcoder", 12, {}),
    ("skip_transcoder", 12, {}),
    ("jumprelu_transcoder", 12, {}),
    ("jumprelu_skip_transcoder", 12, {}),
]


@pytest.mark.parametrize("architecture,d_out,cfg", FILE_CASES)
def test_load_matches_saelens_math(tmp_path, architecture, d_out, cfg):
    write_folder(tmp_path, architecture, d_out=d_out, cfg=cfg)
    tc = load_saelens(tmp_path)
    assert tc.d_out == (d_out or D) and (tc.W_skip is not None) == ("skip" in architecture)
    assert (tc.b_pre is not None) == json.load(open(tmp_path / "cfg.json"))["apply_b_dec_to_input"]
    assert not tc.training
    x = torch.randn(80, D)
    acts_ref, out_ref = saelens_forward(tmp_path, x)
    with torch.no_grad():
        acts, out = dense(tc.encode(x), N), tc(x)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(acts, acts_ref, **TOL)
    assert torch.equal(acts > 0, acts_ref > 0)
    if "jumprelu" in architecture:
        thr = load_file(tmp_path / "sae_weights.safetensors")["threshold"]
        theta = tc.log_threshold.detach().exp()
        assert torch.equal(theta == 0, thr <= 0)
        torch.testing.assert_close(theta, thr.clamp_min(0), rtol=1e-6, atol=0)  # bit for bit where exp allows


def test_all_ones_scaling_factor_is_ignored(tmp_path):
    write_folder(tmp_path, extra={"scaling_factor": torch.ones(N)})
    load_saelens(tmp_path)
    write_folder(tmp_path, extra={"scaling_factor": torch.full((N,), 2.0)})
    with pytest.raises(FormatError, match="scaling_factor"):
        load_saelens(tmp_path)


def test_sparsity_file(tmp_path):
    tc = random_transcoder("relu")
    assert read_saelens_sparsity(tmp_path) is None
    s = torch.randn(N)
    save_saelens(tc, tmp_path, hook_name="h", sparsity=s)
    assert torch.equal(read_saelens_sparsity(tmp_path), s)
    with pytest.raises(ValueError, match="sparsity"):
        save_saelens(tc, tmp_path / "b", hook_name="h", sparsity=torch.zeros(3))


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("normalize_activations", "expected_average_only_in"),
    ("normalize_activations", "constant_norm_rescale"),
    ("normalize_activations", "layer_norm"),
    ("normalize_activations", "covariance_whitening"),
    ("reshape_activations", "hook_z"),
    ("architecture", "gated"),
    ("architecture", "batchtopk"),
    ("architecture", None),
    ("dtype", "int8"),
    ("d_sae", 0),
    ("d_in", "8"),
    ("apply_b_dec_to_input", "yes"),
    ("metadata", [1]),
    ("some_future_option", True),
])
def test_load_refuses_config(tmp_path, field, value):
    write_folder(tmp_path, cfg={field: value})
    with pytest.raises(FormatError, match=field) as e:
        load_saelens(tmp_path)
    assert "cfg.json" in str(e.value)


def test_load_refuses_more_configs(tmp_path):
    write_folder(tmp_path / "a", "transcoder", d_out=12, cfg={"apply_b_dec_to_input": True})
    with pytest.raises(FormatError, match="apply_b_dec_to_input"):
        load_saelens(tmp_path / "a")
    write_folder(tmp_path / "b", "topk", cfg={"k": N + 1})
    with pytest.raises(FormatError, match="'k'"):
        load_saelens(tmp_path / "b")
    write_folder(tmp_path / "c", cfg={"metadata": {"sae_lens_version": "5.9.1"}})  # SAELens rewrites pre-6 configs
    with pytest.raises(FormatError, match="sae_lens_version"):
        load_saelens(tmp_path / "c")
    write_folder(tmp_path / "d", cfg={"metadata": {}})
    with pytest.raises(FormatError, match="sae_lens_version"):
        load_saelens(tmp_path / "d")
    write_folder(tmp_path / "e", "topk", cfg={"rescale_acts_by_decoder_norm": True},
                 extra={"W_dec": torch.zeros(N, D)})
    with pytest.raises(FormatError, match="W_dec"):
        load_saelens(tmp_path / "e")
    write_folder(tmp_path / "f", "jumprelu", extra={"threshold": torch.full((N,), math.nan)})
    with pytest.raises(FormatError, match="threshold"):
        load_saelens(tmp_path / "f")
    write_folder(tmp_path / "g", "transcoder", d_out=12, cfg={"d_out": _DROP})  # SAELens' default d_out is 768
    with pytest.raises(FormatError, match="W_dec"):
        load_saelens(tmp_path / "g")


@pytest.mark.parametrize("architecture,key", [("standard", "W_enc"), ("standard", "b_dec"), ("jumprelu", "threshold"),
                                               ("skip_transcoder", "W_skip")])
def test_missing_key(tmp_path, architecture, key):
    write_folder(tmp_path, architecture, d_out=12 if "transcoder" in architecture else None, drop=[key])
    with pytest.raises(MissingKeyError, match=key) as e:
        load_saelens(tmp_path)
    assert "sae_weights.safetensors" in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("W_enc", torch.zeros(N, D)),  # tckernels' layout, not SAELens'
    ("W_dec", torch.zeros(D, N)),
    ("b_enc", torch.zeros(N + 1)),
    ("b_dec", torch.zeros(D, 1)),
    ("W_enc", torch.zeros(D, N, dtype=torch.int32)),
    ("log_threshold", torch.zeros(N)),  # an extra key: SAELens' strict load rejects it
])
def test_bad_tensor(tmp_path, key, value):
    write_folder(tmp_path, extra={key: value})
    with pytest.raises(FormatError, match=key) as e:
        load_saelens(tmp_path)
    assert "sae_weights.safetensors" in str(e.value)


def test_bad_files(tmp_path):
    write_folder(tmp_path / "t")
    truncate(tmp_path / "t" / "sae_weights.safetensors")
    with pytest.raises(FormatError, match="sae_weights.safetensors"):
        load_saelens(tmp_path / "t")
    write_folder(tmp_path / "j")
    truncate(tmp_path / "j" / "cfg.json")
    with pytest.raises(FormatError, match="cfg.json"):
        load_saelens(tmp_path / "j")
    write_folder(tmp_path / "w")
    os.remove(tmp_path / "w" / "sae_weights.safetensors")
    with pytest.raises(FileNotFoundError):
        load_saelens(tmp_path / "w")
    with pytest.raises(FileNotFoundError):
        load_saelens(tmp_path / "nothing")


def test_save_refusals(tmp_path):
    with pytest.raises(ValueError, match="activation"):
        save_saelens(random_transcoder("topk", d_out=12, b_pre=None), tmp_path / "a", hook_name="h")
    with pytest.raises(ValueError, match="kind"):
        save_saelens(random_transcoder("relu", d_out=12, b_pre=None), tmp_path / "b", hook_name="h", kind="sae")
    with pytest.raises(ValueError, match="kind"):
        save_saelens(random_transcoder("relu", skip=True, b_pre=None), tmp_path / "b", hook_name="h", kind="sae")
    with pytest.raises(ValueError, match="hook_name"):
        save_saelens(random_transcoder("relu"), tmp_path / "c")
    with pytest.raises(ValueError, match="dtype"):
        save_saelens(random_transcoder("relu"), tmp_path / "d", hook_name="h", dtype=torch.int8)
    with pytest.raises(ValueError, match="metadata"):
        save_saelens(random_transcoder("relu"), tmp_path / "e", hook_name="h", metadata={"when": object()})
    for name in "abcde":
        assert not os.path.exists(tmp_path / name)


def test_sae_with_d_in_equal_d_out_can_be_saved_as_transcoder(tmp_path):
    tc = random_transcoder("jumprelu", b_pre="tied")
    save_saelens(tc, tmp_path, hook_name="a", hook_name_out="b")
    cfg = json.load(open(tmp_path / "cfg.json"))
    assert cfg["architecture"] == "jumprelu_transcoder" and cfg["apply_b_dec_to_input"] is False
    x = torch.randn(16, D)
    with torch.no_grad():
        torch.testing.assert_close(load_saelens(tmp_path)(x), tc(x), **TOL)
