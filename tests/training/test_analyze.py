"""python -m training.analyze on the embedded default run: every part runs, the report and its
figures are written, and the numbers agree with the training run's own validation."""
import json
import os

import pytest

from training.analyze import main


@pytest.mark.slow
def test_analysis_of_the_default_run(default_run, tmp_path):
    out = tmp_path / "analysis"
    assert main([str(default_run), "--out", str(out), "--device", "cpu"]) == 0
    a = json.load(open(out / "analysis.json"))
    report = open(out / "report.md").read()
    for fig in a["figures"]:
        assert os.path.getsize(out / fig) > 1000 and f"({fig})" in report
    assert len(a["figures"]) == 5

    final = json.load(open(default_run / "summary.json"))["final"]
    o = a["output"]
    assert o["kl"]["adapted"] == pytest.approx(final["kl"], rel=1e-5)
    assert o["kl"]["hybrid"] == pytest.approx(final["kl_hybrid"], rel=1e-5)
    assert o["kl"]["reference"] == 0 and o["top1_error"]["reference"] == 0
    f = a["internal"]
    assert f["all_layers"] == pytest.approx(o["kl"]["adapted"], rel=1e-5)  # the hybrid backbone shares the head
    assert f["nmse"]["adapted"] == pytest.approx(final["nmse_layers"], rel=1e-4)

    t = a["tasks"]["models"]
    assert t["reference"]["hesitation_rate"] == 1.0 and t["hybrid"]["hesitation_rate"] == 0.0
    assert t["adapted"]["hesitation_rate"] >= 0.97
    assert a["tasks"]["length_ratio"] == pytest.approx(1.0, abs=0.05)  # adapted matches the reference's length
    assert 0.5 <= a["tasks"]["gain_recovered"]["adapted"] <= 1.0  # the paper: 50-90% of the reference's gain

    feats = a["features"]["per_layer"]
    assert [feats[str(i)]["l0"] for i in range(4)] == pytest.approx(final["l0_layers"], rel=1e-4)

    h = a["hesitation"]
    s, c = h["set"], h["causal"]
    # one set, at most 5% of the features, both necessary and sufficient on the selection prompts
    assert s["rule"] == "necessary and sufficient" and s["reached"] and s["share"] <= 0.05
    assert s["size"] == max(h["necessary_set"]["size"], h["sufficient_set"]["size"])
    # and on prompts it was not chosen on: ablated, it removes at least 90% of the hesitations ...
    assert c["hesitation_removed"] >= 0.9
    # ... where a random set of the same size (the control) removes far fewer ...
    assert c["random_ablated"]["hesitation_rate"] >= 0.6 * c["adapted"]["hesitation_rate"]
    # ... and without the word the adapted model answers directly: shorter, and no less accurate (the
    # target: at most 5 points lost)
    assert c["accuracy_change"] >= -0.05 and c["length_change"] <= -15
    # patched into the hybrid, it makes the hybrid hesitate in at least half where it never does alone
    assert c["induced"] >= 0.5 and c["hybrid"]["hesitation_rate"] == 0
    a_ = h["attribution"]
    assert a_["method"] == "path" and a_["score_sum"] == pytest.approx(a_["gap"], rel=0.05)  # complete
    d = h["decision_point"]
    assert d["adapted"]["top1"] >= 0.97 and d["hybrid"]["top1"] == 0
    assert d["patched"][-1]["gap_closed"] >= 0.95  # the whole positive ranking is nearly the adapted model
    at_one = next(p for p in d["patched"] if p["size"] == s["size"])
    assert at_one["gap_closed"] >= 0.5 and at_one["top1"] >= 0.5  # the set decides the word where it is written
    assert [v["scale"] for v in h["steered"]] == [2.0, 4.0]
    assert h["steered"][0]["hesitation_rate"] >= 0.5  # steered at 2x, the hybrid still hesitates
    assert "## Hesitation" in report and "Causal tests" in report and "decision point" in report
