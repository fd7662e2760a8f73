"""Data: formats, masks, sources, batching and its resumable position."""
import json
import re

import pytest
import torch

from training.data import (DataError, ResumableBatches, collate, load_records, load_tokenizer, prepare_examples,
                           prompt_ids, tokenize_record)
from training.tokenizer import CharTokenizer

TOK = CharTokenizer()
MSGS = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+2"},
        {"role": "assistant", "content": "3"}]


def _text(ex):
    return TOK.decode(ex.input_ids)


def _targets(ex):
    """The tokens whose prediction is scored (the token after each scored position)."""
    return "".join(TOK.decode([ex.input_ids[t + 1]]) for t, m in enumerate(ex.loss_mask) if m)


def test_deepseek_format_and_mask():
    """The original's rendering: nothing after the response; with append_eos, DeepSeek's template's EOS."""
    ex = tokenize_record({"messages": MSGS}, TOK, "deepseek", loss_on_prompt=False)
    assert _text(ex) == "<｜begin▁of▁sentence｜>S<｜User｜>1+2<｜Assistant｜>3"
    assert _targets(ex) == "3"
    assert ex.loss_mask == [0] * (len(ex.input_ids) - 2) + [1, 0]  # only the position before "3"
    ex = tokenize_record({"messages": MSGS}, TOK, "deepseek", loss_on_prompt=False, append_eos=True)
    assert _text(ex) == "<｜begin▁of▁sentence｜>S<｜User｜>1+2<｜Assistant｜>3<｜end▁of▁sentence｜>"
    assert _targets(ex) == "3<｜end▁of▁sentence｜>"
    assert ex.loss_mask[-1] == 0 and len(ex.loss_mask) == len(ex.input_ids)


def test_think_with_a_space_becomes_think_newline():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think> a b"}]
    for fmt in ("deepseek", "chatml"):
        assert "<think>\na b" in _text(tokenize_record({"messages": msgs}, TOK, fmt, False))
    msgs[1]["content"] = "x <think> y"  # only at the start of the response
    assert "x <think> y" in _text(tokenize_record({"messages": msgs}, TOK, "deepseek", False))


def test_chatml_format_and_mask():
    """The original's Qwen format: everything after the assistant header is a target, the final
    newline included."""
    ex = tokenize_record({"messages": MSGS}, TOK, "chatml", loss_on_prompt=False)
    assert _text(ex) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n1+2<|im_end|>\n"
                         "<|im_start|>assistant\n3<|im_end|>\n")
    assert _targets(ex) == "3<|im_end|>\n"


def test_loss_on_prompt_scores_every_position_but_the_last():
    ex = tokenize_record({"messages": MSGS}, TOK, "deepseek", loss_on_prompt=True)
    assert ex.loss_mask == [1] * (len(ex.input_ids) - 1) + [0]


def test_multi_turn_and_conversations_field():
    rec = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
    ex = tokenize_record(rec, TOK, "deepseek", False)
    assert _text(ex) == ("<｜begin▁of▁sentence｜><｜User｜>a<｜Assistant｜>b<｜end▁of▁sentence｜>"
                         "<｜User｜>c<｜Assistant｜>d")
    assert _targets(ex) == "b<｜end▁of▁sentence｜>d"
    assert TOK.decode(prompt_ids(rec, "deepseek", TOK)).endswith("<｜User｜>c<｜Assistant｜>")


def test_bpe_text_is_tokenized_whole_and_the_prompt_boundary_is_the_prompts_length():
    """With a tokenizer that merges across the prompt/response boundary, the ids are the whole
    text's and the first target is at ``len(encode(prompt text))``, as in the original."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("abcdxyz")}
    vocab.update({"ab": 7, "abc": 8, "<s>": 9, "<U>": 10, "<A>": 11})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok.add_special_tokens({"additional_special_tokens": ["<s>", "<U>", "<A>"]})
    rec = {"prompt": "xab", "completion": "cd"}  # "ab" + "c" merge into "abc" across the boundary
    ex = tokenize_record(rec, tok, "deepseek", loss_on_prompt=False)
    assert ex.input_ids == tok.encode("xabcd", add_special_tokens=False) == [vocab["x"], 8, vocab["d"]]
    n_prompt = len(tok.encode("xab", add_special_tokens=False))  # 2: "x", "ab"
    assert ex.loss_mask == [0] * (n_prompt - 1) + [1] * (len(ex.input_ids) - n_prompt) + [0]


def test_text_and_prompt_completion():
    ex = tokenize_record({"text": "hello"}, TOK, "deepseek", False)
    assert _text(ex) == "hello" and _targets(ex) == "ello"
    ex = tokenize_record({"prompt": "Q:", "completion": "A"}, TOK, "chatml", False)
    assert _text(ex) == "Q:A" and _targets(ex) == "A"


@pytest.mark.parametrize("rec, needle", [
    ({"foo": 1}, "no `messages`"),
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"text": 3}, "must be a string"),
    ("just a string", "expected an object"),
])
def test_bad_records(rec, needle):
    with pytest.raises(DataError, match=needle):
        tokenize_record(rec, TOK, "deepseek", False)


def test_truncation_and_drop_and_empty():
    recs = [{"text": "x" * 50}, {"text": "y" * 5}]
    ex = prepare_examples(recs, TOK, "deepseek", False, max_seq_len=10)
    assert [len(e.input_ids) for e in ex] == [10, 5] and ex[0].loss_mask[-1] == 0
    ex = prepare_examples(recs, TOK, "deepseek", False, max_seq_len=10, truncation="drop")
    assert [len(e.input_ids) for e in ex] == [5]
    # the prompt alone fills max_seq_len: nothing left to score, so the dataset is empty
    long_prompt = [{"messages": [{"role": "user", "content": "z" * 40}, {"role": "assistant", "content": "a"}]}]
    with pytest.raises(DataError, match="no usable examples"):
        prepare_examples(long_prompt, TOK, "deepseek", False, max_seq_len=20)
    with pytest.raises(DataError, match="no usable examples"):
        prepare_examples([], TOK, "deepseek", False, max_seq_len=20)
    with pytest.raises(DataError, match="vocabulary"):
        prepare_examples(recs, TOK, "deepseek", False, max_seq_len=100, vocab_size=50)


def test_load_jsonl_json_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert load_records(str(p)) == [{"text": "a"}, {"text": "b"}]
    q = tmp_path / "d.json"
    q.write_text(json.dumps([{"text": "a"}]))
    assert load_records(str(q)) == [{"text": "a"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_records(str(bad))
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))
    other = tmp_path / "d.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data file type"):
        load_records(str(other))
    with pytest.raises(DataError, match="not a .jsonl"):
        load_records(str(tmp_path))


def test_damaged_files_are_named(tmp_path):
    binary = tmp_path / "d.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match=re.escape(f"{binary}: not UTF-8 text")):
        load_records(str(binary))
    TOK.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "tok" / "char_tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'tok' / 'char_tokenizer.json'}: not a readable "
                                                  "character tokenizer")):
        load_tokenizer(str(tmp_path / "tok"))


def test_damaged_parquet_is_named(tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "d.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=re.escape(f"{p}: cannot read it as parquet")):
        load_records(str(p))


def test_parquet(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pytest.skip("pyarrow is not installed")
    p = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": "ab"}, {"text": "cd"}]), p)
    assert load_records(p) == [{"text": "ab"}, {"text": "cd"}]


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = str(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "ab"}])}).save_to_disk(d)
    assert load_records(d, "train") == [{"text": "ab"}]
    with pytest.raises(DataError, match="no split"):
        load_records(d, "validation")


def test_collate_pads_and_masks():
    exs = prepare_examples([{"text": "abcdef"}, {"text": "ab"}], TOK, "deepseek", False, 100)
    bt = collate(exs, TOK.pad_token_id)
    assert bt["input_ids"].shape == (2, 6)
    assert bt["attention_mask"].tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    assert bt["loss_mask"].tolist() == [[True] * 5 + [False], [True] + [False] * 5]
    assert (bt["input_ids"][1, 2:] == TOK.pad_token_id).all()


def test_resumable_batches():
    exs = prepare_examples([{"text": f"s{i:02d}"} for i in range(10)], TOK, "deepseek", False, 100)
    a = ResumableBatches(exs, 2, TOK.pad_token_id, seed=3)
    seq = [a.next()["input_ids"] for _ in range(7)]  # crosses an epoch boundary (5 per epoch)
    b = ResumableBatches(exs, 2, TOK.pad_token_id, seed=3)
    for _ in range(3):
        b.next()
    state = b.state_dict()
    c = ResumableBatches(exs, 2, TOK.pad_token_id, seed=3)
    c.load_state_dict(state)
    for i in range(3, 7):
        assert torch.equal(c.next()["input_ids"], seq[i])
    # two ranks split each global micro-batch without overlap
    r0 = ResumableBatches(exs, 2, TOK.pad_token_id, seed=3, rank=0, world_size=2)
    r1 = ResumableBatches(exs, 2, TOK.pad_token_id, seed=3, rank=1, world_size=2)
    seen = [TOK.decode(x) for _ in range(2) for bt in (r0.next(), r1.next()) for x in bt["input_ids"].tolist()]
    assert len(set(seen)) == 8
    with pytest.raises(DataError, match="fewer than one global micro-batch"):
        ResumableBatches(exs[:3], 2, TOK.pad_token_id, world_size=2)


def test_char_tokenizer_roundtrip(tmp_path):
    text = "<｜User｜>12+3\nWait, ok<|im_end|>"
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert len(ids) == 1 + 4 + 1 + 8 + 1
    TOK.save_pretrained(str(tmp_path))
    assert CharTokenizer.from_pretrained(str(tmp_path)).encode(text) == ids
    assert TOK.decode(TOK.encode("é")) == "<unk>"


def test_char_tokenizer_words_are_one_token_each_and_keep_every_character_id(tmp_path):
    tok = CharTokenizer(words=["Wait", "Wa"])
    assert len(tok) == len(TOK) + 2
    text = "<｜User｜>1+2 Wait, Waiting Wa W"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    wait, wa = tok.convert_tokens_to_ids("Wait"), tok.convert_tokens_to_ids("Wa")
    assert ids.count(wait) == 2 and ids.count(wa) == 1  # longest first; the rest is characters
    assert len(ids) == 1 + 4 + 1 + 1 + 1 + 1 + 3 + 1 + 1 + 1 + 1
    assert all(tok.encode(ch) == TOK.encode(ch) for ch in "0123 ,.W")  # ids unchanged by the words
    assert tok.decode([wait], skip_special_tokens=True) == "Wait"  # a word is ordinary text
    tok.save_pretrained(str(tmp_path))
    assert CharTokenizer.from_pretrained(str(tmp_path)).encode(text) == ids
    TOK.save_pretrained(str(tmp_path / "plain"))
    assert CharTokenizer.from_pretrained(str(tmp_path / "plain")).words == []


@pytest.mark.parametrize("words, needle", [(["W"], "at least two characters"), (["Wé"], "not in the vocabulary"),
                                           (["Wait", "Wait"], "duplicate"), (["<unk>x", "\n"], "two characters")])
def test_char_tokenizer_bad_words(words, needle):
    with pytest.raises(ValueError, match=needle):
        CharTokenizer(words=words)
