"""Config: YAML, typed command-line overrides, and clear errors."""
import os
import re

import pytest

from training.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from training.train import main

HERE = os.path.dirname(os.path.abspath(__file__))
R1 = os.path.join(os.path.dirname(DEFAULT_CONFIG), "r1_distil_7b.yaml")


def test_default_is_tiny_and_paths_resolve():
    cfg = load_config([])
    assert cfg.config_path == DEFAULT_CONFIG
    assert os.path.isabs(cfg.base_model) and cfg.base_model.endswith(os.path.join("assets", "tiny", "base"))
    assert os.path.isfile(cfg.train_data)


def test_r1_config_has_the_seed_values():
    cfg = load_config(["--config", R1])
    assert cfg.base_model == "Qwen/Qwen2.5-Math-7B"
    assert cfg.reference_model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert (cfg.n_features, cfg.dec_bias, cfg.l1_weight, cfg.learning_rate, cfg.weight_decay) == (8192, True, 1e-3, 8e-4, 0.0)
    assert (cfg.warmup_ratio, cfg.max_grad_norm, cfg.lambda_adapt, cfg.lambda_bridge, cfg.lambda_nmse) == (0.05, 1.0, 1.0, 2.0, 1.0)
    assert (cfg.n_cutoffs, cfg.backbone, cfg.max_seq_len) == (1, "target", 10000)
    # the original's rendering, masks and pooling
    assert (cfg.chat_format, cfg.append_eos, cfg.loss_on_prompt, cfg.truncation) == ("deepseek", False, True, "truncate")
    assert (cfg.batch_reduction, cfg.micro_batch_size, cfg.grad_accum_steps) == ("token", 1, 1)


def test_defaults_are_the_originals_objective():
    """A config that does not choose gets the original's objective and data rendering."""
    cfg = Config()
    assert (cfg.batch_reduction, cfg.append_eos, cfg.loss_on_prompt, cfg.truncation) == ("token", False, True, "truncate")
    assert (cfg.lambda_adapt, cfg.lambda_nmse, cfg.lambda_bridge, cfg.n_cutoffs, cfg.min_lr_ratio) == (1.0, 1.0, 2.0, 1, 0.0)


def test_overrides_are_typed():
    cfg = load_config(["--learning_rate", "1e-3", "--l1_weight=0.01", "--max_steps", "10", "--dec_bias", "false",
                       "--topk", "null", "--output_dir", "x", "--max-grad-norm", "2"])
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.l1_weight == 0.01 and cfg.max_steps == 10 and cfg.dec_bias is False and cfg.topk is None
    assert cfg.output_dir == "x" and cfg.max_grad_norm == 2.0


def test_yaml_values_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base_model: a\nreference_model: b\ntrain_data: ./d.jsonl\nlearning_rate: 8e-4\nn_features: 64\n")
    cfg = load_config(["--config", str(p)])
    assert cfg.learning_rate == 8e-4  # YAML reads 8e-4 as a string; accepted for a float field
    assert cfg.train_data == str(tmp_path / "d.jsonl")


@pytest.mark.parametrize("argv, needle", [
    (["--learning_rat", "1"], r"unknown option --learning_rat \(did you mean --learning_rate\?\)"),
    (["--zzzzzz", "1"], "no field is close; python -m training.train --help lists them all"),
    (["--max_steps", "abc"], "max_steps: expected int"),
    (["--max_steps", "1.5"], "max_steps: expected int"),
    (["--dec_bias", "maybe"], "dec_bias: expected bool"),
    (["--learning_rate", "fast"], "learning_rate: expected float"),
    (["--backbone", "middle"], "backbone: 'middle' is not one of"),
    (["--n_features", "0"], "n_features: must be >= 1"),
    (["--warmup_ratio", "2"], "warmup_ratio"),
    (["--max_steps"], "needs a value"),
    (["stray"], "unexpected argument"),
    (["--activation", "topk"], "topk"),
    (["--config", "/nonexistent/c.yaml"], "not found"),
])
def test_bad_arguments(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(argv)


def test_unknown_key_suggests_the_closest_fields_not_all_of_them(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base_model: a\nlearnig_rate: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(p)])
    msg = str(e.value)
    assert msg == f"config file {str(p)!r}: unknown config key 'learnig_rate' (did you mean learning_rate?)"
    with pytest.raises(ConfigError) as e:
        load_config(["--n_feature", "4"])
    assert "did you mean --n_features?" in str(e.value) and "n_cutoffs" not in str(e.value)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("base_model: a\nn_features: 4\n  lr: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(p)])
    assert str(e.value).startswith(f"config file {str(p)!r} is not valid YAML: line 3, column ")
    p.write_text("n_features: many\n")  # a value of the wrong type names the file too
    with pytest.raises(ConfigError, match=re.escape(f"config file '{p}': n_features: expected int")):
        load_config(["--config", str(p)])


def test_a_bool_flag_alone_is_true():
    cfg = load_config(["--overwrite_output_dir", "--max_steps", "3", "--dec_bias"])
    assert cfg.overwrite_output_dir is True and cfg.dec_bias is True and cfg.max_steps == 3
    assert load_config(["--overwrite_output_dir", "false"]).overwrite_output_dir is False
    assert load_config([]).overwrite_output_dir is False
    with pytest.raises(ConfigError, match="overwrite_output_dir: cannot be combined with resume_from 'latest'"):
        load_config(["--overwrite_output_dir", "--resume_from", "latest"])


@pytest.mark.parametrize("text, needle", [
    ("n_features: many\n", "n_features: expected int"),
    ("dec_bias: 3\n", "dec_bias: expected bool"),
    ("base_model: [1, 2]\n", "base_model: expected str"),
    ("- a\n- b\n", "mapping"),
    ("a: [\n", "YAML"),
])
def test_bad_yaml(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(["--config", str(p)])


def test_main_reports_config_errors_and_help(capsys):
    assert main(["--nope", "1"]) == 2
    assert "unknown option --nope" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "--lambda_bridge" in capsys.readouterr().out


def test_help_shows_the_defaults_a_run_gets(capsys):
    """Without --config a run uses tiny.yaml, so --help shows its values (and the built-in default
    beside each it changes); with --config, that file's."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Defaults below are those of training/configs/tiny.yaml, which a run without --config uses" in out
    assert "--n_features (int, default 256 [built-in 8192])" in out
    assert "--output_dir (str, default 'runs/tiny' [built-in 'runs/default'])" in out
    assert "--lambda_bridge (float, default 2.0)\n" in out
    assert main(["--config", R1, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--n_features (int, default 8192)\n" in out and "default 'runs/r1_distil_7b'" in out
    assert main(["--help", "--config", "/nonexistent/c.yaml"]) == 2
    assert "not found" in capsys.readouterr().err


def test_every_field_documented():
    import dataclasses

    for f in dataclasses.fields(Config):
        assert f.metadata.get("doc"), f.name
