"""Validation metrics and sample generations.

``validate``: on the validation set, against the reference model,

* ``kl`` / ``top1``: KL(reference || adapted) (per-sequence mean over scored positions, then the
  mean over sequences, as the original's validation of one sequence at a time) and the fraction of scored positions where the two models'
  most likely next tokens agree; the same for the **hybrid start** (``kl_hybrid``, ``top1_hybrid``:
  the adapted model with its adapters off, which is where training starts);
* ``nmse_layers``: NMSE of the adapted model's hidden states (embeddings, then every layer) over
  every real token, per sequence, then the mean over sequences;
* ``l0_layers``: active features per real token, per layer;
* ``dead_layers``: features that have not fired during the last ``dead_after_tokens`` training
  tokens (of all processes), per layer, from the counters the training loop keeps.

``sample_generations``: greedy completions of held-out prompts by the hybrid, the adapted model
and the reference, and how often each writes the hesitation word.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from tckernels.models import adapters_enabled, l0_per_layer, record_features
from tckernels.nn.metrics import dead_features
from training import forward_utils as fu
from training.data import iterate_batches, prompt_ids
from training.losses import kl_and_agreement, nmse_per_layer, sequence_weights


@torch.no_grad()
def _kl_top1(stack_a, hs_final_a, stack_r, hr_final, sel, chunk):
    kl_tok, agree = kl_and_agreement(hs_final_a, stack_a.lm_head, hr_final, stack_r.lm_head, chunk)
    w = sequence_weights(sel)[sel]
    return (w * kl_tok).sum(), agree.float().sum(), agree.numel()


@torch.no_grad()
def validate(objective, examples: Sequence, pad_token_id: int, batch_size: int, device,
             with_hybrid: bool = True, dead_counters: Optional[torch.Tensor] = None,
             dead_after_tokens: Optional[int] = None) -> dict:
    """Validation metrics (see the module docstring) as plain Python numbers and lists."""
    A, R, chunk = objective.A, objective.R, objective.chunk
    adapters = objective.adapters
    layers = sorted(adapters)
    L = A.n_layers
    acc = {"kl": 0.0, "agree": 0.0, "kl_h": 0.0, "agree_h": 0.0, "n_pos": 0, "n_seq": 0, "n_real": 0}
    nmse_sum = torch.zeros(L + 1, dtype=torch.float64)
    nmse_h_sum = torch.zeros(L + 1, dtype=torch.float64)
    l0_sum = torch.zeros(len(layers), dtype=torch.float64)
    for batch in iterate_batches(examples, batch_size, pad_token_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        sel = batch["loss_mask"].bool()
        real = batch["attention_mask"].bool()
        n_seq = int((sel.sum(-1) > 0).sum())
        n_pos = int(sel.sum())
        n_real = int(real.sum())
        inputs = fu.BatchInputs(batch["input_ids"], batch["attention_mask"])
        hs_r = fu.free_run(R, inputs)
        hr_final = fu.final_hidden(R, hs_r[-1])[sel]

        with record_features(objective.adapted) as feats:
            hs_a = fu.free_run(A, inputs)
        l0 = l0_per_layer(feats, real)
        for j, i in enumerate(layers):
            l0_sum[j] += float(l0[i]) * n_real
        kl, agree, _ = _kl_top1(A, fu.final_hidden(A, hs_a[-1])[sel], R, hr_final, sel, chunk)
        acc["kl"] += float(kl) * n_seq
        acc["agree"] += float(agree)
        nmse_sum += nmse_per_layer(hs_a, hs_r, real, "sequence").double().cpu() * n_seq
        if with_hybrid:
            with adapters_enabled(objective.adapted, False):
                hs_h = fu.free_run(A, inputs)
                kl_h, agree_h, _ = _kl_top1(A, fu.final_hidden(A, hs_h[-1])[sel], R, hr_final, sel, chunk)
            acc["kl_h"] += float(kl_h) * n_seq
            acc["agree_h"] += float(agree_h)
            nmse_h_sum += nmse_per_layer(hs_h, hs_r, real, "sequence").double().cpu() * n_seq
        acc["n_pos"] += n_pos
        acc["n_seq"] += n_seq
        acc["n_real"] += n_real
    n_seq, n_pos, n_real = max(1, acc["n_seq"]), max(1, acc["n_pos"]), max(1, acc["n_real"])
    out = {
        "kl": acc["kl"] / n_seq,
        "top1": acc["agree"] / n_pos,
        "nmse": float(nmse_sum.mean() / n_seq),
        "nmse_layers": (nmse_sum / n_seq).tolist(),
        "l0": float(l0_sum.mean() / n_real),
        "l0_layers": (l0_sum / n_real).tolist(),
        "n_sequences": acc["n_seq"],
        "n_positions": acc["n_pos"],
    }
    if with_hybrid:
        out.update({"kl_hybrid": acc["kl_h"] / n_seq, "top1_hybrid": acc["agree_h"] / n_pos,
                    "nmse_hybrid": float(nmse_h_sum.mean() / n_seq)})
    if dead_counters is not None and dead_after_tokens is not None:
        dead = dead_features(dead_counters, dead_after_tokens).sum(-1)
        out["dead_layers"] = [int(x) for x in dead]
        out["dead_fraction"] = float(dead.sum()) / dead_counters.numel()
    return out


# --------------------------------------------------------------------------------------------------
# sample generations
# --------------------------------------------------------------------------------------------------
def left_padded(prompts: Sequence[list], pad: int, device) -> tuple:
    """``(input_ids, attention_mask)`` ``[len(prompts), longest]`` of token-id lists, padded on the left
    (so every prompt ends where generation begins), on ``device``."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    attn = torch.zeros(len(prompts), T, dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, T - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[j, T - len(p):] = 1
    return ids.to(device), attn.to(device)


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: Sequence[list], max_new_tokens: int, device,
                       batch_size: int = 32) -> list:
    """Greedy completions (token id lists, up to the end-of-sequence token) of left-padded prompts."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, attn = left_padded(prompts[s:s + batch_size], pad, device)
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for row in gen[:, ids.shape[1]:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            out.append(row)
    return out


def last_assistant_text(record) -> Optional[str]:
    msgs = record.get("messages", record.get("conversations")) if isinstance(record, dict) else None
    if isinstance(msgs, list) and msgs:
        m = msgs[-1]
        if m.get("role", m.get("from")) in ("assistant", "gpt"):
            return m.get("content", m.get("value"))
    if isinstance(record, dict) and isinstance(record.get("completion"), str):
        return record["completion"]
    return None


@torch.no_grad()
def sample_generations(objective, tokenizer, records: Sequence, chat_format: str, n: int, max_new_tokens: int,
                       hesitation_word: str, device) -> dict:
    """Complete the prompts of the first ``n`` records greedily with the hybrid (adapters off), the
    adapted model and the reference. Per model: ``hesitation_rate`` (completions containing the
    word), ``match_rate`` (completions equal to the record's own answer, when it has one),
    ``mean_tokens`` and a few ``examples``."""
    records = [r for r in records if isinstance(r, dict)][:n]
    prompts = [prompt_ids(r, chat_format, tokenizer, where=f"generation record {i}") for i, r in enumerate(records)]
    answers = [last_assistant_text(r) for r in records]
    adapted, reference = objective.adapted, objective.reference
    results = {}
    for name in ("hybrid", "adapted", "reference"):
        if name == "reference":
            toks = greedy_completions(reference, tokenizer, prompts, max_new_tokens, device)
        else:
            with adapters_enabled(adapted, name == "adapted"):
                toks = greedy_completions(adapted, tokenizer, prompts, max_new_tokens, device)
        texts = [tokenizer.decode(t) for t in toks]
        known = [(t, a) for t, a in zip(texts, answers) if a is not None]
        results[name] = {
            "hesitation_rate": sum(hesitation_word in t for t in texts) / max(1, len(texts)),
            "match_rate": (sum(t.strip() == a.strip() for t, a in known) / len(known)) if known else None,
            "mean_tokens": sum(len(t) for t in toks) / max(1, len(toks)),
            "examples": texts[:3],
        }
    results["n"] = len(records)
    results["prompts"] = [tokenizer.decode(p) for p in prompts[:3]]
    return results
