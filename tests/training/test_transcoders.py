"""python -m training.transcoders: per-layer transcoders on a model's MLP activations."""
import json
import os

import pytest
import torch

from tckernels.nn import load_transcoder
from training.activations import capture_activations
from training.transcoders import load_config, main
from tests.training.conftest import read_metrics


def tc_args(micro, out, **over):
    """Command-line arguments for a fast run on the micro model (2 layers, width 32)."""
    args = {
        "model": micro["base"], "train_data": micro["train"], "val_data": micro["val"], "output_dir": str(out),
        "context_length": 32, "forward_batch_size": 4, "buffer_tokens": 256, "batch_tokens": 64,
        "n_features": 64, "k": 4, "max_steps": 6, "learning_rate": 1e-2, "warmup_ratio": 0.2,
        "standardize_batches": 2, "dead_after_tokens": 200, "save_every": 0, "eval_every": 0,
        "log_every": 1, "val_sequences": 4, "val_batch_size": 4, "progress_bar": False, "num_threads": 1,
        "device": "cpu",
    }
    args.update(over)
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    return argv


def main_keeping_trainer(monkeypatch, argv):
    """(exit code of ``main(argv)``, its Trainer as it was when the transcoders were saved, or None)."""
    import training.transcoders as T

    kept = {}
    real_save = T.save_transcoders

    def keep(tr):
        kept["tr"] = tr
        return real_save(tr)

    monkeypatch.setattr(T, "save_transcoders", keep)
    rc = main(argv)
    monkeypatch.setattr(T, "save_transcoders", real_save)
    return rc, kept.get("tr")


def test_micro_run_end_to_end(micro, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # the trained modules and their standardisation, to compare the saved ones with
    rc, tr = main_keeping_trainer(monkeypatch, tc_args(micro, out, eval_every=3))
    assert rc == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    val = read_metrics(out, "val")
    assert [r["when"] for r in val] == ["periodic", "end"]
    s = json.load(open(out / "summary.json"))
    f = s["final"]
    assert f["layers"] == [0, 1] and len(f["fvu"]) == 2 and len(f["kl_each"]) == 2
    assert all(x == pytest.approx(4.0) for x in f["l0"])
    assert f["kl_all"] >= 0 and 0 <= f["top1_all"] <= 1

    ids = tr.val_ids[:2]
    ins, outs = capture_activations(tr.model, ids, [0, 1])
    for j, i in enumerate([0, 1]):
        loaded = load_transcoder(out / "transcoders" / f"layer_{i}")
        loaded.eval()
        with torch.no_grad():
            # the trained module on standardised activations, the saved one on raw activations
            want = tr.std_out[j].inverse(tr.dictionary.transcoders[j](tr.std_in[j].transform(ins[:, j])))
            got = loaded(ins[:, j])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_refuses_an_earlier_run_unless_told(micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tc_args(micro, out, max_steps=1)) == 0
    assert main(tc_args(micro, out, max_steps=1)) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert main(tc_args(micro, out, max_steps=1, overwrite_output_dir=True)) == 0


@pytest.mark.parametrize("over, message", [
    ({"layers": "0,5"}, "no layer 5"),
    ({"layers": "a,b"}, "comma-separated"),
    ({"k": 100}, "k: 100 > n_features 64"),
    ({"buffer_tokens": 64}, "at least 2 x batch_tokens"),
    ({"learning_rat": 1e-3}, "did you mean --learning_rate"),
])
def test_bad_configuration_is_refused_before_training(micro, tmp_path, capsys, over, message):
    out = tmp_path / "run"
    assert main(tc_args(micro, out, **over)) == 2
    assert message in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_empty_data_is_refused(micro, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    assert main(tc_args(micro, out, train_data=str(empty))) == 2
    assert "no records" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_help_lists_the_fields(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "python -m training.transcoders" in text and "--n_features" in text and "--activation" in text


def test_default_config_is_the_tiny_model():
    cfg = load_config([])
    assert cfg.model.endswith(os.path.join("assets", "tiny", "base")) and cfg.activation == "topk"


@pytest.mark.slow
def test_default_run_meets_its_claims(tmp_path):
    """The full default run gives README's figures: every layer's FVU
    <= 0.2 (measured 0.005-0.012) and dead features <= 10% (0-0.4%) on held-out tokens, and the
    replacement model with every MLP replaced at KL 0.381, top-1 91.6%. The bounds leave room for
    another torch's rounding, not for a regression."""
    out = tmp_path / "tiny"
    torch.set_num_threads(2)
    assert main(["--output_dir", str(out), "--progress_bar", "false"]) == 0
    s = json.load(open(out / "summary.json"))
    f = s["final"]
    assert len(f["layers"]) == 4
    assert max(f["fvu"]) <= 0.2 and max(f["dead_fraction"]) <= 0.1
    assert f["kl_all"] <= 0.5 and f["top1_all"] >= 0.9
    # its time (96 s on a quiet 2-core machine) is measured and stated in README, not asserted here:
    # the CI machine is shared, and a timed unit test fails on load, not on a regression
    assert s["total_seconds"] > 0


@pytest.mark.parametrize("over", [{"activation": "batchtopk"}, {"activation": "relu", "l1_coefficient": 1e-3},
                                  {"activation": "jumprelu", "l0_coefficient": 1e-3}])
def test_every_activation_trains_and_saves(micro, tmp_path, over):
    out = tmp_path / "run"
    assert main(tc_args(micro, out, max_steps=3, **over)) == 0
    f = json.load(open(out / "summary.json"))["final"]
    assert all(x == x for x in f["fvu"])  # finite
    assert load_transcoder(out / "transcoders" / "layer_1").activation == over["activation"]


def test_non_finite_loss_stops_the_run(micro, tmp_path, monkeypatch, capsys):
    from tckernels.nn import Transcoder

    real = Transcoder.forward_with_aux
    calls = []

    def poisoned(self, x, target=None, mask=None):
        out = real(self, x, target, mask)
        calls.append(1)
        if len(calls) > 4:  # from the third step on (two layers per step)
            out.losses["loss"] = out.losses["loss"] * float("nan")
        return out

    monkeypatch.setattr(Transcoder, "forward_with_aux", poisoned)
    out = tmp_path / "run"
    assert main(tc_args(micro, out, save_every=1)) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 3" in err and "step_00000002" in err
    assert not (out / "summary.json").exists()


def test_config_errors_name_this_loop(tmp_path):
    from training.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("zzzzzz: 1\n")
    with pytest.raises(ConfigError, match="python -m training.transcoders --help"):
        load_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match="base_model"):  # the adapter loop's fields are not this loop's
        load_config(["--base_model", "x"])
