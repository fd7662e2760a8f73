"""The run configuration: one flat dataclass, loaded from YAML, with type-checked command-line overrides.

    python -m training.train --config training/configs/r1_distil_7b.yaml --learning_rate 1e-3 --l1_weight 0.01

Every field can be set in the YAML file or as ``--field value`` (or ``--field=value``); the command
line wins. A bool field given alone (``--overwrite_output_dir``) is true. Unknown keys are errors
that suggest the closest field names; values of the wrong type are errors that name the field and
the type expected. Numbers written ``8e-4`` (which YAML reads as a string) are accepted for float
fields; ``null``/``none`` sets an optional field to None.
"""
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "tiny.yaml")


class ConfigError(ValueError):
    """A configuration that cannot be used; raised before anything is loaded."""


def _f(default, doc, choices=None):
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class Config:
    # ---- models -------------------------------------------------------------------------------
    base_model: str = _f("", "the base model (HF id or local directory); its MLPs are kept")
    reference_model: str = _f("", "the reference (fine-tuned) model the adapted model learns to imitate")
    tokenizer: Optional[str] = _f(None, "tokenizer (default: the reference model's)")
    backbone: str = _f("target", "what the adapters are added to: 'target' = the reference model with "
                       "the base model's MLPs (the hybrid), 'base' = the base model", ("target", "base"))
    dtype: str = _f("float32", "dtype the two models run in", ("float32", "bfloat16", "float16"))
    attn_implementation: Optional[str] = _f(None, "HF attention implementation (eager, sdpa, flash_attention_2)")
    # ---- adapters -----------------------------------------------------------------------------
    n_features: int = _f(8192, "features per layer")
    dec_bias: bool = _f(True, "decoder bias")
    activation: str = _f("relu", "feature activation", ("relu", "topk", "jumprelu"))
    topk: Optional[int] = _f(None, "k for activation 'topk'")
    adapter_dtype: str = _f("float32", "dtype of the adapter parameters and optimizer state",
                            ("float32", "bfloat16"))
    # ---- objective: lambda_adapt*KL + l1_weight*S + lambda_nmse*NMSE + lambda_bridge*B ---------
    lambda_adapt: float = _f(1.0, "weight of KL(reference || adapted)")
    l1_weight: float = _f(1e-3, "weight of the sparsity term S")
    lambda_nmse: float = _f(1.0, "weight of the hidden-state NMSE")
    lambda_bridge: float = _f(2.0, "weight of the bridging KL B")
    n_cutoffs: int = _f(1, "cut-off layers sampled per micro-batch for the bridging passes")
    batch_reduction: str = _f("token", "how a micro-batch's tokens are pooled in every term's mean: 'token' "
                              "pools all of them (the original's), 'sequence' takes each sequence's mean, then "
                              "the mean over sequences (equal at micro_batch_size 1)", ("token", "sequence"))
    kl_chunk_tokens: int = _f(1024, "tokens per chunk of the full-vocabulary KL")
    gradient_checkpointing: bool = _f(False, "recompute each layer in backward instead of keeping its activations")
    fsdp: bool = _f(False, "shard every decoder layer of both models, the adapters and their optimizer state "
                    "across the processes (FSDP2; under torchrun) instead of a whole copy per process (DDP)")
    # ---- data ---------------------------------------------------------------------------------
    train_data: str = _f("", "training data: .jsonl/.json/.parquet, a saved HF dataset, or a hub name")
    train_split: str = _f("train", "split of a saved/hub dataset")
    val_data: Optional[str] = _f(None, "validation data (default: val_size examples held out from train_data)")
    val_split: str = _f("validation", "split of a saved/hub validation dataset")
    val_size: int = _f(0, "examples held out from train_data when val_data is not given")
    chat_format: str = _f("deepseek", "prompt format of chat records", ("deepseek", "chatml"))
    max_seq_len: int = _f(10000, "tokens per sequence")
    truncation: str = _f("truncate", "longer sequences: keep the first max_seq_len tokens, or drop them",
                         ("truncate", "drop"))
    loss_on_prompt: bool = _f(True, "score the KL at the prompt positions too (else only the assistant's); "
                              "S and NMSE always cover every real token")
    append_eos: bool = _f(False, "deepseek format: end each assistant turn with <｜end▁of▁sentence｜>, as "
                          "DeepSeek's chat template does (the original's data rendering does not)")
    max_train_examples: Optional[int] = _f(None, "use at most this many training examples")
    max_val_examples: Optional[int] = _f(256, "use at most this many validation examples")
    # ---- optimisation -------------------------------------------------------------------------
    learning_rate: float = _f(8e-4, "peak AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    warmup_ratio: float = _f(0.05, "fraction of the steps with linear warmup")
    min_lr_ratio: float = _f(0.0, "the cosine decays to learning_rate * min_lr_ratio")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    micro_batch_size: int = _f(1, "sequences per forward, per process")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step")
    num_epochs: float = _f(1.0, "epochs over the training data (when max_steps is not set)")
    max_steps: Optional[int] = _f(None, "optimizer steps (overrides num_epochs)")
    seed: int = _f(0, "seed of the adapter initialisation, data order and cut-off sampling")
    device: str = _f("auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'")
    num_threads: Optional[int] = _f(None, "torch CPU threads per process (default: torch's)")
    # ---- run, logging, checkpoints ------------------------------------------------------------
    output_dir: str = _f("runs/default", "where metrics, checkpoints and the final model go")
    log_every: int = _f(1, "steps between metric lines")
    save_every: int = _f(0, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(2, "most recent checkpoints kept")
    resume_from: Optional[str] = _f(None, "checkpoint directory to resume, or 'latest' (the newest in output_dir)")
    overwrite_output_dir: bool = _f(False, "start afresh in an output_dir that holds an earlier run, deleting its "
                                    "checkpoints, metrics, summary and final model (without this or resume_from, "
                                    "such a run is refused)")
    halt_at_step: Optional[int] = _f(None, "stop (with a checkpoint) after this step, as if interrupted")
    save_final_model: bool = _f(True, "save the adapted model with save_pretrained at the end")
    progress_bar: bool = _f(True, "show a progress bar (rank 0; progress lines instead when not on a terminal)")
    report_to: str = _f("none", "also log to wandb or tensorboard", ("none", "wandb", "tensorboard"))
    wandb_project: str = _f("transcoder-adapters", "wandb project")
    # ---- evaluation ---------------------------------------------------------------------------
    eval_every: int = _f(0, "steps between validations (0: at the start and the end only)")
    val_batch_size: int = _f(8, "sequences per validation forward")
    dead_after_tokens: int = _f(10_000_000, "a feature that has not fired for this many training tokens is dead")
    n_generations: int = _f(0, "held-out prompts to complete greedily with the hybrid, adapted and "
                            "reference models at the end (0: none)")
    max_new_tokens: int = _f(128, "tokens per sample generation")
    hesitation_word: str = _f("Wait", "the word counted in the sample generations")

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "Config":
        errs = []
        for f in dataclasses.fields(self):
            ch = f.metadata.get("choices")
            v = getattr(self, f.name)
            if ch and v not in ch:
                errs.append(f"{f.name}: {v!r} is not one of {list(ch)}")
        for name in ("n_features", "n_cutoffs", "kl_chunk_tokens", "max_seq_len", "micro_batch_size",
                     "grad_accum_steps", "log_every", "keep_checkpoints", "val_batch_size", "dead_after_tokens",
                     "max_new_tokens"):
            if getattr(self, name) < 1:
                errs.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_examples", "max_val_examples", "topk", "halt_at_step", "num_threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                errs.append(f"{name}: must be >= 1 or null, got {v}")
        for name in ("lambda_adapt", "l1_weight", "lambda_nmse", "lambda_bridge", "weight_decay", "max_grad_norm",
                     "adam_eps"):
            if getattr(self, name) < 0:
                errs.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("save_every", "eval_every", "val_size", "n_generations"):
            if getattr(self, name) < 0:
                errs.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            errs.append(f"learning_rate: must be > 0, got {self.learning_rate}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                errs.append(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                errs.append(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.num_epochs <= 0 and self.max_steps is None:
            errs.append("num_epochs: must be > 0 when max_steps is not set")
        if self.activation == "topk" and self.topk is None:
            errs.append("topk: activation 'topk' needs topk (features per token)")
        if self.topk is not None and self.topk > self.n_features:
            errs.append(f"topk: {self.topk} > n_features {self.n_features}")
        for name in ("base_model", "reference_model", "train_data", "output_dir"):
            if not getattr(self, name):
                errs.append(f"{name}: must be given")
        if not self.hesitation_word:
            errs.append("hesitation_word: must not be empty")
        if self.overwrite_output_dir and self.resume_from == "latest":
            errs.append("overwrite_output_dir: cannot be combined with resume_from 'latest' (resuming continues "
                        "the run in output_dir, overwriting deletes it); choose one")
        if errs:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errs))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)

# The functions below read and check the fields of a config dataclass, ``schema``: the adapter loop's
# Config by default; the transcoder loop passes its own (training/transcoders.py), with its command.
PROGRAMS = {Config: "python -m training.train"}


def _fields(schema) -> dict:
    return {f.name: f for f in dataclasses.fields(schema)}


def _hints(schema) -> dict:
    return typing.get_type_hints(schema)


def _program(schema) -> str:
    return PROGRAMS.get(schema, "python -m training.train")


def field_names(schema=Config) -> list:
    return list(_fields(schema))


def _suggest(name, prefix: str = "", schema=Config) -> str:
    """"did you mean ...?" for an unknown field name (listing all ~60 fields would bury the answer)."""
    close = difflib.get_close_matches(str(name).replace("-", "_"), list(_fields(schema)), n=3)
    if close:
        return "did you mean " + " or ".join(prefix + c for c in close) + "?"
    return f"no field is close; {_program(schema)} --help lists them all"


def _base_type(tp):
    """(python type, optional?) of a field annotation."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(name: str, value: Any, from_cli: bool = False, schema=Config):
    """``value`` as the type of field ``name``; ConfigError naming the field and type otherwise."""
    if name not in _fields(schema):
        raise ConfigError(f"unknown config key {name!r} ({_suggest(name, schema=schema)})")
    tp, optional = _base_type(_hints(schema)[name])
    tname = tp.__name__ + (" or null" if optional else "")
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: expected {tname}, got null")
    bad = ConfigError(f"{name}: expected {tname}, got {value!r} ({type(value).__name__})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer() and not from_cli:
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad from None
                if f.is_integer() and abs(f) < 2**53:
                    return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if from_cli:
            return str(value)
        raise bad
    raise ConfigError(f"{name}: unsupported field type {tp}")  # pragma: no cover


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path!r}: cannot read it as YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping of keys to values")
    return data


def _yaml_problem(e) -> str:
    """PyYAML's error as 'line L, column C: problem (context from line ...)', lines counted from 1."""
    m = e.problem_mark
    text = f"line {m.line + 1}, column {m.column + 1}: {e.problem}" if m is not None else str(e.problem)
    if e.context:
        cm = e.context_mark
        text += f" ({e.context}" + (f" from line {cm.line + 1}, column {cm.column + 1}" if cm is not None else "") + ")"
    return text


def _resolve_path(value: Optional[str], base_dir: str) -> Optional[str]:
    """Paths in a YAML file that start with ./ or ../ are relative to the file."""
    if isinstance(value, str) and value.startswith(("./", "../")):
        return os.path.normpath(os.path.join(base_dir, value))
    return value


PATH_FIELDS = ("base_model", "reference_model", "tokenizer", "train_data", "val_data", "model", "cache_dir")


def from_dict(values: dict, from_cli: bool = False, source: Optional[str] = None, schema=Config) -> dict:
    """``values`` typed as the fields they name; ``source`` (e.g. the YAML file) prefixes the errors."""
    where = f"{source}: " if source else ""
    fields = _fields(schema)
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ConfigError(where + "; ".join(f"unknown config key {k!r} ({_suggest(k, schema=schema)})"
                                            for k in unknown))
    try:
        return {k: coerce(k, v, from_cli, schema) for k, v in values.items()}
    except ConfigError as e:
        raise ConfigError(where + str(e)) from None


def parse_overrides(argv: list, schema=Config) -> tuple:
    """``[--config PATH] [--field value | --field=value ...]`` -> (config path or None, {field: raw})."""
    FIELDS, _HINTS = _fields(schema), _hints(schema)
    cfg_path, out, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; expected --field value "
                              f"({_program(schema)} --help lists the fields)")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key != "config" and key not in FIELDS:
            raise ConfigError(f"unknown option --{key} ({_suggest(key, '--', schema)})")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_bool = key in FIELDS and _base_type(_HINTS[key])[0] is bool
            if is_bool and (nxt is None or nxt.startswith("--")):
                val = "true"  # a bool flag given alone, e.g. --overwrite_output_dir
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value")
            else:
                val = nxt
                i += 1
        i += 1
        if key == "config":
            cfg_path = val
        else:
            out[key] = val
    return cfg_path, out


def yaml_values(path: str, schema=Config) -> dict:
    """The typed values of the YAML file ``path``, its ./ and ../ paths resolved."""
    values = from_dict(load_yaml(path), source=f"config file {path!r}", schema=schema)
    base_dir = os.path.dirname(os.path.abspath(path))
    for k in PATH_FIELDS:
        if k in values:
            values[k] = _resolve_path(values[k], base_dir)
    return values


def load_config(argv: Optional[list] = None, default_config: str = DEFAULT_CONFIG, schema=Config):
    """The configuration for ``argv`` (the YAML file of ``--config``, default tiny.yaml, then the
    overrides), validated; a ``schema`` instance (the adapter loop's Config by default)."""
    argv = list(argv or [])
    cfg_path, overrides = parse_overrides(argv, schema)
    path = cfg_path or default_config
    values = yaml_values(path, schema)
    values.update(from_dict(overrides, from_cli=True, schema=schema))
    cfg = schema(**values)
    cfg.config_path = path  # not a field: where the YAML came from
    return cfg.validate()


def config_path_of(argv: list) -> Optional[str]:
    """The path after ``--config`` (or ``--config=``) in ``argv``, without checking anything else."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.partition("=")[2]
    return None


def _shown(name: str, value) -> str:
    # resolved model and data paths read better relative to where the command runs
    if name in PATH_FIELDS and isinstance(value, str) and os.path.isabs(value):
        rel = os.path.relpath(value)
        if not rel.startswith(".."):
            return repr(rel)
    return repr(value)


def help_text(config_path: Optional[str] = None, schema=Config, default_config: str = DEFAULT_CONFIG) -> str:
    """Every field with the default that applies: the value in ``config_path`` (default: tiny.yaml,
    what a run without --config uses) and, where that differs from it, the built-in default too."""
    path = config_path or default_config
    values = yaml_values(path, schema)
    _HINTS = _hints(schema)
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    source = (f"{shown} (given by --config)" if config_path else
              f"{shown}, which a run without --config uses")
    lines = [f"usage: {_program(schema)} [--config FILE.yaml] [--field value ...]", "",
             "Every field can be set in the YAML file or as --field value (the command line wins); a bool field",
             "given alone (e.g. --overwrite_output_dir) is true.", "",
             f"Defaults below are those of {source}.",
             "[built-in X] marks a value that differs from the built-in default X, which a --config file that",
             "does not set the field gets.",
             "", "fields:"]
    for f in dataclasses.fields(schema):
        tp, opt = _base_type(_HINTS[f.name])
        t = tp.__name__ + ("?" if opt else "")
        ch = f.metadata.get("choices")
        default = _shown(f.name, values.get(f.name, f.default))
        if f.name in values and values[f.name] != f.default:
            default += f" [built-in {f.default!r}]"
        lines.append(f"  --{f.name} ({t}, default {default}{', one of ' + '/'.join(ch) if ch else ''})")
        lines.append(f"      {f.metadata['doc']}")
    return "\n".join(lines)
