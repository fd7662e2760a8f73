"""python -m training.transcoders on other model families (Llama, GPT-NeoX, GPT-2), on a model whose layers
have no .mlp, against a mismatched activation cache, and its outputs exported for circuit-tracer."""
import json
import math
import os

import pytest
import torch

from tckernels.nn import load_transcoder
from tckernels.nn.formats import load_circuit_tracer, load_circuit_tracer_clt, save_circuit_tracer, save_circuit_tracer_clt
from training.tokenizer import CharTokenizer
from training.transcoders import main
from tests.training.test_transcoders import tc_args


def _save(model, root, name):
    path = os.path.join(root, name)
    model.save_pretrained(path)
    CharTokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM, OPTConfig, OPTForCausalLM)

    root = str(tmp_path_factory.mktemp("families"))
    vocab = len(CharTokenizer())
    torch.manual_seed(0)
    return {
        "llama": _save(LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)), root, "llama"),
        "gpt_neox": _save(GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64)), root, "gpt_neox"),
        "gpt2": _save(GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64)), root, "gpt2"),
        # OPT's decoder layers have fc1/fc2 and no .mlp
        "opt": _save(OPTForCausalLM(OPTConfig(
            vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64, word_embed_proj_dim=32)), root, "opt"),
    }


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_other_families_train(micro, tmp_path, families, family):
    out = tmp_path / "run"
    assert main(tc_args(micro, out, model=families[family], max_steps=3)) == 0
    f = json.load(open(out / "summary.json"))["final"]
    assert f["layers"] == [0, 1] and all(math.isfinite(x) and x > 0 for x in f["fvu"])
    assert load_transcoder(out / "transcoders" / "layer_1").d_in == 32


def test_a_model_without_mlp_modules_is_refused_before_training(micro, tmp_path, families, capsys):
    out = tmp_path / "run"
    assert main(tc_args(micro, out, model=families["opt"])) == 2
    err = capsys.readouterr().err
    assert "cannot hook OPTForCausalLM's MLPs" in err and ".mlp" in err
    assert not (out / "metrics.jsonl").exists()


def test_a_cache_made_for_other_layers_is_refused(micro, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(tc_args(micro, tmp_path / "a", max_steps=2, cache_dir=str(cache))) == 0
    # the same data and model read back from the cache give the same first losses
    assert main(tc_args(micro, tmp_path / "b", max_steps=2, cache_dir=str(cache))) == 0
    la, lb = ([json.loads(x)["loss"] for x in open(d / "metrics.jsonl") if '"train"' in x] for d in
              (tmp_path / "a", tmp_path / "b"))
    assert la == lb
    capsys.readouterr()
    assert main(tc_args(micro, tmp_path / "c", max_steps=2, cache_dir=str(cache), layers="1")) == 2
    err = capsys.readouterr().err
    assert "layers" in err and str(cache) in err


def test_saved_outputs_export_for_circuit_tracer(micro, tmp_path):
    per_layer, clt = tmp_path / "per_layer", tmp_path / "clt"
    assert main(tc_args(micro, per_layer, max_steps=2, activation="jumprelu", l1_coefficient=1e-3)) == 0
    assert main(tc_args(micro, clt, max_steps=2, architecture="crosslayer", activation="relu",
                        l1_coefficient=1e-3)) == 0
    x = torch.randn(5, 32)
    tcs = {i: load_transcoder(per_layer / "transcoders" / f"layer_{i}").eval() for i in (0, 1)}
    save_circuit_tracer(tcs, tmp_path / "ct")
    back = load_circuit_tracer(tmp_path / "ct")
    with torch.no_grad():
        for i in (0, 1):
            torch.testing.assert_close(back[i].eval()(x), tcs[i](x))
    c = load_transcoder(clt / "transcoders" / "crosslayer").eval()
    save_circuit_tracer_clt(c, tmp_path / "ct_clt")
    c2 = load_circuit_tracer_clt(tmp_path / "ct_clt").eval()
    with torch.no_grad():
        for a, b in zip(c2([x, x]), c([x, x])):
            torch.testing.assert_close(a, b)
