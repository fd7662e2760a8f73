"""Load transcoder directories with circuit-tracer's own loader and run its own forward.

    python circuit_tracer_forward.py MANIFEST.json

MANIFEST lists ``{"cases": [{"name", "dir"}], "inputs": INPUTS.safetensors, "outputs": OUT.safetensors}``.
Each ``dir`` (absolute) is loaded as ``ReplacementModel.from_pretrained(model, dir)`` loads it
(``load_transcoder_from_hub``: a local directory with ``config.yaml``), in float32 on the CPU,
once with circuit-tracer's default lazy loading and once with every tensor read eagerly (its strict
``load_state_dict`` then sees every key). For a case whose ``INPUTS[name]`` is ``x [n_layers, n_pos,
d_model]`` it writes ``name.y`` (its forward: each ``SingleLayerTranscoder(x[i])``, or the
``CrossLayerTranscoder(x)``), ``name.acts`` (its encode) to OUT and, in the printed JSON, what
it read (class, activation function, hooks, scan) or the error it raised. Uses no tckernels code.
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file

from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub


def activation_name(fn):
    return "jump_relu" if isinstance(fn, JumpReLU) else getattr(fn, "__name__", type(fn).__name__)


def run(transcoders, x):
    with torch.no_grad():
        if isinstance(transcoders, CrossLayerTranscoder):
            return transcoders(x), transcoders.encode(x)
        y = torch.stack([tc(x[i]) for i, tc in enumerate(transcoders.transcoders)])
        return y, transcoders.encode(x)


manifest = json.load(open(sys.argv[1]))
inputs = load_file(manifest["inputs"])
outputs, report = {}, {}
for case in manifest["cases"]:
    name = case["name"]
    try:
        runs = []
        for lazy in (True, False):
            kw = {} if lazy else dict(lazy_encoder=False, lazy_decoder=False)
            transcoders, config = load_transcoder_from_hub(case["dir"], device=torch.device("cpu"), dtype=torch.float32, **kw)
            if name in inputs:
                runs.append(run(transcoders, inputs[name]))
    except Exception as e:  # the caller checks that circuit-tracer refuses what tckernels refuses
        report[name] = {"error": f"{type(e).__name__}: {e}"}
        continue
    clt = isinstance(transcoders, CrossLayerTranscoder)
    info = {
        "class": type(transcoders).__name__,
        "n_layers": transcoders.n_layers,
        "d_transcoder": transcoders.d_transcoder,
        "feature_input_hook": transcoders.feature_input_hook,
        "feature_output_hook": transcoders.feature_output_hook,
        "scan": transcoders.scan,
        "skip_connection": bool(transcoders.skip_connection),
        "activation": (activation_name(transcoders.activation_function) if clt else
                       [activation_name(tc.activation_function) for tc in transcoders.transcoders]),
    }
    if runs:
        (y, acts), (y_eager, acts_eager) = runs
        info["lazy_equals_eager"] = bool(torch.equal(y, y_eager) and torch.equal(acts, acts_eager))
        outputs[f"{name}.y"] = y.contiguous()
        outputs[f"{name}.acts"] = acts.contiguous()
    report[name] = info
save_file(outputs, manifest["outputs"])
print(json.dumps(report))
