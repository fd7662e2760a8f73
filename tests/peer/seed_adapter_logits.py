"""Run a saved transcoder-adapter model the way the original code does on transformers 4.x.

    python seed_adapter_logits.py MODEL_DIR INPUTS.pt OUT.pt

Loads MODEL_DIR with this environment's ``transformers.Qwen2ForCausalLM`` (its own reading of the
config: RoPE, norms, heads) and adds to every layer's MLP the original's branch,
``mlp(x) + transcoder_dec(relu(transcoder_enc(x)))``, from the checkpoint's ``transcoder_*``
tensors in their saved layout (``transcoder_dec.weight`` is ``[d, F]``). Writes the logits of the
input ids to OUT.pt and prints what the config was read as. Uses no tckernels code.
"""
import glob
import json
import os
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

model_dir, inputs_path, out_path = sys.argv[1:4]
transformers.logging.set_verbosity_error()
config = transformers.Qwen2Config.from_pretrained(model_dir)
model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()

tensors = {}
for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
    tensors.update(load_file(f))


def branch(i):
    p = f"model.layers.{i}.mlp."
    W_enc, b_enc = tensors[p + "transcoder_enc.weight"], tensors[p + "transcoder_enc.bias"]
    W_dec, b_dec = tensors[p + "transcoder_dec.weight"], tensors.get(p + "transcoder_dec.bias")

    def hook(module, args, output):
        return output + F.linear(F.relu(F.linear(args[0], W_enc, b_enc)), W_dec, b_dec)

    return hook


n_branches = 0
for i, layer in enumerate(model.model.layers):
    if f"model.layers.{i}.mlp.transcoder_enc.weight" in tensors:
        layer.mlp.register_forward_hook(branch(i))
        n_branches += 1
inputs = torch.load(inputs_path)
with torch.no_grad():
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
torch.save(logits, out_path)
print(json.dumps({"transformers": transformers.__version__, "rope_theta": float(config.rope_theta),
                  "rope_scaling": config.rope_scaling, "branches": n_branches}))
