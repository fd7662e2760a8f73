"""training/diffing/tasks.py and hesitation.py on the micro pair: answers, hesitation positions, the
attribution against finite differences, and the set search."""
import os
import types

import pytest
import torch

from tckernels.models import ablate_features, adapter_modules, adapters_enabled, build_hybrid
from tests.training.conftest import make_pair, write_data
from training.config import Config
from training.data import load_records, prepare_examples
from training.diffing import hesitation as H
from training.diffing import tasks
from training.diffing.run import Run
from training.tokenizer import CharTokenizer


def test_final_answer_forms():
    assert tasks.final_answer("3+2+1=6. Wait, check: 632-285=347. Yes. Answer: 632.") == "632"
    assert tasks.final_answer("so the result is \\boxed{\\frac{1}{2}} indeed") == "\\frac{1}{2}"
    assert tasks.final_answer("we get 12 then 14") == "14"
    assert tasks.final_answer("no digits here") is None and tasks.final_answer(None) is None


def test_gain_recovered():
    assert tasks.gain_recovered(0.2, 0.5, 0.8) == pytest.approx(0.5)
    assert tasks.gain_recovered(1.0, 0.9, 1.0) is None  # no gain to recover
    assert tasks.gain_recovered(None, 0.9, 1.0) is None


class PairTokenizer:
    """Decodes two-character tokens: a token boundary never falls where a character one does."""

    def decode(self, ids):
        return "".join(["ab", " W", "ai", "t,", "xx"][i] for i in ids)


def test_hesitation_position_char_and_merged_tokens():
    tok = CharTokenizer()
    ids = tok.encode("6. Wait, check")
    assert tasks.hesitation_position(tok, ids, "Wait") == 3  # "6", ".", " ", "W"
    assert tasks.hesitation_position(tok, tok.encode("6. Answer"), "Wait") is None
    # " W" holds the word's first character: that token, even though it starts with a space
    assert tasks.hesitation_position(PairTokenizer(), [0, 1, 2, 3, 4], "Wait") == 1
    assert H._word_tokens(PairTokenizer(), [0, 1, 2, 3, 4], 1, "Wait") == 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hes")
    paths = make_pair(str(root), layers=2)
    val = write_data(os.path.join(root, "val.jsonl"), 6, seed=2)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    ref = AutoModelForCausalLM.from_pretrained(paths["reference"]).eval()
    adapted = build_hybrid(AutoModelForCausalLM.from_pretrained(paths["reference"]), base, 16, seed=0,
                           dec_bias=True).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in adapter_modules(adapted).values():
            m.transcoder.W_dec.copy_(torch.randn(m.transcoder.W_dec.shape, generator=g))
            m.transcoder.b_dec.copy_(torch.randn(m.transcoder.b_dec.shape, generator=g))  # no feature != hybrid
    for m in (base, ref, adapted):
        for p in m.parameters():
            p.requires_grad_(False)
    tok = CharTokenizer()
    cfg = Config(base_model=paths["base"], reference_model=paths["reference"], train_data=val, val_data=val,
                 output_dir=str(root / "out"), n_features=16)
    records = load_records(val)
    ex = prepare_examples(records, tokenizer=tok, fmt=cfg.chat_format, loss_on_prompt=True, max_seq_len=256)
    return Run(str(root), cfg, adapted, ref, base, tok, ex, records, torch.device("cpu"))


def test_attribution_is_gradient_times_activation(run):
    """The score of a feature equals d target / d(scale of that feature) at scale 1: scaling f_i by
    (1 + e) changes the word's log-probability by e * f_i * d/df_i, summed over positions."""
    tok = run.tokenizer
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>12+34<｜Assistant｜>")
    comp = tok.encode("2+4=6. Wait, check")
    out = H.attribute(run, [prompt], [comp], "Wait", method="gradient")
    assert out["n_sequences"] == 1
    scores = out["scores"]
    layer, feat = max(((i, int(t.abs().argmax())) for i, t in scores.items()), key=lambda x: abs(scores[x[0]][x[1]]))
    assert abs(float(scores[layer][feat])) > 0
    pos = tasks.hesitation_position(tok, comp, "Wait")
    ids = torch.tensor([prompt + comp[:pos + 4]])
    from tckernels.models import scale_features

    def target(factor):
        with scale_features(run.adapted, {layer: [feat]}, factor), torch.no_grad():
            return float(H._word_log_prob(run.adapted, ids, len(prompt) + pos - 1, comp[pos:pos + 4]))

    e = 1e-3
    fd = (target(1 + e) - target(1 - e)) / (2 * e)
    assert fd == pytest.approx(float(scores[layer][feat]), rel=2e-2, abs=1e-4)
    # a completion without the word adds nothing
    assert H.attribute(run, [prompt], [tok.encode("2+4=6. Answer")], "Wait")["n_sequences"] == 0


def test_path_attribution_is_complete(run):
    """Integrated gradients: the scores sum to log p(word) with every feature at its value minus log p
    with every feature at zero (the adapters' decoder bias alone), up to the midpoint rule's error,
    which shrinks with the steps; the gap is the two models' own difference."""
    tok = run.tokenizer
    prompts = [tok.encode(f"<｜begin▁of▁sentence｜><｜User｜>{p}<｜Assistant｜>") for p in ("12+34", "51+27")]
    comps = [tok.encode("2+4=6. Wait, check"), tok.encode("1+7=8. 5+2=7. Wait")]
    fine = H.attribute(run, prompts, comps, "Wait", method="path", steps=32)
    assert fine["n_sequences"] == 2

    def target(prompt, comp, ablate):
        pos = tasks.hesitation_position(tok, comp, "Wait")
        ids = torch.tensor([prompt + comp[:pos + 4]])
        with torch.no_grad():
            if ablate:
                with ablate_features(run.adapted, "all"):
                    return float(H._word_log_prob(run.adapted, ids, len(prompt) + pos - 1, comp[pos:pos + 4]))
            return float(H._word_log_prob(run.adapted, ids, len(prompt) + pos - 1, comp[pos:pos + 4]))

    gap = sum(target(p, c, False) - target(p, c, True) for p, c in zip(prompts, comps))
    assert abs(gap) > 0.1
    assert fine["gap"] == pytest.approx(gap, rel=1e-4, abs=1e-4)
    total = sum(float(t.sum()) for t in fine["scores"].values())
    assert total == pytest.approx(fine["score_sum"]) and total == pytest.approx(gap, rel=0.03)
    coarse = H.attribute(run, prompts, comps, "Wait", method="path", steps=1)
    assert abs(coarse["score_sum"] - gap) > abs(total - gap)  # more steps, nearer completeness
    with pytest.raises(ValueError, match="method"):
        H.attribute(run, prompts, comps, "Wait", method="lrp")


def test_decision_point_ends_at_the_adapted_model(run):
    """Patching every feature is the adapted model (the whole gap closed), the hybrid is the model
    with its adapters off, and a completion without the word is not counted."""
    tok = run.tokenizer
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>12+34<｜Assistant｜>")
    comp = tok.encode("2+4=6. Wait, check")
    scores = {i: torch.arange(m.n_features, dtype=torch.float64) + 1 for i, m in adapter_modules(run.adapted).items()}
    ranked = H.ranking(scores)
    out = H.decision_point(run, ranked, [prompt, prompt], [comp, tok.encode("2+4=6. Answer")], "Wait",
                           [3, len(ranked)])
    assert out["n_sequences"] == 1 and [p["size"] for p in out["patched"]] == [3, len(ranked)]
    pos = tasks.hesitation_position(tok, comp, "Wait")
    ids = torch.tensor([prompt + comp[:pos + 4]])
    with torch.no_grad():
        lp = float(H._word_log_prob(run.adapted, ids, len(prompt) + pos - 1, comp[pos:pos + 4]))
        with adapters_enabled(run.adapted, False):
            lp_h = float(H._word_log_prob(run.adapted, ids, len(prompt) + pos - 1, comp[pos:pos + 4]))
        with ablate_features(run.adapted, "all"):
            lp_0 = float(H._word_log_prob(run.adapted, ids, len(prompt) + pos - 1, comp[pos:pos + 4]))
    assert out["adapted"]["mean_log_prob"] == pytest.approx(lp, abs=1e-4)
    assert out["hybrid"]["mean_log_prob"] == pytest.approx(lp_h, abs=1e-4) and abs(lp - lp_h) > 0.1
    assert out["no_features"]["mean_log_prob"] == pytest.approx(lp_0, abs=1e-4) and abs(lp_0 - lp_h) > 0.1
    every = out["patched"][-1]
    assert every["mean_log_prob"] == pytest.approx(lp, abs=1e-4) and every["gap_closed"] == pytest.approx(1.0, abs=1e-4)
    assert out["patched"][0]["mean_log_prob"] != pytest.approx(lp, abs=1e-3)  # three features are not all
    # steering: scale 0 keeps no feature, whatever the set: no gap closed
    zero = H.decision_point(run, ranked, [prompt], [comp], "Wait", [len(ranked)], scale=0.0)["patched"][0]
    assert zero["mean_log_prob"] == pytest.approx(lp_0, abs=1e-4) and zero["gap_closed"] == pytest.approx(0, abs=1e-4)
    double = H.decision_point(run, ranked, [prompt], [comp], "Wait", [len(ranked)], scale=2.0)["patched"][0]
    assert double["mean_log_prob"] != pytest.approx(lp, abs=1e-3)


def test_ranking_sets_and_complement(run):
    scores = {0: torch.tensor([0.5, -1.0, 2.0] + [0.0] * 13, dtype=torch.float64),
              1: torch.tensor([1.0] + [0.0] * 15, dtype=torch.float64)}
    r = H.ranking(scores)
    assert [(i, f) for i, f, _ in r] == [(0, 2), (1, 0), (0, 0)]  # positive only, highest first
    chosen = H.as_layers(r[:2])
    assert chosen == {0: [2], 1: [0]}
    comp = H.complement(run, {0: [2]})
    assert comp[1] == "all" and 2 not in comp[0] and len(comp[0]) == 15


def test_smallest_set_bisects_to_the_first_size_that_reaches_the_goal(run, monkeypatch):
    calls = []

    def fake(run_, features, prompts, answers, word, max_new_tokens, batch_size):
        size = sum(len(v) for v in features.values())
        calls.append(size)
        return {"hesitation_rate": 1.0 if size < 7 else 0.05}

    monkeypatch.setattr(H, "_ablated", fake)
    ranked = [(i % 2, i // 2, 1.0) for i in range(32)]
    out = H.smallest_set(run, ranked, [], [], "Wait", 1.0, 10, max_share=1.0, target_removal=0.9)
    grid = H._size_grid(32, 1.0)
    assert out["reached"] and out["size"] == min(s for s in grid if s >= 7)
    assert len(calls) <= len(grid).bit_length() + 1  # bisection, not every size
    out = H.smallest_set(run, ranked, [], [], "Wait", 1.0, 10, max_share=5 / 32, target_removal=0.9)
    assert not out["reached"] and out["size"] == 5


def test_causal_set_is_the_longer_of_the_two_prefixes_and_measures_both_rates_there(run, monkeypatch):
    # ablating the top 7 removes the word; patching in the top 11 makes the hybrid write it
    monkeypatch.setattr(H, "_ablated", lambda run_, features, *a: {
        "hesitation_rate": 1.0 if sum(len(v) for v in features.values()) < 7 else 0.0})
    measured = []

    def induced(run_, ranked, size, *a):
        measured.append(size)
        return 1.0 if size >= 11 else 0.0

    monkeypatch.setattr(H, "_induced_rate", induced)
    ranked = [(i % 2, i // 2, 1.0) for i in range(32)]  # the micro pair: 2 layers x 16 features
    grid = H._size_grid(32, 1.0)
    nec = H.smallest_set(run, ranked, [], [], "Wait", 1.0, 10, max_share=0.5)
    suff = H.sufficient_set(run, ranked, [], [], "Wait", 1.0, 10)
    assert nec["size"] == min(s for s in grid if s >= 7) and suff["size"] == min(s for s in grid if s >= 11)
    out = H.causal_set(run, ranked, nec, suff, [], [], "Wait", 10, max_share=0.5)
    assert out["rule"] == "necessary and sufficient" and out["size"] == suff["size"]
    assert out["reached"] and out["necessary"] and out["sufficient"]
    assert out["ablated_rate"] == 0.0 and out["induced_rate"] == 1.0
    assert out["share"] == suff["size"] / 32 and sum(len(v) for v in out["features"].values()) == suff["size"]
    # over the budget: the necessary set alone, and it says it is not sufficient
    nec = H.smallest_set(run, ranked, [], [], "Wait", 1.0, 10, max_share=12 / 32)
    measured.clear()
    out = H.causal_set(run, ranked, nec, suff, [], [], "Wait", 10, max_share=12 / 32)
    assert out["size"] == nec["size"] < 12 < suff["size"] and out["rule"].startswith("necessary (")
    assert out["necessary"] and not out["sufficient"] and not out["reached"]
    assert measured == ([] if nec["size"] in [t["size"] for t in suff["tried"]] else [nec["size"]])


def test_patching_every_feature_is_the_adapted_model_and_none_the_decoder_biases(run):
    prompts, _ = tasks.prompts_and_answers(run, run.val_records[:4])
    every = {i: list(range(m.n_features)) for i, m in adapter_modules(run.adapted).items()}
    assert H.patched_completions(run, every, prompts, 12, batch_size=3) == tasks.complete(run, "adapted", prompts, 12)
    with ablate_features(run.adapted, "all"):
        no_features = tasks.complete(run, "adapted", prompts, 12)
    assert H.patched_completions(run, {}, prompts, 12, batch_size=3) == no_features
    assert no_features != tasks.complete(run, "hybrid", prompts, 12)  # the decoder biases matter here
    # one layer's features patched: the other layer's adapter adds its decoder bias alone
    one = H.patched_completions(run, {0: every[0]}, prompts, 12, batch_size=3)
    with ablate_features(run.adapted, {1: "all"}):
        assert one == tasks.complete(run, "adapted", prompts, 12)


def test_patching_refuses_installed_interventions_and_disabled_layers(run):
    prompts, _ = tasks.prompts_and_answers(run, run.val_records[:1])
    with ablate_features(run.adapted, {0: [1]}):
        with pytest.raises(ValueError, match="interventions"):
            H.patched_completions(run, {0: [2]}, prompts, 4)
        with pytest.raises(ValueError, match="interventions"):
            H.attribute(run, prompts, [[0]], "Wait", method="path")
    with adapters_enabled(run.adapted, False, layers=[1]):
        with pytest.raises(ValueError, match="layers \\[1\\]"):
            H.patched_completions(run, {1: [2]}, prompts, 4)


def test_patch_keeps_the_chosen_features_at_the_recorded_width():
    from tckernels.nn.activations import SparseActivations

    mask = torch.zeros(8, dtype=torch.bool)
    mask[[4, 7]] = True
    patch = H._Patched(mask, scale=2.0)
    patch.acts = SparseActivations(torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[4, 0, 7]]]))
    out, shift = patch(SparseActivations(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3, dtype=torch.long)), None)
    assert shift is None and out.indices.tolist() == [[[4, 0, 7]]] and out.values.tolist() == [[[2.0, 0.0, 6.0]]]


def test_path_attribution_stays_complete_in_bfloat16(run):
    """A bf16 model's path gradients are summed in float32: with many steps a bf16 sum drifts far
    from the gap (19% at 512 steps on this pair)."""
    import copy
    import dataclasses

    half = dataclasses.replace(run, adapted=copy.deepcopy(run.adapted).to(torch.bfloat16))
    tok = run.tokenizer
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>12+34<｜Assistant｜>")
    out = H.attribute(half, [prompt], [tok.encode("2+4=6. Wait, check")], "Wait", method="path", steps=512)
    assert abs(out["gap"]) > 0.1 and out["score_sum"] == pytest.approx(out["gap"], rel=0.02)
