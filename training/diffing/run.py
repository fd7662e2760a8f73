"""A finished adapter run, loaded for analysis: its configuration, the adapted model (``final_model``),
the reference and base models it was trained against, the tokenizer and the held-out data."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from training import checkpoint as ckpt
from training.config import Config, ConfigError
from training.data import load_records
from training.loop import DTYPES, SetupError, load_model


@dataclass
class Run:
    run_dir: str
    cfg: Config
    adapted: torch.nn.Module   # the trained model; with its adapters off it is the hybrid
    reference: torch.nn.Module
    base: torch.nn.Module
    tokenizer: object
    val_ex: list               # held-out examples (token ids and loss masks)
    val_records: list          # the same records as read (prompts and reference answers)
    device: torch.device


def run_config(run_dir: str) -> Config:
    """The configuration the run was trained with (its newest checkpoint's ``config.json``)."""
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise SetupError(f"run_dir {run_dir!r}: no checkpoint in {ckpt.checkpoints_dir(run_dir)} (not the "
                         f"output_dir of a finished python -m training.train run?)")
    with open(os.path.join(path, "config.json")) as f:
        values = json.load(f)
    known = {k: v for k, v in values.items() if k in Config.__dataclass_fields__}
    try:
        return Config(**known).validate()
    except (TypeError, ConfigError) as e:
        raise SetupError(f"{path}/config.json: not a configuration this version reads ({e})") from None


def load_run(run_dir: str, device: str = "auto", max_val_examples: Optional[int] = None,
             dtype: Optional[str] = None) -> Run:
    """Load ``run_dir`` (an ``output_dir`` of ``python -m training.train`` with ``final_model/``)."""
    from transformers import AutoModelForCausalLM

    import tckernels.models  # noqa: F401  (registers the adapter model type)
    from training.data import load_tokenizer, prepare_examples

    final = os.path.join(run_dir, "final_model")
    if not os.path.isfile(os.path.join(final, "config.json")):
        raise SetupError(f"run_dir {run_dir!r}: no final_model/ (the run has not finished, or was run with "
                         f"save_final_model false)")
    cfg = run_config(run_dir)
    if dtype is not None:
        cfg.dtype = dtype
    if max_val_examples is not None:
        cfg.max_val_examples = max_val_examples
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    try:
        adapted = AutoModelForCausalLM.from_pretrained(final, dtype=DTYPES[cfg.dtype]).to(dev).eval()
    except Exception as e:
        raise SetupError(f"{final}: cannot load the adapted model ({type(e).__name__}: {e})") from None
    reference = load_model("reference_model", cfg.reference_model, cfg, dev)
    base = load_model("base_model", cfg.base_model, cfg, dev)
    for m in (adapted, reference, base):
        for p in m.parameters():
            p.requires_grad_(False)
    tokenizer = load_tokenizer(final)
    val_records = held_out_records(cfg)
    val_ex = prepare_examples(val_records, tokenizer=tokenizer, fmt=cfg.chat_format, loss_on_prompt=cfg.loss_on_prompt,
                              max_seq_len=cfg.max_seq_len, truncation=cfg.truncation,
                              vocab_size=reference.config.vocab_size, name="held-out data", append_eos=cfg.append_eos)
    return Run(run_dir, cfg, adapted, reference, base, tokenizer, val_ex, val_records, dev)


def held_out_records(cfg: Config) -> list:
    """The run's validation records (``val_data``, or the last ``val_size`` training records), at most
    ``max_val_examples``."""
    if cfg.val_data:
        records = load_records(cfg.val_data, cfg.val_split)
    elif cfg.val_size:
        records = load_records(cfg.train_data, cfg.train_split)[-cfg.val_size:]
    else:
        raise SetupError("the run has no held-out data (val_data or val_size) to analyse")
    return records[:cfg.max_val_examples] if cfg.max_val_examples else records
