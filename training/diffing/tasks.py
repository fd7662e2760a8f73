"""Task evaluation (the paper's Figure 4): greedy completions of held-out prompts by the base, the
hybrid, the adapted model and the reference, scored for accuracy, response length and hesitation.

A completion is correct when its final answer equals the final answer of the record's own response
(:func:`final_answer`: the last ``\\boxed{...}``, else the text after the last ``Answer:``, else the
last number). The share of the reference's accuracy gain that the adapters recover is
``(adapted - base) / (reference - base)``; it is undefined (None) when the reference is not more
accurate than the base, which the report then says.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from tckernels.models import adapters_enabled
from training.data import prompt_ids
from training.evaluate import greedy_completions, last_assistant_text

MODELS = ("base", "hybrid", "adapted", "reference")
_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_ANSWER = re.compile(r"Answer:\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def final_answer(text: Optional[str]) -> Optional[str]:
    """The final answer written in ``text`` (normalised: spaces and a trailing period dropped), or
    None when it has none."""
    if not text:
        return None
    found = _BOXED.findall(text) or _ANSWER.findall(text)
    if found:
        ans = found[-1]
    else:
        nums = _NUMBER.findall(text)
        if not nums:
            return None
        ans = nums[-1]
    ans = ans.strip().rstrip(".").replace(" ", "")
    return ans or None


def hesitation_position(tokenizer, tokens: Sequence[int], word: str) -> Optional[int]:
    """Index of the token of ``tokens`` in which the first ``word`` begins (None when the decoded
    completion has no ``word``); found by bisection over decoded prefixes, so it holds for tokenizers
    whose tokens do not decode one by one (byte-level BPE)."""
    text = tokenizer.decode(list(tokens))
    c = text.find(word)
    if c < 0:
        return None
    lo, hi = 0, len(tokens) - 1  # the largest i whose prefix tokens[:i] ends at or before c
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(list(tokens[:mid]))) <= c:
            lo = mid
        else:
            hi = mid - 1
    return lo


def prompts_and_answers(run, records: Sequence) -> tuple:
    """(prompt token ids, reference final answers) of ``records``."""
    prompts = [prompt_ids(r, run.cfg.chat_format, run.tokenizer, where=f"held-out record {i}")
               for i, r in enumerate(records)]
    return prompts, [final_answer(last_assistant_text(r)) for r in records]


@torch.no_grad()
def complete(run, name: str, prompts: Sequence[list], max_new_tokens: int, batch_size: int = 32) -> list:
    """Greedy completions (token ids up to the end of sequence) by model ``name`` of :data:`MODELS`;
    the adapted model's interventions, if any, apply."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if name in ("base", "reference"):
        model = run.base if name == "base" else run.reference
        return greedy_completions(model, run.tokenizer, prompts, max_new_tokens, run.device, batch_size)
    with adapters_enabled(run.adapted, name == "adapted"):
        return greedy_completions(run.adapted, run.tokenizer, prompts, max_new_tokens, run.device, batch_size)


def score(run, completions: Sequence[list], answers: Sequence[Optional[str]], word: str) -> dict:
    """``accuracy`` (over the records with a known answer), ``mean_tokens``, ``hesitation_rate``
    (completions containing ``word``) and ``mean_hesitations`` (occurrences per completion)."""
    texts = [run.tokenizer.decode(list(t)) for t in completions]
    known = [(t, a) for t, a in zip(texts, answers) if a is not None]
    n = max(1, len(texts))
    return {
        "accuracy": sum(final_answer(t) == a for t, a in known) / len(known) if known else None,
        "mean_tokens": sum(len(t) for t in completions) / n,
        "hesitation_rate": sum(word in t for t in texts) / n,
        "mean_hesitations": sum(t.count(word) for t in texts) / n,
        "n": len(texts),
    }


def gain_recovered(base: Optional[float], model: Optional[float], reference: Optional[float]) -> Optional[float]:
    """``(model - base) / (reference - base)``; None unless the reference beats the base."""
    if None in (base, model, reference) or reference <= base:
        return None
    return (model - base) / (reference - base)


def task_evaluation(run, records: Sequence, max_new_tokens: int, word: str, batch_size: int = 32) -> tuple:
    """Score the four models on ``records``' prompts. Returns ``(numbers, completions)``: numbers =
    ``{"models": {name: score}, "gain_recovered": {"adapted", "hybrid"}, "gap_closed" (from the
    hybrid to the reference), "length_ratio": adapted / reference mean tokens, "examples": {name:
    first completions}, "n": records}``; completions =
    ``{name: token id lists}`` (for the hesitation analysis)."""
    prompts, answers = prompts_and_answers(run, records)
    completions = {name: complete(run, name, prompts, max_new_tokens, batch_size) for name in MODELS}
    scores = {name: score(run, completions[name], answers, word) for name in MODELS}
    acc = {name: s["accuracy"] for name, s in scores.items()}
    ref_len = scores["reference"]["mean_tokens"]
    numbers = {
        "models": scores,
        "gain_recovered": {m: gain_recovered(acc["base"], acc[m], acc["reference"]) for m in ("adapted", "hybrid")},
        # the hybrid is where training starts: how much of its distance to the reference is closed
        "gap_closed": gain_recovered(acc["hybrid"], acc["adapted"], acc["reference"]),
        "max_new_tokens": max_new_tokens,
        "length_ratio": scores["adapted"]["mean_tokens"] / ref_len if ref_len else None,
        "examples": {name: [run.tokenizer.decode(list(t)) for t in completions[name][:3]] for name in MODELS},
        "prompts": [run.tokenizer.decode(p) for p in prompts[:3]],
        "n": len(records),
    }
    return numbers, completions
