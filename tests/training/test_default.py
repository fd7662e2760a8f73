"""The embedded default: the shipped tiny pair and data, and `python -m training.train` on them."""
import json
import os

import pytest

from training.config import load_config
from training.data import load_tokenizer
from training.train import main
from tests.training.conftest import read_metrics

ASSETS = os.path.join(os.path.dirname(load_config([]).train_data))


def test_assets_are_a_small_valid_pair():
    from transformers import AutoConfig

    total = 0
    for root, _, files in os.walk(ASSETS):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    assert total < 5e6
    cb, cr = (AutoConfig.from_pretrained(os.path.join(ASSETS, n)) for n in ("base", "reference"))
    assert cb.model_type == cr.model_type == "qwen2" and cb.vocab_size == cr.vocab_size
    pair = json.load(open(os.path.join(ASSETS, "pair.json")))
    assert pair["base"]["hesitation_rate"] == 0.0 and pair["reference"]["hesitation_rate"] == 1.0
    assert 0 < pair["direct_share"] < 0.5  # the reference's data also answers without hesitating
    # the reference is the better reasoner, so there is an accuracy gain for the adapters to recover
    assert pair["reference"]["accuracy"] >= pair["base"]["accuracy"] + 0.3
    tok = load_tokenizer(os.path.join(ASSETS, "reference"))
    assert len(tok.encode(pair["hesitation_word"])) == 1 and len(tok) == cr.vocab_size  # one decision


def test_default_config_runs_briefly(tmp_path):
    out = tmp_path / "tiny"
    argv = ["--output_dir", str(out), "--max_steps", "3", "--eval_every", "0", "--save_every", "0",
            "--n_generations", "2", "--max_val_examples", "8", "--max_new_tokens", "8", "--progress_bar", "false"]
    assert main(argv) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_default_run_meets_its_claims(default_run):
    """The full default run (minutes) gives README's figures: KL(reference || adapted) 0.0259 from the
    hybrid's 1.738 (-98.5%), top-1 agreement 98.7%, and the adapted model hesitating like the
    reference on nearly every held-out prompt (the hybrid on none). The bounds leave room for another
    torch's rounding, not for a regression."""
    s = json.load(open(default_run / "summary.json"))
    f = s["final"]
    assert f["kl_hybrid"] == pytest.approx(1.738, abs=2e-3)  # the start does not depend on training
    assert f["kl"] <= 0.035 and f["kl"] <= 0.02 * f["kl_hybrid"]
    assert f["top1"] >= 0.98 and f["top1_hybrid"] == pytest.approx(0.717, abs=2e-3)
    g = s["generations"]
    assert g["adapted"]["hesitation_rate"] >= 0.97 and g["hybrid"]["hesitation_rate"] == 0.0
