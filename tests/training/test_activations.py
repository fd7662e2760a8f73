"""Activations for transcoder training: packing, hooks, the shuffling buffer, exact resume, the cache."""
import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.activations import (ActivationBuffer, ActivationCache, ActivationStream, IDENTITY_FIELDS,
                                  capture_activations, load_sequences, pack_sequences, record_text,
                                  tokenize_records)
from training.data import DataError, chat_segments
from training.tokenizer import CharTokenizer

ASSETS = Path(__file__).resolve().parents[2] / "training" / "assets" / "tiny"
BASE, REFERENCE, TRAIN, VAL = (str(ASSETS / p) for p in ("base", "reference", "train.jsonl", "val.jsonl"))
TOK = CharTokenizer.from_pretrained(BASE)  # the shipped models' tokenizer


def _load(path=BASE, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


@pytest.fixture(scope="module")
def qwen():
    return _load()


@pytest.fixture(scope="module")
def tokens():
    """16 rows of 16 tokens of the tiny training data."""
    return load_sequences(TRAIN, TOK, context_length=16, max_sequences=16)


@contextlib.contextmanager
def counting_forwards(model):
    """Counts the model's forwards, whoever runs them."""
    calls = [0]
    h = model.register_forward_pre_hook(lambda m, args: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        h.remove()


def drain(buffer, n=None):
    """The next n batches of a buffer (all of them with n=None)."""
    out = []
    for batch in buffer:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def cat(batches):
    return tuple(None if batches[0][k] is None else torch.cat([b[k] for b in batches]) for k in range(3))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index)
        assert torch.equal(x.inputs, y.inputs)
        assert (x.outputs is None) == (y.outputs is None)
        if x.outputs is not None:
            assert torch.equal(x.outputs, y.outputs)


# --------------------------------------------------------------------------------------------------
# a model whose activations name their token: every layer's MLP reads and writes the token id
# --------------------------------------------------------------------------------------------------
class _IdLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Identity()

    def forward(self, x):
        return self.mlp(x)


class IdentityLM(nn.Module):
    def __init__(self, n_layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_IdLayer() for _ in range(n_layers))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        x = input_ids.to(torch.float32)[..., None] * self.scale
        for layer in self.model.layers:
            x = layer(x)
        return x


N_SEQ, T = 10, 4
ID_TOKENS = torch.arange(N_SEQ * T).view(N_SEQ, T)  # each token id once in an epoch


def id_buffer(epochs=3, seed=0, buffer_tokens=24, batch_tokens=5, **kw):
    stream = ActivationStream(IdentityLM(), ID_TOKENS, forward_batch_size=3, epochs=epochs, seed=seed, **kw)
    return ActivationBuffer(stream, buffer_tokens=buffer_tokens, batch_tokens=batch_tokens, seed=seed)


# --------------------------------------------------------------------------------------------------
# text -> packed sequences
# --------------------------------------------------------------------------------------------------
def test_pack_puts_eos_between_documents_and_drops_the_tail():
    docs = [[1, 2, 3], [4, 5], [], [6, 7, 8, 9]]
    packed = pack_sequences(docs, context_length=3, eos_token_id=0)
    # the stream 1 2 3 | 0 4 5 | 0 6 7 | 8 9 (the tail): the empty document adds no EOS
    assert packed.tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 7]]
    assert packed.dtype == torch.long
    assert pack_sequences(docs, 3, 0, max_sequences=2).tolist() == [[1, 2, 3], [0, 4, 5]]
    with pytest.raises(DataError, match="fewer than one sequence of context_length=20"):
        pack_sequences(docs, 20, 0)


def test_records_become_documents_by_text_field_then_chat_then_prompt():
    msgs = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]
    records = [{"body": "cd", "text": "zz"}, {"text": "ab"}, {"messages": msgs}, {"prompt": "p", "completion": "q"},
               {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    chat = "".join(t for t, _ in chat_segments(msgs, "chatml"))
    assert record_text(records[2], chat_format="chatml") == chat
    eos = TOK.eos_token
    docs = ["cd", "ab", chat, "pq", "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\ny<|im_end|>\n"]
    stream = eos.join(docs)
    n_tokens = len(TOK.encode(stream))
    packed = tokenize_records(records, TOK, context_length=7, text_field="body", chat_format="chatml")
    assert packed.shape == (n_tokens // 7, 7)
    assert TOK.decode(packed.flatten().tolist()) == TOK.decode(TOK.encode(stream)[: packed.numel()])

    class BatchedTokenizer(CharTokenizer):  # an HF tokenizer's batched call
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [self.encode(t) for t in texts]}

    batched = tokenize_records(records, BatchedTokenizer(), context_length=7, text_field="body", chat_format="chatml")
    assert torch.equal(batched, packed)
    with pytest.raises(DataError, match=r"record 1: none of the fields `body`, `messages`.*\(fields: \['other'\]\)"):
        tokenize_records([{"body": "ok"}, {"other": 1}], TOK, 4, text_field="body")
    with pytest.raises(DataError, match="`body` must be a string"):
        record_text({"body": 3}, text_field="body")


def test_load_sequences_is_deterministic_and_refuses_empty_data(tmp_path):
    a = load_sequences(TRAIN, TOK, context_length=32, max_sequences=5)
    b = load_sequences(TRAIN, TOK, context_length=32, max_sequences=5)
    assert a.shape == (5, 32) and torch.equal(a, b)
    first = json.loads(open(TRAIN).readline())
    assert a[0].tolist() == TOK.encode(record_text(first))[:32]  # the data's order, deepseek rendering
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no records"):
        load_sequences(str(empty), TOK, 16)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "abc"}\n')
    with pytest.raises(DataError, match="3 tokens in 1 non-empty documents, fewer than one sequence"):
        load_sequences(str(short), TOK, 16)


# --------------------------------------------------------------------------------------------------
# hooks read what each MLP reads and writes
# --------------------------------------------------------------------------------------------------
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=104, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=64)).eval()


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=104, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=2,
                                            max_position_embeddings=64)).eval()


def _gated_mlp(mlp, x):  # Qwen2 / Llama: down(silu(gate(x)) * up(x))
    return F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)


def _neox_mlp(mlp, x):  # GPT-NeoX: dense_4h_to_h(gelu(dense_h_to_4h(x)))
    h = F.gelu(F.linear(x, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias))
    return F.linear(h, mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt_neox"])
def test_hooks_capture_what_the_mlp_reads_and_writes(arch, qwen):
    model = {"qwen2": lambda: qwen, "llama": _llama, "gpt_neox": _gpt_neox}[arch]()
    ids = torch.randint(0, 104, (2, 9), generator=torch.Generator().manual_seed(1))
    layers = [0, 1]
    inputs, outputs = capture_activations(model, ids, layers)
    assert inputs.shape == (18, 2, model.config.hidden_size) and outputs.shape == inputs.shape
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[l]: layer l's input
        decoder = model.gpt_neox.layers if arch == "gpt_neox" else model.model.layers
        for j, l in enumerate(layers):
            layer, x, y = decoder[l], inputs[:, j], outputs[:, j]
            d = x.shape[-1]
            if arch == "gpt_neox":  # parallel residual: the MLP reads the layer's input, normed
                assert torch.allclose(x, layer.post_attention_layernorm(hs[l].reshape(-1, d)), atol=1e-5)
                assert torch.allclose(y, _neox_mlp(layer.mlp, x), atol=1e-5)
            else:  # the MLP writes y into the residual stream: what it read is the norm of what was there
                assert torch.allclose(y, _gated_mlp(layer.mlp, x), atol=1e-5)
                before_mlp = hs[l + 1].reshape(-1, d) - y
                assert torch.allclose(x, layer.post_attention_layernorm(before_mlp), atol=1e-5)


def test_residual_hook_points_and_sae_mode(qwen):
    ids = torch.randint(0, 104, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hs = [h.reshape(14, -1) for h in qwen(ids, output_hidden_states=True).hidden_states]
    pre, post = capture_activations(qwen, ids, [1, 2], "resid_pre", "resid_post")
    assert torch.allclose(pre[:, 0], hs[1]) and torch.allclose(pre[:, 1], hs[2])
    assert torch.allclose(post[:, 0], hs[2]) and torch.allclose(post[:, 1], hs[3])
    sae_in, sae_out = capture_activations(qwen, ids, [2, 1], "resid_pre", "resid_pre")  # the order given
    assert sae_out is None
    assert torch.allclose(sae_in[:, 0], hs[2]) and torch.allclose(sae_in[:, 1], hs[1])


def test_padding_is_left_out(qwen):
    a = torch.randint(0, 104, (1, 5), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 104, (1, 8), generator=torch.Generator().manual_seed(4))
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0, :5], ids[1] = a[0], b[0]
    mask[0, :5], mask[1] = 1, 1
    x, y = capture_activations(qwen, ids, [1], attention_mask=mask)
    assert x.shape[0] == 13
    xa, ya = capture_activations(qwen, a, [1])
    xb, yb = capture_activations(qwen, b, [1])
    assert torch.allclose(x, torch.cat([xa, xb]), atol=1e-5) and torch.allclose(y, torch.cat([ya, yb]), atol=1e-5)


def test_the_forward_stops_after_the_last_layer_needed(qwen):
    ids = torch.randint(0, 104, (1, 6), generator=torch.Generator().manual_seed(5))
    ran = {"layer 3": 0, "lm_head": 0}
    h1 = qwen.model.layers[3].register_forward_pre_hook(lambda m, a: ran.__setitem__("layer 3", ran["layer 3"] + 1))
    h2 = qwen.lm_head.register_forward_pre_hook(lambda m, a: ran.__setitem__("lm_head", ran["lm_head"] + 1))
    try:
        early = capture_activations(qwen, ids, [0, 2])
        assert ran == {"layer 3": 0, "lm_head": 0}
        full = capture_activations(qwen, ids, [0, 2], stop_early=False)
        assert ran == {"layer 3": 1, "lm_head": 1}
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(early[0], full[0]) and torch.equal(early[1], full[1])


def test_activations_keep_the_model_dtype():
    model = _load(dtype=torch.bfloat16)
    x, y = capture_activations(model, torch.tensor([[4, 40, 41, 42]]), [0])
    assert x.dtype == y.dtype == torch.bfloat16


def test_bad_layers_models_and_data_fail_before_anything_runs(qwen, tokens):
    with counting_forwards(qwen) as calls:
        for layers, msg in (([7], r"no layer 7; Qwen2ForCausalLM has layers 0\.\.3"), ([1, 1], "names a layer twice"),
                            ([], "no layer chosen"), (["1"], "must be int layer indices")):
            with pytest.raises(ValueError, match=msg):
                ActivationStream(qwen, tokens, layers)
        with pytest.raises(ValueError, match="input_hook 'attn': unknown hook point"):
            ActivationStream(qwen, tokens, [0], input_hook="attn")
        with pytest.raises(ValueError, match="sequences is empty"):
            ActivationStream(qwen, tokens[:0], [0])
        with pytest.raises(ValueError, match=f"outside the model's vocabulary of {len(TOK)} tokens"):
            ActivationStream(qwen, tokens + 200, [0])
        stream = ActivationStream(qwen, tokens, [0])
        with pytest.raises(ValueError, match="at least 2 x batch_tokens"):
            ActivationBuffer(stream, buffer_tokens=30, batch_tokens=16)
        other = ActivationStream(qwen, tokens, [0], forward_batch_size=2)
        with pytest.raises(ValueError, match="forward_batch_size was 8, now 2"):
            other.load_state_dict(stream.state_dict())
        assert calls[0] == 0

    class NoMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(ValueError, match=r"cannot hook NoMLP's MLPs: .*no list of decoder layers with an \.mlp"):
        capture_activations(NoMLP(), torch.zeros(1, 3, dtype=torch.long), [0])


# --------------------------------------------------------------------------------------------------
# the buffer: every token once per epoch, shuffled, and exactly resumable
# --------------------------------------------------------------------------------------------------
def test_every_token_is_served_exactly_once_per_epoch():
    batches = drain(id_buffer(epochs=3))
    assert [len(b.index) for b in batches[:-1]] == [5] * (len(batches) - 1) and 0 < len(batches[-1].index) <= 5
    inputs, outputs, index = cat(batches)
    assert sorted(index.tolist()) == list(range(3 * N_SEQ * T))  # no stream position lost or repeated
    assert torch.equal(inputs, outputs) and torch.equal(inputs[:, 0], inputs[:, 1])  # the id model's layers agree
    token = inputs[:, 0, 0].long()
    epoch = index // (N_SEQ * T)
    for e in range(3):  # in each epoch, every token id exactly once
        assert sorted(token[epoch == e].tolist()) == list(range(N_SEQ * T))
    assert index.tolist() != sorted(index.tolist())  # shuffled
    # mixing: new rows join old ones, so some early batch serves rows from far apart in the stream
    assert max(int(b.index.max() - b.index.min()) for b in batches[:4]) > 24
    # each epoch goes through the sequences in its own order (the position within a sequence is kept)
    assert torch.equal(token % T, index % T)
    starts = index % T == 0
    order = [(token // T)[starts & (epoch == e)][torch.argsort(index[starts & (epoch == e)])] for e in range(3)]
    assert not torch.equal(order[0], order[1])


def test_buffer_is_deterministic_given_the_seed():
    assert_same_batches(drain(id_buffer(seed=3), 6), drain(id_buffer(seed=3), 6))
    assert not torch.equal(cat(drain(id_buffer(seed=3), 6))[0], cat(drain(id_buffer(seed=4), 6))[0])


def _roundtrip(state):
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    return torch.load(f, weights_only=True)


@pytest.mark.parametrize("include_contents", [False, True])
@pytest.mark.parametrize("cut", [0, 1, 3, 7, 11])
def test_a_resumed_buffer_yields_exactly_the_uninterrupted_batches(cut, include_contents):
    whole = drain(id_buffer())
    first = id_buffer()
    head = drain(first, cut)
    state = _roundtrip(first.state_dict(include_contents=include_contents))
    assert ("inputs" in state) == (include_contents and len(state["slots"]) > 0)
    resumed = id_buffer()
    resumed.load_state_dict(state)
    assert_same_batches(head + drain(resumed), whole)


def test_resume_on_a_real_model_remakes_the_buffer_exactly(qwen, tokens):
    def make():
        stream = ActivationStream(qwen, tokens, [1, 2], forward_batch_size=3)
        return ActivationBuffer(stream, buffer_tokens=64, batch_tokens=12, seed=1)

    whole = drain(make(), 14)
    first = make()
    head = drain(first, 5)
    state = _roundtrip(first.state_dict())  # no contents: the rows are made again by the same forwards
    resumed = make()
    with counting_forwards(qwen) as calls:
        resumed.load_state_dict(state)
    assert calls[0] > 0
    assert_same_batches(head + drain(resumed, 9), whole)


def test_processes_share_the_stream_without_overlap():
    seen = []
    for rank in range(2):
        stream = ActivationStream(IdentityLM(), ID_TOKENS, forward_batch_size=3, epochs=1, rank=rank, world_size=2)
        rows = []
        while (r := stream.take(7)) is not None:
            rows.append(r.index)
        seen.append(torch.cat(rows))
    assert len(seen[0]) and len(seen[1]) and not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(torch.cat(seen).tolist()) == list(range(N_SEQ * T))


# --------------------------------------------------------------------------------------------------
# the on-disk cache
# --------------------------------------------------------------------------------------------------
def _cached(model, tokens, cache_dir, layers=(0, 3), epochs=1, **kw):
    stream = ActivationStream(model, tokens, list(layers), forward_batch_size=3, epochs=epochs,
                              cache_dir=str(cache_dir), data_path=TRAIN, **kw)
    return ActivationBuffer(stream, buffer_tokens=64, batch_tokens=16, seed=2)


def test_cache_round_trip_and_a_second_run_does_not_run_the_model(qwen, tokens, tmp_path):
    import numpy as np

    with counting_forwards(qwen) as calls:
        first = drain(_cached(qwen, tokens, tmp_path))
    assert calls[0] == 6  # 16 sequences, 3 per forward
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["model"] == os.path.realpath(BASE) and meta["layers"] == [0, 3] and meta["dtype"] == "float32"
    assert (meta["input_hook"], meta["output_hook"], meta["context_length"], meta["n_tokens"]) == \
        ("mlp_in", "mlp_out", 16, 256)
    assert meta["dataset"]["path"] == os.path.realpath(TRAIN) and meta["dataset"]["bytes"] > 0
    assert set(IDENTITY_FIELDS) <= set(meta)
    assert (tmp_path / "inputs-00000.npy").is_file() and (tmp_path / "outputs-00000.npy").is_file()
    with counting_forwards(qwen) as calls:
        again = _cached(qwen, tokens, tmp_path)
        second = drain(again)
    assert calls[0] == 0 and again.source.forwards == 0
    assert isinstance(again.source.cache._shards[0][0], np.memmap)
    assert_same_batches(first, second)
    # the cache holds sequence i's rows where the data has it, as the model makes them
    x, y = again.source.cache.read(torch.tensor([5]))
    rx, ry = capture_activations(qwen, tokens[5:6], [0, 3])
    assert torch.allclose(x, rx, atol=1e-6) and torch.allclose(y, ry, atol=1e-6)


def test_a_partial_cache_is_completed_and_later_epochs_read_it(qwen, tokens, tmp_path):
    plain = drain(ActivationBuffer(ActivationStream(qwen, tokens, [0, 3], forward_batch_size=3, epochs=1),
                                   buffer_tokens=64, batch_tokens=16, seed=2))
    with counting_forwards(qwen) as calls:
        drain(_cached(qwen, tokens, tmp_path), 1)  # stops early: 2 of 6 forwards made
    assert calls[0] == 2
    with counting_forwards(qwen) as calls:
        rest = drain(_cached(qwen, tokens, tmp_path))
    assert calls[0] == 4
    assert_same_batches(rest, plain)
    nine = tokens[:9]  # 3 forwards an epoch: the second and third epochs only read
    with counting_forwards(qwen) as calls:
        drain(_cached(qwen, nine, tmp_path / "nine", epochs=3))
    assert calls[0] == 3


def test_processes_share_one_cache(tmp_path):
    """Two ranks open the cache before either made it: the second to write opens the first's files."""
    model = IdentityLM()
    ranks = [ActivationStream(model, ID_TOKENS, forward_batch_size=3, epochs=1, rank=r, world_size=2,
                              cache_dir=str(tmp_path)) for r in range(2)]
    for stream in ranks:
        while stream.take(100) is not None:
            pass
    assert [s.forwards for s in ranks] == [2, 2]
    reader = ActivationStream(model, ID_TOKENS, forward_batch_size=3, epochs=1, cache_dir=str(tmp_path))
    assert reader.cache.complete
    rows = [reader.take(100) for _ in range(4)]
    assert reader.forwards == 0
    assert torch.equal(torch.cat([r.inputs[:, 0, 0] for r in rows]).long().sort().values, torch.arange(N_SEQ * T))
    assert not (tmp_path / "creating.lock").exists()


def test_cache_keeps_bfloat16(tmp_path, tokens):
    model = _load(dtype=torch.bfloat16)
    first = drain(_cached(model, tokens[:6], tmp_path, layers=[1]))
    assert first[0].inputs.dtype == torch.bfloat16
    second = drain(_cached(model, tokens[:6], tmp_path, layers=[1]))
    assert second[0].inputs.dtype == torch.bfloat16
    assert_same_batches(first, second)


def _other_weights():
    m = _load()
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    return m


def _other_config():
    m = _load()
    m.config.rms_norm_eps = 1e-5
    return m


# each: (field named, what differs from the cache's run)
CHANGES = {
    "model": lambda q, t: dict(model=_load(REFERENCE)),
    "model_config": lambda q, t: dict(model=_other_config()),
    "model_weights": lambda q, t: dict(model=_other_weights()),
    "layers": lambda q, t: dict(layers=(0, 2)),
    "input_hook": lambda q, t: dict(input_hook="resid_pre"),
    "output_hook": lambda q, t: dict(output_hook="resid_post"),
    "dtype": lambda q, t: dict(model=_load(dtype=torch.bfloat16)),
    "context_length": lambda q, t: dict(tokens=t.reshape(32, 8)),
    "dataset": lambda q, t: dict(tokens=load_sequences(VAL, TOK, context_length=16, max_sequences=16)),
}


@pytest.mark.parametrize("field", list(CHANGES))
def test_cache_refuses_another_run_naming_the_field(field, qwen, tokens, tmp_path):
    _cached(qwen, tokens, tmp_path).next_batch()  # makes the cache
    kw = dict(model=qwen, tokens=tokens, cache_dir=tmp_path)
    kw.update(CHANGES[field](qwen, tokens))
    with counting_forwards(kw["model"]) as calls:
        with pytest.raises(ValueError, match=f"activation cache .* was made with a different {field}:"):
            _cached(**kw)
    assert calls[0] == 0
    _cached(qwen, tokens, tmp_path)  # the same run is still welcome


def test_a_damaged_cache_is_named(qwen, tokens, tmp_path):
    _cached(qwen, tokens, tmp_path).next_batch()
    os.remove(tmp_path / "inputs-00000.npy")
    with pytest.raises(ValueError, match="is damaged .* delete it"):
        _cached(qwen, tokens, tmp_path)
    assert ActivationCache.METADATA == "metadata.json"
