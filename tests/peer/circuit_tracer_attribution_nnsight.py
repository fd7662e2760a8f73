"""Run circuit-tracer's attribution, nnsight backend, with transcoders from a directory, on a tiny
random local Llama.

    python circuit_tracer_attribution_nnsight.py TRANSCODER_DIR WORK_DIR

Loads TRANSCODER_DIR (an absolute path) the way ``ReplacementModel.from_pretrained`` does
(``load_transcoder_from_hub``), saves a 2-layer ``LlamaForCausalLM`` with random weights and a
word-level tokenizer in WORK_DIR/model (nothing is downloaded), builds circuit-tracer's
``ReplacementModel`` on it with ``backend="nnsight"`` and calls ``circuit_tracer.attribute`` on a
short prompt. Saves the graph's active features with what each MLP read (taken by a forward
pre-hook on a plain transformers copy of the model, not through nnsight) and prints the graph's
sizes and whether its values are finite. Uses no tckernels code.
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # a download attempt must fail, not fetch
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from circuit_tracer import ReplacementModel, attribute  # noqa: E402
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub  # noqa: E402

transcoder_dir, work_dir = sys.argv[1:3]
model_dir = os.path.join(work_dir, "model")
torch.manual_seed(0)

transcoders, _ = load_transcoder_from_hub(transcoder_dir, device=torch.device("cpu"), dtype=torch.float32)
first = transcoders.transcoders[0] if hasattr(transcoders, "transcoders") else transcoders
d_model = first.d_model

vocab = {**{f"w{i}": i for i in range(47)}, "<eos>": 47}  # not id 0: circuit-tracer skips a falsy BOS id
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<eos>", eos_token="<eos>", pad_token="<eos>").save_pretrained(
    model_dir)
cfg = LlamaConfig(
    vocab_size=len(vocab), hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=transcoders.n_layers,
    num_attention_heads=d_model // 4, num_key_value_heads=d_model // 8, head_dim=4, max_position_embeddings=32,
    bos_token_id=47, eos_token_id=47, pad_token_id=47, tie_word_embeddings=False, torch_dtype="float32",
)
hf = LlamaForCausalLM(cfg).eval()
with torch.no_grad():  # a trained model's norms are not all ones: the hooks must see the real MLP input
    for layer in hf.model.layers:
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
hf.save_pretrained(model_dir)

model = ReplacementModel.from_pretrained_and_transcoders(
    model_dir, transcoders, backend="nnsight", device=torch.device("cpu"), dtype=torch.float32)

prompt = "w3 w7 w1 w12 w5 w9"
graph = attribute(prompt, model, max_n_logits=3, batch_size=64, verbose=False)

# what each MLP read and the residual stream its norm read, from a plain transformers copy
tokens = model.ensure_tokenized(prompt)
plain = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
seen = {}
hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(("in", i), args[0][0]))
         for i, layer in enumerate(plain.model.layers)]
hooks += [layer.post_attention_layernorm.register_forward_pre_hook(
    lambda m, args, i=i: seen.__setitem__(("mid", i), args[0][0])) for i, layer in enumerate(plain.model.layers)]
with torch.no_grad():
    plain(tokens.unsqueeze(0))
for h in hooks:
    h.remove()
n_layers = cfg.num_hidden_layers
mlp_in = torch.stack([seen[("in", i)] for i in range(n_layers)])
resid_mid = torch.stack([seen[("mid", i)] for i in range(n_layers)])
unweighted = resid_mid * torch.rsqrt(resid_mid.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
save_file({"mlp_in": mlp_in.contiguous(), "active_features": graph.active_features.contiguous(),
           "activation_values": graph.activation_values.contiguous()}, os.path.join(work_dir, "graph.safetensors"))

adj = graph.adjacency_matrix
print(json.dumps({
    "circuit_tracer": __import__("importlib.metadata").metadata.version("circuit-tracer"),
    "nnsight": __import__("importlib.metadata").metadata.version("nnsight"),
    "backend": model.backend,
    "architecture": model.cfg.original_architecture,
    "feature_input_hook": transcoders.feature_input_hook,
    "feature_output_hook": transcoders.feature_output_hook,
    "scan": model.scan,
    "n_tokens": int(len(graph.input_tokens)),
    "active_features": int(graph.active_features.shape[0]),
    "selected_features": int(graph.selected_features.shape[0]),
    "logit_targets": int(len(graph.logit_targets)),
    "adjacency_shape": list(adj.shape),
    "adjacency_finite": bool(torch.isfinite(adj).all()),
    "activation_values_finite": bool(torch.isfinite(graph.activation_values).all()),
    "activation_values_positive": bool((graph.activation_values > 0).all()),
    "mlp_in_minus_unweighted_norm": float((mlp_in - unweighted).abs().max()),
    "nonzero_edges": int((adj != 0).sum()),
    "feature_to_feature_edges": int((adj[: graph.selected_features.shape[0], : graph.active_features.shape[0]] != 0).sum()),
}))
