"""sae-lens 6.54.12 itself (in its own environment, tests/peer_envs.py): modules it builds and saves
load here with its forward, and folders save_saelens writes load with its SAE.load_from_disk and
run the same. This environment never imports sae_lens."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tckernels.nn.formats.saelens import load_saelens, save_saelens
from tests.nn.formats import TOL
from tests.nn.formats.test_saelens import D, N, dense, random_transcoder
from tests.peer_envs import run_script

M = 96
D_OUT = 12

PEER_CASES = [  # name, architecture, extra spec
    ("standard", "standard", {}),
    ("standard_no_b_dec_in", "standard", {"cfg": {"apply_b_dec_to_input": False}}),
    ("topk", "topk", {"k": 6}),
    ("topk_rescale", "topk", {"k": 6, "cfg": {"rescale_acts_by_decoder_norm": True}}),
    ("jumprelu", "jumprelu", {}),
    ("transcoder", "transcoder", {"d_out": D_OUT, "cfg": {"apply_b_dec_to_input": False}}),
    ("skip_transcoder", "skip_transcoder", {"d_out": D_OUT, "cfg": {"apply_b_dec_to_input": False}}),
    ("jumprelu_transcoder", "jumprelu_transcoder", {"d_out": D_OUT, "cfg": {"apply_b_dec_to_input": False}}),
    ("jumprelu_skip_transcoder", "jumprelu_skip_transcoder",
     {"d_out": D_OUT, "cfg": {"apply_b_dec_to_input": False}}),
    # TrainingSAE classes: their own save_model (training fields, rescale on by default) and
    # save_inference_model (norms folded; BatchTopK saved as JumpReLU)
    ("training_topk", "topk", {"k": 6, "training": "save_model"}),
    ("training_topk_inference", "topk", {"k": 6, "training": "save_inference_model"}),
    ("training_standard", "standard", {"training": "save_model"}),
    ("training_jumprelu", "jumprelu", {"training": "save_model"}),
    ("training_batchtopk", "batchtopk", {"k": 6, "training": "save_inference_model", "topk_threshold": 0.15,
                                         "forward": "loaded"}),
]


def _inputs(tmp_path):
    x = torch.randn(M, D, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    return x


def _check(tc, x, folder, n=N):
    ref = load_file(str(folder / "peer_out.safetensors"))
    with torch.no_grad():
        acts, out = dense(tc.encode(x), n), tc(x)
    torch.testing.assert_close(out, ref["out"], **TOL)
    torch.testing.assert_close(acts, ref["acts"], **TOL)
    assert torch.equal(acts > 0, ref["acts"] > 0)  # the same features fire
    assert 0 < (acts > 0).float().mean() < 0.9  # some fire, some do not


def test_saelens_modules_load_with_its_forward(tmp_path):
    x = _inputs(tmp_path)
    cases = []
    for i, (name, arch, extra) in enumerate(PEER_CASES):
        cases.append({"name": name, "dir": str(tmp_path / name), "architecture": arch, "d_in": D, "d_sae": N,
                      "seed": i, **extra})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"inputs": str(tmp_path / "x.safetensors"), "cases": cases}))
    report = run_script("saelens", "saelens_forward.py", "make", str(spec))
    assert report["_version"] == "6.54.12"
    assert report["jumprelu_skip_transcoder"]["keys"] == ["W_dec", "W_enc", "W_skip", "b_dec", "b_enc", "threshold"]
    assert report["training_batchtopk"]["architecture"] == "jumprelu"
    for name in ("topk_rescale", "training_topk"):  # what the fold on loading is for
        assert json.loads((tmp_path / name / "cfg.json").read_text())["rescale_acts_by_decoder_norm"] is True
    assert "l1_coefficient" in json.loads((tmp_path / "training_standard" / "cfg.json").read_text())
    for name, arch, extra in PEER_CASES:
        tc = load_saelens(tmp_path / name)
        assert tc.d_out == extra.get("d_out", D), name
        _check(tc, x, tmp_path / name)
    assert "sae_lens" not in sys.modules


SAVE_CASES = [  # name, activation, d_out, skip, b_pre, kind
    ("relu_tied", "relu", None, False, "tied", None),
    ("relu_free_pre", "relu", None, False, "free", None),
    ("topk", "topk", None, False, "tied", None),
    ("jumprelu", "jumprelu", None, False, None, None),
    ("batchtopk", "batchtopk", None, False, None, None),
    ("transcoder", "relu", D_OUT, False, None, None),
    ("skip_transcoder", "relu", D_OUT, True, "free", None),
    ("jumprelu_transcoder", "jumprelu", D_OUT, False, None, None),
    ("jumprelu_skip_transcoder", "jumprelu", D_OUT, True, None, None),
    ("square_transcoder", "jumprelu", None, False, "tied", "transcoder"),
]


def test_save_saelens_loads_in_saelens_with_the_same_forward(tmp_path):
    x = _inputs(tmp_path)
    modules, cases = {}, []
    for i, (name, act, d_out, skip, b_pre, kind) in enumerate(SAVE_CASES):
        tc = random_transcoder(act, d_out=d_out, skip=skip, b_pre=b_pre, seed=10 + i)
        if act == "batchtopk":
            tc.threshold.fill_(0.2)
        save_saelens(tc, tmp_path / name, hook_name="blocks.2.hook_resid_mid", kind=kind,
                     hook_name_out="blocks.2.hook_mlp_out" if (d_out or skip or kind) else None)
        modules[name] = tc
        cases.append({"name": name, "dir": str(tmp_path / name)})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"inputs": str(tmp_path / "x.safetensors"), "cases": cases}))
    report = run_script("saelens", "saelens_forward.py", "run", str(spec))
    assert report["jumprelu_skip_transcoder"]["class"] == "JumpReLUSkipTranscoder"
    assert report["topk"]["class"] == "TopKSAE" and report["relu_tied"]["class"] == "StandardSAE"
    assert report["batchtopk"]["class"] == "JumpReLUSAE"
    for name, tc in modules.items():
        _check(tc, x, tmp_path / name)
