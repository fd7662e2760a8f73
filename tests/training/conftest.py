"""Fixtures for the training-loop tests: a micro base/reference pair and data, made on the fly."""
import json
import os
import random

import pytest
import torch

from training.make_tiny_pair import base_answer, checked_answer, conversation
from training.tokenizer import CharTokenizer


def make_pair(root, seed=0, hidden=32, layers=2, vocab_extra=0, noise=0.05):
    """A random tiny Qwen2 pair (the reference = the base with every weight perturbed)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = CharTokenizer()
    cfg = Qwen2Config(vocab_size=len(tok) + vocab_extra, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    base = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init, so the models have distinct opinions
        for p in base.parameters():
            if p.dim() == 2:
                p.mul_(10)
    ref = Qwen2ForCausalLM(cfg)
    ref.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 else 1))
    paths = {}
    for name, m in (("base", base), ("reference", ref)):
        d = os.path.join(root, name)
        m.save_pretrained(d)
        tok.save_pretrained(d)
        paths[name] = d
    return paths


def write_data(path, n, seed=0, reference=True):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            ans = checked_answer(a, b) if reference else base_answer(a, b)
            f.write(json.dumps(conversation(a, b, ans)) + "\n")
    return path


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    paths = make_pair(str(root))
    paths["train"] = write_data(os.path.join(root, "train.jsonl"), 24, seed=1)
    paths["val"] = write_data(os.path.join(root, "val.jsonl"), 6, seed=2)
    paths["root"] = str(root)
    return paths


def micro_args(micro, out, **over):
    """Command-line arguments for a fast run on the micro pair."""
    args = {
        "base_model": micro["base"], "reference_model": micro["reference"], "train_data": micro["train"],
        "val_data": micro["val"], "output_dir": str(out), "n_features": 32, "micro_batch_size": 2,
        "max_steps": 4, "learning_rate": 1e-2, "warmup_ratio": 0.25, "save_every": 0, "eval_every": 0,
        "n_generations": 0, "progress_bar": False, "num_threads": 1, "val_batch_size": 8, "max_val_examples": 6,
        "dead_after_tokens": 100,
    }
    args.update(over)
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    return argv


def read_metrics(out, split="train"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if r.get("split") == split]


def build_objective(micro, n_features=16, seed=0, randomize=True, **kw):
    """(objective, tokenizer) on the micro pair, with the adapters' decoders made non-zero."""
    from tckernels.models import adapter_modules
    from transformers import AutoModelForCausalLM

    from training.losses import BridgingObjective
    from tckernels.models import build_hybrid

    base = AutoModelForCausalLM.from_pretrained(micro["base"])
    target = AutoModelForCausalLM.from_pretrained(micro["reference"])
    ref = AutoModelForCausalLM.from_pretrained(micro["reference"])
    for p in ref.parameters():
        p.requires_grad_(False)
    adapted = build_hybrid(target, base, n_features, dec_bias=True, seed=seed)
    if randomize:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for m in adapter_modules(adapted).values():
                m.W_dec.copy_(0.3 * torch.randn(m.W_dec.shape, generator=g))
                m.b_dec.copy_(0.1 * torch.randn(m.b_dec.shape, generator=g))
    return BridgingObjective(adapted, ref, **kw), CharTokenizer.from_pretrained(micro["base"])


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is faster than several, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The full embedded default run (``python -m training.train`` with no configuration; minutes),
    made once for every test that checks what it produces."""
    from training.train import main

    out = tmp_path_factory.mktemp("default") / "tiny"
    assert main(["--output_dir", str(out), "--progress_bar", "false"]) == 0
    return out
