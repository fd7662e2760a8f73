"""The released eai-sparsify 1.3.3, run in its own environment (tests/peer_envs.py), both ways:
coders sparsify makes and saves load here with its outputs, and files saved here load there with
ours. One run of sparsify serves every test (each start imports torch and sparsify)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tckernels.nn.activations import decode as sparse_decode
from tckernels.nn.formats.sparsify import load_sparsify, load_sparsify_dir, save_sparsify, save_sparsify_dir
from tckernels.nn.transcoder import Transcoder
from tests.nn.formats import TOL

D, N, ROWS = 24, 96, 64

#: coders sparsify makes: name -> (SparseCoderConfig fields, dtype)
MADE = {
    "sae_k4": ({"num_latents": N, "k": 4}, "float32"),
    "sae_skip_k8": ({"num_latents": N, "k": 8, "skip_connection": True}, "float32"),
    "tc_k4": ({"expansion_factor": N // D, "k": 4, "transcode": True}, "float32"),
    "tc_k16": ({"num_latents": N, "k": 16, "transcode": True, "normalize_decoder": False}, "float32"),
    "tc_skip_k6": ({"num_latents": N, "k": 6, "transcode": True, "skip_connection": True}, "float32"),
    "sae_multi_k3": ({"num_latents": N, "k": 3, "multi_topk": True}, "float32"),
    "sae_f64_k5": ({"num_latents": N, "k": 5}, "float64"),
}
#: a run folder with several hook points, made by sparsify
RUN = {"layers.0.mlp": {"num_latents": N, "k": 4, "transcode": True},
       "layers.1.mlp": {"num_latents": N, "k": 5, "transcode": True, "skip_connection": True},
       "layers.2": {"num_latents": N, "k": 6}}


def ours():
    """Transcoders saved here for sparsify to load: name -> Transcoder."""
    out = {}
    for i, (name, kw) in enumerate({
        "ours_sae": dict(k=4, pre_bias=True),
        "ours_tc": dict(k=7),
        "ours_tc_skip": dict(k=5, skip=True, normalize_decoder=True),
        "ours_sae_skip": dict(k=12, skip=True, pre_bias=True),
        "ours_no_dec_bias": dict(k=3, dec_bias=False),
    }.items()):
        tc = Transcoder(D, N, D, "topk", **kw)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in tc.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            tc.W_enc /= D ** 0.5
            if tc.W_skip is not None:
                tc.W_skip /= D ** 0.5
            if tc.b_pre is not None:
                tc.b_pre.copy_(tc.b_dec)
        out[name] = tc
    return out


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    from tests.peer_envs import run_script

    tmp = tmp_path_factory.mktemp("sparsify")
    x = torch.randn(ROWS, D, generator=torch.Generator().manual_seed(7))
    save_file({"x": x, "x64": x.double()}, str(tmp / "x.safetensors"))
    mine = ours()
    for name, tc in mine.items():
        save_sparsify(tc, tmp / name)
    save_sparsify_dir({"layers.3": mine["ours_tc"], "layers.4": mine["ours_sae_skip"]}, tmp / "our_run")
    jobs = {
        "inputs": str(tmp / "x.safetensors"), "out": str(tmp / "out.safetensors"),
        "make": [{"name": n, "dir": str(tmp / n), "d_in": D, "cfg": cfg, "seed": i, "dtype": dt,
                  "input": "x64" if dt == "float64" else "x"} for i, (n, (cfg, dt)) in enumerate(MADE.items())]
        + [{"name": f"run/{h}", "dir": str(tmp / "run" / h), "d_in": D, "cfg": cfg, "seed": 50 + i}
           for i, (h, cfg) in enumerate(RUN.items())],
        "load": [{"name": n, "dir": str(tmp / n)} for n in mine],
        "load_many": [{"name": "our_run", "dir": str(tmp / "our_run")}],
    }
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    info = run_script("sparsify", "sparsify_forward.py", str(tmp / "jobs.json"))
    return dict(dir=tmp, x=x, out=load_file(str(tmp / "out.safetensors")), info=info, mine=mine)


def _dense(values, indices):
    return torch.zeros(*values.shape[:-1], N, dtype=values.dtype).scatter_add_(-1, indices, values)


def _clear_rows(tc, x, k):
    """Rows whose k-th and (k+1)-th ReLU'd pre-activations differ by more than float32 rounding can
    move them (elsewhere either library may keep either latent): the index check covers those."""
    with torch.no_grad():
        h = tc._encoder_input(x).double() @ tc.W_enc.double().t() + tc.b_enc.double()
        top = F.relu(h).topk(k + 1, dim=-1).values
    return (top[:, k - 1] - top[:, k] > 1e-4) | (top[:, k - 1] == 0)


def _compare(tc, x, out, name, k=None, forward=True):
    k = k or tc.k
    with torch.no_grad():
        acts = tc.encode(x)
        # sparsify's decode() has no skip term; its forward() adds it
        y = tc(x) if forward else sparse_decode(acts, tc.W_dec, tc.b_dec)
    ok = _clear_rows(tc, x, k)
    assert ok.float().mean() > 0.9
    want_y = out[f"{name}.sae_out"] if forward else out[f"{name}.decoded"]
    torch.testing.assert_close(y[ok], want_y[ok], **TOL)
    pre = "latent" if forward else "enc"
    want = _dense(out[f"{name}.{pre}_acts"], out[f"{name}.{pre}_indices"])
    torch.testing.assert_close(_dense(*acts)[ok], want[ok], **TOL)
    # the same latents: sets of positive indices agree row by row
    for r in ok.nonzero().squeeze(1).tolist():
        mine = set(acts.indices[r][acts.values[r] > 0].tolist())
        theirs = set(out[f"{name}.{pre}_indices"][r][out[f"{name}.{pre}_acts"][r] > 0].tolist())
        assert mine == theirs, (name, r)


@pytest.mark.parametrize("name", [n for n in MADE if n != "sae_multi_k3"])
def test_sparsify_made_coder_loads_with_its_outputs(peer, name):
    cfg, dt = MADE[name]
    assert peer["info"]["sparsify"] == "1.3.3"
    seen = peer["info"]["coders"][name]
    tc = load_sparsify(peer["dir"] / name)
    assert tc.k == cfg["k"] == seen["k"] and tc.n_features == seen["num_latents"] == N
    assert (tc.W_skip is not None) == seen["skip"] and (tc.b_pre is None) == seen["transcode"]
    assert tc.W_enc.dtype == getattr(torch, dt)
    x = peer["x"].to(tc.W_enc.dtype)
    _compare(tc, x, peer["out"], name)
    _compare(tc, x, peer["out"], name, forward=False)
    # the parts the mapping carries matter, so the comparison checks them
    if tc.W_skip is not None:
        assert (peer["out"][f"{name}.sae_out"] - peer["out"][f"{name}.decoded"]).abs().max() > 1e-2
    if tc.b_pre is not None:
        with torch.no_grad():
            tc.b_pre.zero_()
            assert (tc(x) - peer["out"][f"{name}.sae_out"]).abs().max() > 1e-2


def test_sparsify_multi_topk_coder(peer):
    name = "sae_multi_k3"
    tc = load_sparsify(peer["dir"] / name)
    assert tc.k == 3
    _compare(tc, peer["x"], peer["out"], name, forward=False)  # encode/decode: the k model
    wide = load_sparsify(peer["dir"] / name, k=12)  # forward() reports the 4k reconstruction
    _compare(wide, peer["x"], peer["out"], name)


def test_sparsify_run_folder(peer):
    got = load_sparsify_dir(peer["dir"] / "run")
    assert sorted(got) == sorted(RUN)
    for hook, tc in got.items():
        assert tc.k == RUN[hook]["k"]
        _compare(tc, peer["x"], peer["out"], f"run/{hook}")


@pytest.mark.parametrize("name", list(ours()))
def test_our_file_runs_the_same_in_sparsify(peer, name):
    tc = peer["mine"][name]
    seen = peer["info"]["coders"][name]
    assert seen["k"] == tc.k and seen["num_latents"] == N and seen["transcode"] == (tc.b_pre is None)
    assert seen["skip"] == (tc.W_skip is not None) and seen["dtype"] == "float32"
    _compare(tc, peer["x"], peer["out"], name)


def test_our_run_folder_loads_with_load_many(peer):
    for hook, src in (("layers.3", "ours_tc"), ("layers.4", "ours_sae_skip")):
        _compare(peer["mine"][src], peer["x"], peer["out"], f"our_run/{hook}")
