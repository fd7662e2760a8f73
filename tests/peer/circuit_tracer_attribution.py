"""Run circuit-tracer's attribution with transcoders from a directory, on a tiny random model.

    python circuit_tracer_attribution.py TRANSCODER_DIR WORK_DIR

Loads TRANSCODER_DIR (an absolute path) the way ``ReplacementModel.from_pretrained`` does
(``load_transcoder_from_hub``), builds a 2-layer TransformerLens model from a config (random
weights; nothing is downloaded: a word-level tokenizer is made in WORK_DIR) and calls
``circuit_tracer.attribute`` on a short prompt. Prints the graph's sizes and whether its values
are finite. Uses no tckernels code.
"""
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # a download attempt must fail, not fetch
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from circuit_tracer import attribute  # noqa: E402
from circuit_tracer.replacement_model.replacement_model_transformerlens import (  # noqa: E402
    TransformerLensReplacementModel,
)
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub  # noqa: E402

transcoder_dir, work_dir = sys.argv[1:3]
torch.manual_seed(0)

vocab = {**{f"w{i}": i for i in range(47)}, "<eos>": 47}  # not id 0: circuit-tracer skips a falsy BOS id
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
fast.save_pretrained(os.path.join(work_dir, "tokenizer"))
tokenizer = AutoTokenizer.from_pretrained(os.path.join(work_dir, "tokenizer"))  # a local name_or_path

transcoders, config = load_transcoder_from_hub(transcoder_dir, device=torch.device("cpu"), dtype=torch.float32)
d_model = transcoders.d_model if hasattr(transcoders, "d_model") else transcoders.transcoders[0].d_model
cfg = HookedTransformerConfig(
    n_layers=transcoders.n_layers, d_model=d_model, n_ctx=32, d_head=4, n_heads=d_model // 4, d_mlp=4 * d_model,
    d_vocab=len(vocab), act_fn="gelu", normalization_type="LN", model_name="tiny-random", device="cpu", seed=0,
)
model = TransformerLensReplacementModel.from_config(cfg, transcoders, tokenizer=tokenizer)
with torch.no_grad():  # a trained model's norms are not all ones: the hooks must see the real MLP input
    for block in model.blocks:
        block.ln2.w.uniform_(0.5, 1.5)

prompt = "w3 w7 w1 w12 w5 w9"
graph = attribute(prompt, model, max_n_logits=3, batch_size=64, verbose=False)

# what each MLP read, for the caller to encode with its own transcoders and compare
tokens = model.ensure_tokenized(prompt)
names = ("mlp.hook_in", "ln2.hook_normalized")
_, cache = model.run_with_cache(tokens.unsqueeze(0), names_filter=lambda n: n.endswith(names))
mlp_in = torch.stack([cache[f"blocks.{i}.mlp.hook_in"][0] for i in range(cfg.n_layers)])
normalized = torch.stack([cache[f"blocks.{i}.ln2.hook_normalized"][0] for i in range(cfg.n_layers)])
save_file({"mlp_in": mlp_in.contiguous(), "active_features": graph.active_features.contiguous(),
           "activation_values": graph.activation_values.contiguous()}, os.path.join(work_dir, "graph.safetensors"))

adj = graph.adjacency_matrix
print(json.dumps({
    "circuit_tracer": __import__("importlib.metadata").metadata.version("circuit-tracer"),
    "feature_input_hook": model.feature_input_hook,
    "feature_output_hook": model.original_feature_output_hook,
    "scan": model.scan,
    "n_tokens": int(len(graph.input_tokens)),
    "active_features": int(graph.active_features.shape[0]),
    "selected_features": int(graph.selected_features.shape[0]),
    "logit_targets": int(len(graph.logit_targets)) if hasattr(graph, "logit_targets") else None,
    "adjacency_shape": list(adj.shape),
    "adjacency_finite": bool(torch.isfinite(adj).all()),
    "activation_values_finite": bool(torch.isfinite(graph.activation_values).all()),
    "activation_values_positive": bool((graph.activation_values > 0).all()),
    "mlp_in_minus_ln2_normalized": float((mlp_in - normalized).abs().max()),
    "nonzero_edges": int((adj != 0).sum()),
    "feature_to_feature_edges": int((adj[: graph.selected_features.shape[0], : graph.active_features.shape[0]] != 0).sum()),
}))
