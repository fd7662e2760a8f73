"""Make, save, load and run SAEs and transcoders with sae-lens itself (no tckernels code).

    python saelens_forward.py make SPEC.json     # build from a config with random weights, save_model, run
    python saelens_forward.py run SPEC.json      # SAE.load_from_disk folders written elsewhere, run

SPEC.json: {"inputs": FILE.safetensors (key "x" [M, d_in]), "cases": [{"name", "dir", ...}]}; for
``make`` a case also has "architecture", "d_in", "d_sae", optional "d_out", "k", "cfg" (extra config
fields), "training" (build the TrainingSAE class and save with "save_model" or
"save_inference_model"), "topk_threshold" (BatchTopK), "forward" ("loaded": run the folder
as SAE.load_from_disk reads it, not the module built) and "seed".
For every case it writes DIR/peer_out.safetensors with "acts" (``encode(x)``, dense [M, d_sae])
and "out" (``forward(x)``) and prints, as its last line, a JSON object {name: {class,
architecture, keys}}.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

import sae_lens
from sae_lens import SAE
from sae_lens.registry import get_sae_class, get_sae_training_class


def randomise(sae, case):
    g = torch.Generator().manual_seed(int(case.get("seed", 0)))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name == "threshold":
                # mostly positive, some at or below 0 (where the gate is plain ReLU)
                r = r.abs() * 0.3
                r[::7] = 0.0
                if not case.get("training"):  # training keeps thresholds >= 0
                    r[3::11] = -0.2
            elif name in ("W_enc", "W_dec", "W_skip"):
                r = r / p.shape[0] ** 0.5
                if name == "W_dec":  # rows of unequal norm, so rescaling by them matters
                    r = r * torch.rand(p.shape[0], 1, generator=g) * 2
            else:
                r = r * 0.2
            p.copy_(r.to(p.dtype))
        if case.get("topk_threshold") is not None:
            sae.topk_threshold.fill_(float(case["topk_threshold"]))


def make(case):
    arch = case["architecture"]
    fields = dict(d_in=case["d_in"], d_sae=case["d_sae"], **case.get("cfg", {}))
    if "d_out" in case:
        fields["d_out"] = case["d_out"]
    if "k" in case:
        fields["k"] = case["k"]
    training = case.get("training")
    cls, cfg_cls = (get_sae_training_class if training else get_sae_class)(arch)
    sae = cls(cfg_cls(**fields))
    randomise(sae, case)
    if training == "save_inference_model":
        sae.save_inference_model(case["dir"])
    else:
        sae.save_model(case["dir"])
    return sae


def run(sae, case, x):
    sae.eval()
    with torch.no_grad():
        acts = sae.encode(x)
        out = sae(x)
    save_file({"acts": acts.contiguous(), "out": out.contiguous()}, os.path.join(case["dir"], "peer_out.safetensors"))


def main():
    mode, spec_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    x = load_file(spec["inputs"])["x"]
    report = {}
    for case in spec["cases"]:
        if mode == "make":
            sae = make(case)  # its own forward, before any save or load
            if case.get("forward") == "loaded":  # BatchTopK trains batch-wise; its inference form is saved
                sae = SAE.load_from_disk(case["dir"])
        else:
            sae = SAE.load_from_disk(case["dir"])
        run(sae, case, x.to(sae.dtype))
        report[case["name"]] = {
            "class": type(sae).__name__,
            "architecture": sae.cfg.architecture(),
            "keys": sorted(load_file(os.path.join(case["dir"], "sae_weights.safetensors"))),
            "dtype": str(sae.dtype),
        }
    report["_version"] = sae_lens.__version__
    print(json.dumps(report))


if __name__ == "__main__":
    main()
