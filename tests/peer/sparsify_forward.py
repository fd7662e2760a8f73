"""Make, save, load and run sparsify sparse coders with sparsify's own code.

    python sparsify_forward.py JOBS.json

JOBS.json::

    {"inputs": "x.safetensors",            # tensors "x" (and any others the jobs name)
     "out": "out.safetensors",
     "make": [{"name": ..., "dir": ..., "d_in": D, "cfg": {SparseCoderConfig fields}, "seed": s,
               "dtype": "float32", "input": "x"}],
     "load": [{"name": ..., "dir": ..., "input": "x"}],
     "load_many": [{"name": ..., "dir": ..., "input": "x"}]}

``make`` builds a ``SparseCoder`` with random weights (every parameter drawn, so b_dec, the encoder
bias and the skip matter), saves it with ``save_to_disk`` and runs it; ``load`` runs
``SparseCoder.load_from_disk``; ``load_many`` runs every coder of ``SparseCoder.load_many(dir,
local=True)``. For each coder, OUT gets ``<name>.sae_out``, ``.latent_acts``, ``.latent_indices``
(from ``forward``) and ``.enc_acts``, ``.enc_indices``, ``.decoded`` (from ``encode``/``decode``);
the last stdout line is JSON with each coder's config as sparsify read it. Uses no tckernels code.
"""
import json
import os
import sys

# the parent environment has Triton, whose decoder kernel does not run on CPU tensors
os.environ["SPARSIFY_DISABLE_TRITON"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import sparsify  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

jobs = json.load(open(sys.argv[1]))
inputs = load_file(jobs["inputs"])
out, info = {}, {"sparsify": sparsify.__version__, "coders": {}}


def run(name, sae, x):
    x = x.to(sae.dtype)
    with torch.no_grad():
        fwd = sae(x)
        enc = sae.encode(x)
        dec = sae.decode(enc.top_acts, enc.top_indices)
    out[f"{name}.sae_out"] = fwd.sae_out
    out[f"{name}.latent_acts"] = fwd.latent_acts
    out[f"{name}.latent_indices"] = fwd.latent_indices
    out[f"{name}.enc_acts"] = enc.top_acts
    out[f"{name}.enc_indices"] = enc.top_indices
    out[f"{name}.decoded"] = dec
    info["coders"][name] = {**sae.cfg.to_dict(), "d_in": sae.d_in, "num_latents": sae.num_latents,
                            "dtype": str(sae.dtype).replace("torch.", ""), "skip": sae.W_skip is not None}


for job in jobs.get("make", []):
    torch.manual_seed(job["seed"])
    sae = SparseCoder(job["d_in"], SparseCoderConfig(**job["cfg"]), dtype=getattr(torch, job.get("dtype", "float32")))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.encoder.weight /= job["d_in"] ** 0.5
        if sae.W_skip is not None:
            sae.W_skip /= job["d_in"] ** 0.5
    sae.save_to_disk(job["dir"])
    run(job["name"], sae, inputs[job.get("input", "x")])

for job in jobs.get("load", []):
    run(job["name"], SparseCoder.load_from_disk(job["dir"]), inputs[job.get("input", "x")])

for job in jobs.get("load_many", []):
    for hook, sae in SparseCoder.load_many(job["dir"], local=True).items():
        run(f"{job['name']}/{hook}", sae, inputs[job.get("input", "x")])

save_file({k: v.contiguous() for k, v in out.items()}, jobs["out"])
print(json.dumps(info))
