"""The embedded default: the shipped tiny pair and data, and `python -m training.train` on them."""
import json
import os

import pytest

from training.config import load_config
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


def test_default_config_runs_briefly(tmp_path):
    out = tmp_path / "tiny"
    argv = ["--output_dir", str(out), "--max_steps", "3", "--eval_every", "0", "--save_every", "0",
            "--n_generations", "2", "--max_val_examples", "8", "--max_new_tokens", "8", "--progress_bar", "false"]
    assert main(argv) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_default_run_meets_its_claims(tmp_path, capsys):
    """The full default run (minutes): KL to the reference falls by >= 70% from the hybrid start and
    the adapted model hesitates like the reference."""
    out = tmp_path / "tiny"
    assert main(["--output_dir", str(out), "--progress_bar", "false"]) == 0
    s = json.load(open(out / "summary.json"))
    assert s["final"]["kl"] <= 0.3 * s["final"]["kl_hybrid"]
    g = s["generations"]
    assert g["adapted"]["hesitation_rate"] >= 0.9 and g["hybrid"]["hesitation_rate"] <= 0.1
