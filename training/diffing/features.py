"""Adapter feature statistics on a run's held-out data: how often each feature fires, its
top-activating examples, and where in a conversation it fires (prompt, reasoning or answer).

:func:`feature_statistics` runs the adapted model (adapters on) over ``run.val_ex`` batch by batch
and keeps per-feature accumulators only (``[F]`` counts, ``[F, n_examples]`` top lists): it never
builds ``[tokens, n_features]`` activations or keeps per-token data of the whole set. It returns
plain numbers (a JSON-able dict); the report plots them.

Segments. Each real token of an example is in one of

* ``"prompt"``: the positions before the assistant's response (the prompt's length is that of
  :func:`training.data.prompt_ids`, which ends with the assistant header);
* ``"reasoning"``: response tokens before the answer;
* ``"answer"``: from the token holding the first character of ``answer_marker`` in the response on
  (the first occurrence), or, when ``reasoning_end`` is given (e.g. ``"</think>"``), from the token
  after the one that completes it. A response without the marker is all reasoning.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from tckernels.models import adapters_enabled, record_features
from tckernels.models.surgery import selected_adapters
from training import checkpoint as ckpt
from training.data import DataError, iterate_batches, prompt_ids

__all__ = ["feature_statistics", "SEGMENTS", "DENSITY_BIN_EDGES"]

SEGMENTS = ("prompt", "reasoning", "answer")
# log10(density) histogram: -6 .. 0 in steps of 0.25 (a density of exactly 1 falls in the last bin)
DENSITY_BIN_EDGES = [-6.0 + 0.25 * i for i in range(25)]


# --------------------------------------------------------------------------------------------------
# segments of each example
# --------------------------------------------------------------------------------------------------
def _decode(tokenizer, ids: Sequence[int]) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except TypeError:  # a tokenizer without the HF keyword arguments (the character tokenizer)
        return tokenizer.decode(list(ids))


def _tokens_reaching(tokenizer, ids: Sequence[int], n_chars: int) -> int:
    """The fewest leading tokens of ``ids`` whose text has at least ``n_chars`` characters
    (binary search over prefix decodes; ``len(ids)`` when even all of them fall short)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_decode(tokenizer, ids[:mid])) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _prompt_length(record, fmt: str, tokenizer, where: str) -> Tuple[int, List[int]]:
    if isinstance(record, dict) and "text" in record and not any(
            k in record for k in ("messages", "conversations", "prompt")):
        return 0, []  # plain text: every token is a response token
    ids = prompt_ids(record, fmt, tokenizer, where=where)
    return len(ids), list(ids)


def _segment_bounds(run, answer_marker: str, reasoning_end: Optional[str]) -> List[dict]:
    """Per example of ``run.val_ex``: its record index, ``prompt_end`` and ``answer_start`` (token
    positions; prompt = ``[0, prompt_end)``, reasoning = ``[prompt_end, answer_start)``, answer =
    ``[answer_start, len)``).

    ``prepare_examples`` drops records with nothing to score (and over-long ones with truncation
    ``drop``) in order, so each example is matched to the next record whose prompt it starts with."""
    tok, fmt = run.tokenizer, run.cfg.chat_format
    out, r = [], 0
    for j, ex in enumerate(run.val_ex):
        ids = list(ex.input_ids)
        while True:
            if r >= len(run.val_records):
                raise DataError(f"held-out example {j} matches no record of val_records (not the records "
                                f"val_ex was made from?)")
            P, p_ids = _prompt_length(run.val_records[r], fmt, tok, f"held-out record {r}")
            n = min(P, len(ids))
            if ids[:n] == p_ids[:n]:
                break
            r += 1
        prompt_end = min(P, len(ids))
        response = ids[prompt_end:]
        answer_start = len(ids)
        marker = reasoning_end if reasoning_end else answer_marker
        if marker and response:
            at = _decode(tok, response).find(marker)
            if at >= 0:
                if reasoning_end:
                    k = _tokens_reaching(tok, response, at + len(marker))
                else:
                    k = _tokens_reaching(tok, response, at + 1) - 1
                answer_start = prompt_end + k
        out.append({"record": r, "prompt_end": prompt_end, "answer_start": answer_start})
        r += 1
    return out


def _segment_labels(bounds: Sequence[dict], lengths: Sequence[int], T: int) -> torch.Tensor:
    """``[B, T]`` int64: 0/1/2 for prompt/reasoning/answer tokens, -1 for padding."""
    seg = torch.full((len(bounds), T), -1, dtype=torch.long)
    for b, (bd, n) in enumerate(zip(bounds, lengths)):
        p, a = bd["prompt_end"], bd["answer_start"]
        seg[b, :p] = 0
        seg[b, p:a] = 1
        seg[b, a:n] = 2
    return seg


# --------------------------------------------------------------------------------------------------
# per-layer accumulators
# --------------------------------------------------------------------------------------------------
class _LayerAccumulator:
    """Counts and a streaming top-n per feature of one layer. Candidates must arrive in stream order
    (example, then position): ties in value then keep the earliest token, whatever the batching."""

    def __init__(self, n_features: int, n_top: int):
        F = n_features
        self.F, self.n = F, n_top
        self.n_tokens = 0
        self.n_active = 0
        self.counts = torch.zeros(F, dtype=torch.long)
        self.seg_counts = torch.zeros(len(SEGMENTS), F, dtype=torch.long)
        self.value_sum = torch.zeros(F, dtype=torch.float64)
        self.top_val = torch.full((F, n_top), -math.inf, dtype=torch.float32)
        self.top_ex = torch.full((F, n_top), -1, dtype=torch.long)
        self.top_pos = torch.full((F, n_top), -1, dtype=torch.long)

    def add(self, f: torch.Tensor, v: torch.Tensor, e: torch.Tensor, p: torch.Tensor, s: torch.Tensor,
            n_tokens: int) -> None:
        """One batch's active entries (feature, value, example, position, segment), in stream order."""
        F = self.F
        self.n_tokens += n_tokens
        self.n_active += f.numel()
        self.counts += torch.bincount(f, minlength=F)
        self.seg_counts += torch.bincount(s * F + f, minlength=len(SEGMENTS) * F).view(len(SEGMENTS), F)
        self.value_sum += torch.bincount(f, weights=v.double(), minlength=F)
        if self.n:
            self._merge_top(f, v, e, p)

    def _merge_top(self, f, v, e, p) -> None:
        keep = v > self.top_val[f, -1]  # only values that beat a feature's current n-th best
        f, v, e, p = f[keep], v[keep], e[keep], p[keep]
        if not f.numel():
            return
        touched = torch.zeros(self.F, dtype=torch.bool)
        touched[f] = True
        old = (self.top_val > -math.inf) & touched[:, None]
        of = torch.arange(self.F).unsqueeze(1).expand(-1, self.n)[old]
        # the current entries first: among equal values they are the earlier tokens
        f = torch.cat([of, f])
        v = torch.cat([self.top_val[old], v])
        e = torch.cat([self.top_ex[old], e])
        p = torch.cat([self.top_pos[old], p])
        order = torch.sort(-v, stable=True).indices
        order = order[torch.sort(f[order], stable=True).indices]  # by (feature, -value, stream order)
        f, v, e, p = f[order], v[order], e[order], p[order]
        counts = torch.bincount(f, minlength=self.F)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(f.numel()) - starts[f]
        k = rank < self.n
        self.top_val[f[k], rank[k]] = v[k]
        self.top_ex[f[k], rank[k]] = e[k]
        self.top_pos[f[k], rank[k]] = p[k]


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
def _density_histogram(density: torch.Tensor) -> dict:
    fired = density > 0
    lg = torch.log10(density[fired])
    lo, step, nb = DENSITY_BIN_EDGES[0], DENSITY_BIN_EDGES[1] - DENSITY_BIN_EDGES[0], len(DENSITY_BIN_EDGES) - 1
    below = lg < lo
    b = torch.clamp(torch.floor((lg[~below] - lo) / step + 1e-9).long(), 0, nb - 1)
    return {"bin_edges": list(DENSITY_BIN_EDGES), "counts": torch.bincount(b, minlength=nb).tolist(),
            "below_range": int(below.sum()), "never_fired": int((~fired).sum())}


def _training_dead(run, layers: Sequence[int]) -> Tuple[Optional[Dict[int, int]], Optional[int]]:
    """Dead features by the training counters (``silent_for`` of the newest checkpoint's trainer
    state, against ``cfg.dead_after_tokens``), and the training tokens seen; ``(None, None)`` when
    the run has no such checkpoint."""
    path = ckpt.latest_checkpoint(run.run_dir) if run.run_dir else None
    threshold = getattr(run.cfg, "dead_after_tokens", None)
    if path is None or not threshold:
        return None, None
    try:
        state = torch.load(os.path.join(path, ckpt.TRAINER), map_location="cpu", weights_only=False)
    except Exception:
        return None, None
    silent = state.get("silent_for") if isinstance(state, dict) else None
    if not isinstance(silent, torch.Tensor) or silent.dim() != 2 or silent.shape[0] <= max(layers):
        return None, None
    dead = {i: int((silent[i] >= threshold).sum()) for i in layers}
    return dead, state.get("tokens")


class _Contexts:
    """Token texts (decoded one token id at a time, cached) and context strings around a token."""

    def __init__(self, tokenizer, examples, before: int, after: int):
        self.tok, self.examples, self.before, self.after = tokenizer, examples, before, after
        self.cache: Dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = _decode(self.tok, [token_id])
        return self.cache[token_id]

    def around(self, example: int, pos: int) -> Tuple[str, str]:
        ids = self.examples[example].input_ids
        left = "".join(self.text(t) for t in ids[max(0, pos - self.before):pos])
        right = "".join(self.text(t) for t in ids[pos + 1:pos + 1 + self.after])
        token = self.text(ids[pos])
        return token, f"{left}«{token}»{right}"


def _layer_result(acc: _LayerAccumulator, seg_tokens: List[int], ctx: _Contexts, bounds, dead_training) -> dict:
    n_tok = max(acc.n_tokens, 1)
    density = acc.counts.double() / n_tok
    fired = acc.counts > 0
    total_firings = int(acc.counts.sum())
    # where features fire
    seg_rate = acc.seg_counts.double() / torch.tensor(seg_tokens, dtype=torch.float64).clamp(min=1)[:, None]
    share = acc.seg_counts.double() / acc.counts.double().clamp(min=1)
    rate_share = seg_rate / seg_rate.sum(0).clamp(min=1e-300)
    enrichment = {}
    for j, name in enumerate(SEGMENTS):
        fire_share = int(acc.seg_counts[j].sum()) / max(total_firings, 1)
        tok_share = seg_tokens[j] / n_tok
        enrichment[name] = fire_share / tok_share if tok_share > 0 else None
    segments = {
        "tokens": dict(zip(SEGMENTS, seg_tokens)),
        "firings": {name: int(acc.seg_counts[j].sum()) for j, name in enumerate(SEGMENTS)},
        "enrichment": enrichment,
        "mostly": {name: int(((share[j] > 0.5) & fired).sum()) for j, name in enumerate(SEGMENTS)},
        "mostly_normalised": {name: int(((rate_share[j] > 0.5) & fired).sum()) for j, name in enumerate(SEGMENTS)},
        "fire_counts": {name: acc.seg_counts[j].tolist() for j, name in enumerate(SEGMENTS)},
    }
    # top-activating examples of the features that fired
    top: Dict[str, list] = {}
    top_val, top_ex, top_pos = acc.top_val.tolist(), acc.top_ex.tolist(), acc.top_pos.tolist()
    for f in torch.nonzero(fired).flatten().tolist():
        rows = []
        for value, e, p in zip(top_val[f], top_ex[f], top_pos[f]):
            if e < 0:  # an empty slot: the feature fired on fewer tokens than n_examples
                break
            token, context = ctx.around(e, p)
            bd = bounds[e]
            seg = 0 if p < bd["prompt_end"] else (1 if p < bd["answer_start"] else 2)
            rows.append({"value": value, "example": e, "record": bd["record"], "position": p,
                         "segment": SEGMENTS[seg], "token": token, "context": context})
        top[str(f)] = rows
    mean_value = torch.where(fired, acc.value_sum / acc.counts.double().clamp(min=1), torch.zeros(()))
    return {
        "n_features": acc.F,
        "n_tokens": acc.n_tokens,
        "l0": acc.n_active / n_tok,
        "fire_counts": acc.counts.tolist(),
        "density": density.tolist(),
        "mean_value": mean_value.tolist(),
        "density_histogram": _density_histogram(density),
        "dead": {"held_out": int((~fired).sum()), "training": dead_training},
        "segments": segments,
        "top_examples": top,
    }


# --------------------------------------------------------------------------------------------------
# the statistics
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def feature_statistics(run, layers: Optional[Iterable[int]] = None, batch_size: int = 16, n_examples: int = 8,
                       context_tokens: int = 12, answer_marker: str = "Answer:",
                       reasoning_end: Optional[str] = None, context_after: int = 4) -> dict:
    """Feature statistics of ``run.adapted`` (adapters on) on the held-out examples ``run.val_ex``.

    ``layers``: adapter layers (default: all); ``n_examples``: top-activating examples kept per
    feature; ``context_tokens`` / ``context_after``: tokens shown before / after an example's token.
    Only real tokens (the attention mask) count. Returns::

        {"layers": [layer, ...], "n_sequences", "n_tokens", "segment_tokens": {segment: tokens},
         "examples_without_answer": examples with no answer tokens (no answer marker, or no
                                    reasoning_end when it is given, in the response),
         "answer_marker", "reasoning_end", "n_examples", "context_tokens", "context_after",
         "l0": mean of the layers' L0, "dead_held_out": sum over layers,
         "dead_after_tokens": the run's threshold, "training_tokens": tokens seen in training (or None),
         "per_layer": {str(layer): {
            "n_features", "n_tokens",
            "l0": active features per real token,
            "fire_counts": [F] tokens each feature was active on, "density": [F] fire_counts / n_tokens,
            "mean_value": [F] mean activation where active (0 when it never fired),
            "density_histogram": {"bin_edges": log10 edges (DENSITY_BIN_EDGES), "counts": per bin,
                                  "below_range": fired but under 10**-6, "never_fired"},
            "dead": {"held_out": features that never fired on these tokens,
                     "training": dead by the newest checkpoint's counters (silent for at least
                                 dead_after_tokens training tokens), or None without them},
            "segments": {"tokens": {segment: real tokens}, "firings": {segment: active entries},
                         "enrichment": {segment: share of firings / share of tokens (None: no tokens)},
                         "mostly": {segment: features with > 50% of their firings there},
                         "mostly_normalised": {segment: features with > 50% of their per-token
                                               firing rate there (rates per segment, normalised)},
                         "fire_counts": {segment: [F]}},
            "top_examples": {str(feature): [{"value", "example" (index in val_ex), "record"
                             (index in val_records), "position", "segment", "token", "context"
                             (the token marked «t»)}, ...]}   # fired features only, largest first
         }}}

    Segments are ``SEGMENTS`` (see the module docstring). Ties in value keep the earliest token.
    """
    for name, val in (("batch_size", batch_size), ("n_examples", n_examples),
                      ("context_tokens", context_tokens), ("context_after", context_after)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (1 if name == "batch_size" else 0):
            raise ValueError(f"{name} must be a {'positive' if name == 'batch_size' else 'non-negative'} int, "
                             f"got {val!r}")
    model = run.adapted
    mods = selected_adapters(model, layers, "layers")
    chosen = list(mods)
    bounds = _segment_bounds(run, answer_marker, reasoning_end)
    accs = {i: _LayerAccumulator(m.n_features, n_examples) for i, m in mods.items()}
    seg_tokens = [0] * len(SEGMENTS)
    pad = run.tokenizer.pad_token_id
    inner = getattr(model, "model", model)  # the decoder without the head: no [tokens, vocab] logits
    was_training = model.training
    model.eval()
    start = 0
    try:
        with adapters_enabled(model, True):  # the whole adapted model, whichever layers are recorded
            for batch in iterate_batches(run.val_ex, batch_size, pad):
                B, T = batch["input_ids"].shape
                real = batch["attention_mask"].bool()
                lengths = real.sum(-1).tolist()
                seg = _segment_labels(bounds[start:start + B], lengths, T)
                for j in range(len(SEGMENTS)):
                    seg_tokens[j] += int(((seg == j) & real).sum())
                with record_features(model, layers=chosen) as rec:
                    inner(input_ids=batch["input_ids"].to(run.device),
                          attention_mask=batch["attention_mask"].to(run.device), use_cache=False)
                n_real = int(real.sum())
                real_dev = real.to(run.device)
                for i in chosen:
                    values, indices = rec.tokens(i)
                    # the active entries only leave the device; nonzero is row-major: (example, position) order
                    b, t, w = torch.nonzero((values != 0) & real_dev[..., None], as_tuple=True)
                    f, v = indices[b, t, w].long().cpu(), values[b, t, w].float().cpu()
                    b, t = b.cpu(), t.cpu()
                    accs[i].add(f, v, b + start, t, seg[b, t], n_real)
                    del values, indices
                del rec
                start += B
    finally:
        model.train(was_training)

    dead_training, training_tokens = _training_dead(run, chosen)
    ctx = _Contexts(run.tokenizer, run.val_ex, context_tokens, context_after)
    per_layer = {str(i): _layer_result(accs[i], seg_tokens, ctx, bounds,
                                       None if dead_training is None else dead_training[i]) for i in chosen}
    n_tokens = sum(seg_tokens)
    return {
        "layers": chosen,
        "n_sequences": len(run.val_ex),
        "n_tokens": n_tokens,
        "segment_tokens": dict(zip(SEGMENTS, seg_tokens)),
        "examples_without_answer": sum(1 for bd, ex in zip(bounds, run.val_ex)
                                       if bd["answer_start"] >= len(ex.input_ids)),
        "answer_marker": answer_marker,
        "reasoning_end": reasoning_end,
        "n_examples": n_examples,
        "context_tokens": context_tokens,
        "context_after": context_after,
        "l0": sum(r["l0"] for r in per_layer.values()) / len(per_layer),
        "dead_held_out": sum(r["dead"]["held_out"] for r in per_layer.values()),
        "dead_after_tokens": getattr(run.cfg, "dead_after_tokens", None),
        "training_tokens": training_tokens,
        "per_layer": per_layer,
    }
