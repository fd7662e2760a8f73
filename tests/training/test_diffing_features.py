"""training.diffing.features on a hand-built Run (the micro pair, adapters with random encoders and
decoders), checked against a brute-force dense computation: every batch's activations scattered to
``[tokens, F]``, counted and sorted in plain Python, with the segments read off the record text."""
import json
import math
import os

import pytest
import torch

from training.diffing.features import DENSITY_BIN_EDGES, SEGMENTS, feature_statistics

F = 16
N_TOP = 3         # fewer than most features' firings: the streaming top-n has to drop candidates
BOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


def _run(micro, records, run_dir, dead_after_tokens=100):
    from transformers import AutoModelForCausalLM

    from tckernels.models import adapter_modules, build_hybrid
    from training.config import Config
    from training.data import prepare_examples
    from training.diffing.run import Run
    from training.tokenizer import CharTokenizer

    base = AutoModelForCausalLM.from_pretrained(micro["base"]).eval()
    reference = AutoModelForCausalLM.from_pretrained(micro["reference"]).eval()
    target = AutoModelForCausalLM.from_pretrained(micro["reference"])
    adapted = build_hybrid(target, base, F, dec_bias=True, seed=0).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero decoders (layer 1 sees layer 0's adapter) and a spread of densities
        for m in adapter_modules(adapted).values():
            m.W_dec.copy_(0.3 * torch.randn(m.W_dec.shape, generator=g))
            m.b_enc.copy_(torch.linspace(-4.0, 0.5, F))
            m.b_enc[0] = -1e4  # never fires
    for m in (adapted, reference, base):
        for p in m.parameters():
            p.requires_grad_(False)
    tok = CharTokenizer()
    cfg = Config(base_model=micro["base"], reference_model=micro["reference"], val_data=micro["val"],
                 output_dir=str(run_dir), n_features=F, loss_on_prompt=False, max_seq_len=256,
                 dead_after_tokens=dead_after_tokens)
    val_ex = prepare_examples(records, tokenizer=tok, fmt="deepseek", loss_on_prompt=False, max_seq_len=256)
    return Run(str(run_dir), cfg, adapted, reference, base, tok, val_ex, records, torch.device("cpu"))


def _records(micro):
    with open(micro["val"]) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    # a record with an empty response has nothing to score: prepare_examples drops it; the copy of
    # record 0 at the end ties with it everywhere: the earlier example must come first
    empty = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": ""}]}
    return recs[:2] + [empty] + recs[2:] + [recs[0]]


@pytest.fixture(scope="module")
def run(micro, tmp_path_factory):
    run = _run(micro, _records(micro), tmp_path_factory.mktemp("features_run"))
    assert len(run.val_ex) == len(run.val_records) - 1 and run.val_ex[0].input_ids == run.val_ex[-1].input_ids
    assert len({len(e.input_ids) for e in run.val_ex}) > 1  # batches mix lengths: padding is exercised
    return run


def _record_of(example):
    return example + (example >= 2)  # record 2 was dropped


def _tokens_and_segments(record, reasoning_end=None):
    """The character tokenizer's tokens of a record and each token's segment, from the text."""
    user, answer = record["messages"][0]["content"], record["messages"][1]["content"]
    tokens = [BOS, USER, *user, ASSISTANT, *answer]
    p = len(tokens) - len(answer)
    if reasoning_end:
        a = p + answer.index(reasoning_end) + len(reasoning_end)
    else:
        a = p + answer.index("Answer:")
    return tokens, ["prompt"] * p + ["reasoning"] * (a - p) + ["answer"] * (len(tokens) - a)


def _brute_force(run, batch_size, reasoning_end=None):
    """Per layer: the dense [tokens, F] activations of the whole set and each token's (example,
    position, segment), the forward batched as feature_statistics batches it."""
    from tckernels.models import record_features
    from training.data import collate

    dense, where = {}, []
    for s in range(0, len(run.val_ex), batch_size):
        exs = run.val_ex[s:s + batch_size]
        b = collate(exs, run.tokenizer.pad_token_id)
        with torch.no_grad(), record_features(run.adapted) as rec:
            run.adapted(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        for i in rec.layers:
            d = rec.dense(i)
            dense.setdefault(i, []).extend(d[j, :len(e.input_ids)] for j, e in enumerate(exs))
        for j, e in enumerate(exs):
            tokens, segs = _tokens_and_segments(run.val_records[_record_of(s + j)], reasoning_end)
            assert len(tokens) == len(e.input_ids)
            where += [(s + j, t, segs[t]) for t in range(len(tokens))]
    return {i: torch.cat(v) for i, v in dense.items()}, where


def _expected(dense, where, n_top):
    counts = (dense != 0).sum(0)
    n = dense.shape[0]
    seg = {name: [0] * F for name in SEGMENTS}
    top = {}
    for f in range(F):
        hits = [(float(dense[r, f]), e, t, s) for r, (e, t, s) in enumerate(where) if dense[r, f] != 0]
        for _, _, _, s in hits:
            seg[s][f] += 1
        hits.sort(key=lambda h: (-h[0], h[1], h[2]))
        if hits:
            top[str(f)] = hits[:n_top]
    return counts.tolist(), [c / n for c in counts.tolist()], seg, top


@pytest.fixture(scope="module")
def stats(run):
    return {bs: feature_statistics(run, batch_size=bs, n_examples=N_TOP, context_tokens=5) for bs in (1, 7)}


@pytest.mark.parametrize("bs", [1, 7])
def test_counts_densities_top_examples_and_segments_match_brute_force(run, stats, bs):
    out = stats[bs]
    dense, where = _brute_force(run, bs)
    assert out["layers"] == [0, 1] and out["n_tokens"] == len(where) == sum(len(e.input_ids) for e in run.val_ex)
    seg_tokens = {s: sum(1 for w in where if w[2] == s) for s in SEGMENTS}
    assert out["segment_tokens"] == seg_tokens and all(seg_tokens.values())
    for i in (0, 1):
        res = out["per_layer"][str(i)]
        counts, density, seg, top = _expected(dense[i], where, N_TOP)
        assert 0 < sum(c == 0 for c in counts) < F - 2  # some dead, most alive: a real test
        assert res["fire_counts"] == counts
        assert res["density"] == pytest.approx(density, rel=1e-12)
        assert res["l0"] == pytest.approx(sum(counts) / len(where), rel=1e-12)
        assert res["dead"]["held_out"] == sum(c == 0 for c in counts)
        assert res["segments"]["fire_counts"] == seg
        assert res["segments"]["tokens"] == seg_tokens
        assert res["segments"]["firings"] == {s: sum(seg[s]) for s in SEGMENTS}
        assert sorted(res["top_examples"]) == sorted(top)
        for f, hits in top.items():
            got = res["top_examples"][f]
            assert [(g["value"], g["example"], g["position"], g["segment"]) for g in got] == \
                   [(pytest.approx(v, rel=1e-6), e, t, s) for v, e, t, s in hits]
            assert [g["record"] for g in got] == [_record_of(e) for _, e, _, _ in hits]
        hist = res["density_histogram"]
        bins = [0] * (len(DENSITY_BIN_EDGES) - 1)
        for d in density:
            if d > 0:
                bins[min(int((math.log10(d) + 6) // 0.25), len(bins) - 1)] += 1
        assert hist["counts"] == bins and hist["never_fired"] == sum(c == 0 for c in counts)
        assert hist["below_range"] == 0 and hist["bin_edges"] == DENSITY_BIN_EDGES


def test_streaming_top_n_merge_keeps_the_largest_and_the_earliest_of_ties():
    from training.diffing.features import _LayerAccumulator

    g = torch.Generator().manual_seed(0)
    n_feat, n_top, n = 5, 4, 400
    f = torch.randint(0, n_feat, (n,), generator=g)
    v = torch.randint(1, 6, (n,), generator=g).float()  # few distinct values: many ties
    e, p = torch.arange(n) // 10, torch.arange(n) % 10
    want = {}
    for k in sorted(range(n), key=lambda k: (int(f[k]), -float(v[k]), k)):
        want.setdefault(int(f[k]), [])
        if len(want[int(f[k])]) < n_top:
            want[int(f[k])].append((float(v[k]), int(e[k]), int(p[k])))
    for chunk in (1, 7, 64, n):
        acc = _LayerAccumulator(n_feat, n_top)
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            acc.add(f[sl], v[sl], e[sl], p[sl], torch.zeros_like(f[sl]), 10)
        got = {j: list(zip(acc.top_val[j].tolist(), acc.top_ex[j].tolist(), acc.top_pos[j].tolist()))
               for j in range(n_feat)}
        assert got == want, chunk


def test_streaming_batch_size_does_not_change_the_results(stats):
    a, b = stats[1], stats[7]
    assert a.keys() == b.keys()
    for i in ("0", "1"):
        ra, rb = a["per_layer"][i], b["per_layer"][i]
        for key in ("fire_counts", "density", "l0", "density_histogram", "dead", "segments"):
            assert ra[key] == rb[key], key
        assert ra["mean_value"] == pytest.approx(rb["mean_value"], rel=1e-5)
        assert ra["top_examples"].keys() == rb["top_examples"].keys()
        for f in ra["top_examples"]:
            strip = lambda rows: [(r["example"], r["position"], r["token"], r["context"]) for r in rows]  # noqa: E731
            assert strip(ra["top_examples"][f]) == strip(rb["top_examples"][f])
            assert [r["value"] for r in ra["top_examples"][f]] == \
                   pytest.approx([r["value"] for r in rb["top_examples"][f]], rel=1e-5)


def test_segment_shares_enrichment_and_contexts(run, stats):
    out = stats[7]
    n_tok = out["n_tokens"]
    for i in ("0", "1"):
        res = out["per_layer"][i]
        seg = res["segments"]
        counts = res["fire_counts"]
        total = sum(counts)
        for s in SEGMENTS:
            share_fire = seg["firings"][s] / total
            assert seg["enrichment"][s] == pytest.approx(share_fire / (seg["tokens"][s] / n_tok))
            mostly = sum(1 for f in range(F) if counts[f] and seg["fire_counts"][s][f] / counts[f] > 0.5)
            assert seg["mostly"][s] == mostly

            def rate_share(f):
                rates = {t: seg["fire_counts"][t][f] / seg["tokens"][t] for t in SEGMENTS}
                return rates[s] / sum(rates.values())
            assert seg["mostly_normalised"][s] == sum(1 for f in range(F) if counts[f] and rate_share(f) > 0.5)
        assert sum(seg["mostly"].values()) <= F - res["dead"]["held_out"]
        # contexts: 5 tokens before, 4 after, the token marked, from the record's own text
        for f, rows in res["top_examples"].items():
            for r in rows:
                tokens, segs = _tokens_and_segments(run.val_records[r["record"]])
                p = r["position"]
                assert r["token"] == tokens[p] and r["segment"] == segs[p]
                want = "".join(tokens[max(0, p - 5):p]) + f"«{tokens[p]}»" + "".join(tokens[p + 1:p + 5])
                assert r["context"] == want
    json.dumps(out)  # JSON-able


def test_reasoning_end_moves_the_answer_start(run):
    out = feature_statistics(run, layers=[0], batch_size=4, n_examples=2, reasoning_end="Yes.")
    dense, where = _brute_force(run, 4, reasoning_end="Yes.")
    assert out["segment_tokens"] == {s: sum(1 for w in where if w[2] == s) for s in SEGMENTS}
    assert out["per_layer"]["0"]["segments"]["fire_counts"] == _expected(dense[0], where, 2)[2]
    assert out["examples_without_answer"] == 0


def test_layer_selection_keeps_the_other_adapters_on(run, stats):
    from tckernels.models import adapter_modules, set_adapters_enabled

    set_adapters_enabled(run.adapted, False)
    try:
        one = feature_statistics(run, layers=[1], batch_size=7, n_examples=N_TOP, context_tokens=5)
        assert [m.enabled for m in adapter_modules(run.adapted).values()] == [False, False]  # restored
    finally:
        set_adapters_enabled(run.adapted, True)
    assert one["layers"] == [1] and list(one["per_layer"]) == ["1"]
    # layer 1's inputs depend on layer 0's adapter: the same numbers only if it was on
    assert one["per_layer"]["1"] == stats[7]["per_layer"]["1"]
    with pytest.raises(ValueError, match="layers"):
        feature_statistics(run, layers=[0, 5])


def test_dead_by_the_training_counters(micro, tmp_path):
    from training import checkpoint as ckpt

    run = _run(micro, _records(micro)[:3], tmp_path, dead_after_tokens=100)
    out = feature_statistics(run, batch_size=2, n_examples=1)
    assert all(r["dead"]["training"] is None for r in out["per_layer"].values()) and out["training_tokens"] is None
    step = os.path.join(ckpt.checkpoints_dir(str(tmp_path)), "step_00000003")
    os.makedirs(step)
    silent = torch.tensor([[0, 99, 100, 5000] * 4, [100] * 10 + [0] * 6])
    torch.save({"silent_for": silent, "tokens": 6000}, os.path.join(step, ckpt.TRAINER))
    out = feature_statistics(run, batch_size=2, n_examples=1)
    assert out["per_layer"]["0"]["dead"]["training"] == 8
    assert out["per_layer"]["1"]["dead"]["training"] == 10
    assert out["training_tokens"] == 6000 and out["dead_after_tokens"] == 100
