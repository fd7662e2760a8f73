"""Write transcoder directories with circuit-tracer's own classes and save path, and its outputs.

    python circuit_tracer_write.py WORK_DIR

For each case (per-layer ReLU, JumpReLU, JumpReLU with skip; cross-layer ReLU and JumpReLU) builds
circuit-tracer's ``TranscoderSet`` of ``SingleLayerTranscoder`` or its ``CrossLayerTranscoder`` with
random parameters (positive JumpReLU thresholds), saves it with its ``to_safetensors`` into
``WORK_DIR/<case>`` plus the ``config.yaml`` its cache writes (``yaml.dump`` of ``model_kind``, the
hooks and ``scan``), and stores ``<case>.x`` (inputs ``[n_layers, n_pos, d_model]``), ``<case>.y``
(its forward) and ``<case>.acts`` (its encode) in ``WORK_DIR/io.safetensors``. Prints the cases.
Uses no tckernels code.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from circuit_tracer.transcoder import TranscoderSet
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder

work = sys.argv[1]
L, d, n, pos = 3, 12, 40, 6
g = torch.Generator().manual_seed(0)
cpu = torch.device("cpu")


def fill(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("threshold"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / 3)
    return module


def per_layer(activation, skip):
    tcs = {}
    for i in range(L):
        act = JumpReLU(torch.zeros(n), 0.1) if activation == "jump_relu" else F.relu
        tcs[i] = fill(SingleLayerTranscoder(d, n, act, i, skip_connection=skip, device=cpu, dtype=torch.float32))
    return TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="written-here")


def cross_layer(activation):
    return fill(CrossLayerTranscoder(L, n, d, activation_function=activation, lazy_decoder=False, device=cpu,
                                     dtype=torch.float32, feature_input_hook="mlp.hook_in",
                                     feature_output_hook="mlp.hook_out", scan="written-here"))


cases = {
    "set_relu": lambda: per_layer("relu", False),
    "set_jump_relu": lambda: per_layer("jump_relu", False),
    "set_jump_relu_skip": lambda: per_layer("jump_relu", True),
    "clt_relu": lambda: cross_layer("relu"),
    "clt_jump_relu": lambda: cross_layer("jump_relu"),
}
io = {}
for name, make in cases.items():
    transcoders = make()
    out_dir = os.path.join(work, name)
    transcoders.to_safetensors(out_dir)
    kind = "cross_layer_transcoder" if isinstance(transcoders, CrossLayerTranscoder) else "transcoder_set"
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        yaml.dump({"model_kind": kind, "feature_input_hook": transcoders.feature_input_hook,
                   "feature_output_hook": transcoders.feature_output_hook, "scan": transcoders.scan}, f)
    x = torch.randn(L, pos, d, generator=g)
    with torch.no_grad():
        if kind == "cross_layer_transcoder":
            y, acts = transcoders(x), transcoders.encode(x)
        else:
            y = torch.stack([tc(x[i]) for i, tc in enumerate(transcoders.transcoders)])
            acts = transcoders.encode(x)
    io.update({f"{name}.x": x, f"{name}.y": y.contiguous(), f"{name}.acts": acts.contiguous()})
save_file(io, os.path.join(work, "io.safetensors"))
print(json.dumps({"cases": list(cases)}))
