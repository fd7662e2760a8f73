"""The hesitation experiment: which adapter features make the adapted model write the hesitation
word ("Wait"), and whether they are necessary and sufficient for it.

1. Attribution: for each held-out completion of the adapted model that hesitates, the
   log-probability of the hesitation word (its tokens as written, teacher-forced) is attributed to
   the adapter features active at the positions that predict it and every earlier one. Two methods:

   * ``path`` (the default): integrated gradients from the adapters' features all at zero to their
     values in the adapted model, every layer's features scaled together along the path while the
     rest of the network (attention, the base MLPs, the head) is recomputed. The scores are
     *complete*: they sum to ``log p_adapted(word) - log p_zero(word)`` (``gap`` in the result; up to
     the quadrature error of ``steps`` midpoints), so a set's share of the sum says how much of the
     hesitation it carries.
   * ``gradient``: gradient x activation at the adapted model (``f_i * d log p / d f_i``), one
     backward per completion; a first-order account that ignores saturation, so its ranking can miss
     features whose effect only shows along the way.

   Sums over positions and completions give a score per (layer, feature); only ``[tokens, k]``
   activations and ``[n_features]`` sums are ever made, and the head runs on the predicting
   positions only, so no ``[tokens, vocab]`` or ``[tokens, features]`` tensor exists.
2. The set: features ranked by positive attribution; the necessary prefix is the smallest (searched
   on a grid of sizes up to ``max_share`` of all adapter features) whose ablation removes at least
   ``target_removal`` of the adapted model's hesitations on the selection prompts, the sufficient
   prefix the smallest that, patched into the hybrid, makes it hesitate at least half as often as
   the adapted model (searched over every size). The set the causal tests use is the smallest prefix
   that is both, when one is within ``max_share`` (:func:`causal_set`), else the necessary one.
3. The causal tests, on other prompts than 1 and 2 used: ablating the set in the adapted model
   (hesitation rate, response length, accuracy), ablating a random set of the same size (the control),
   and adding the set to the hybrid: patched in at the values the adapted model gives it on the
   same tokens (:func:`patched_completions`), and, for comparison, encoded from the hybrid's own
   stream (the adapted model with every other feature ablated).
4. The decision point (:func:`decision_point`): greedy generation only shows whether the word wins
   the argmax, so sufficiency is also measured where it is decided: on each hesitating completion's
   own prefix, the log-probability of the word for the hybrid, the adapters with no features (their
   decoder biases alone, where the path attribution starts), the same with the top features of the
   ranking patched in (several set sizes) and the adapted model, and the share of the gap from no
   features to the adapted model that each set closes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

import torch

from tckernels.models import FeatureInterventions, ablate_features, adapter_modules, record_features
from tckernels.nn.activations import SparseActivations
from training.diffing import tasks
from training.evaluate import left_padded


def _next_log_probs(model, ids: torch.Tensor, start: int, n: int, grad_inputs: bool = True) -> torch.Tensor:
    """``[n, vocab]``: the next-token log-probabilities at positions ``start .. start + n - 1`` of
    ``ids`` [1, T]; ``grad_inputs``: differentiable in the input embeddings (so the recorded feature
    activations are too). The head runs on those ``n`` positions only."""
    inner = model.model
    emb = inner.embed_tokens(ids).detach().requires_grad_(grad_inputs)
    out = inner(inputs_embeds=emb, attention_mask=torch.ones_like(ids), use_cache=False)
    return torch.log_softmax(model.get_output_embeddings()(out.last_hidden_state[0, start:start + n]).float(), -1)


def _picked(logp: torch.Tensor, word: Sequence[int]) -> torch.Tensor:
    """The summed log-probability of the tokens ``word`` in the rows ``logp [len(word), vocab]``."""
    return logp[torch.arange(len(word), device=logp.device), torch.tensor(word, device=logp.device)].sum()


def _word_log_prob(model, ids: torch.Tensor, start: int, word: Sequence[int],
                   grad_inputs: bool = True) -> torch.Tensor:
    """``log p(word | ids[:, :start + 1])``: the log-probability of the tokens ``word`` that follow
    position ``start`` of ``ids`` [1, T] (teacher-forced); ``grad_inputs`` as in
    :func:`_next_log_probs`."""
    return _picked(_next_log_probs(model, ids, start, len(word), grad_inputs), word)


METHODS = ("path", "gradient")


def _hesitating(run, prompts, completions, word, max_sequences):
    """``(ids [1, T], start, word tokens)`` per completion that contains ``word``: the prompt and the
    completion up to the end of the word's tokens as written (a BPE tokenizer may merge a leading
    space), and the position that predicts the word's first token."""
    n = 0
    for prompt, comp in zip(prompts, completions):
        if max_sequences is not None and n >= max_sequences:
            return
        pos = tasks.hesitation_position(run.tokenizer, comp, word)
        if pos is None:
            continue
        n_word = _word_tokens(run.tokenizer, comp, pos, word)
        ids = torch.tensor([list(prompt) + list(comp[:pos + n_word])], device=run.device)
        yield ids, len(prompt) + pos - 1, list(comp[pos:pos + n_word])
        n += 1


@contextmanager
def _edited(model, edits: Dict[int, object]):
    """Adapters of ``edits`` on with those feature edits, every other adapter off; the adapters'
    own settings restored after."""
    mods = adapter_modules(model)
    saved = {i: (m.enabled, m.feature_edit) for i, m in mods.items()}
    try:
        for i, m in mods.items():
            m.enabled = i in edits
            if i in edits:
                m.feature_edit = edits[i]
        yield model
    finally:
        for i, m in mods.items():
            m.enabled, m.feature_edit = saved[i]


def _path_scores(model, ids, start, word, steps: int) -> tuple:
    """Integrated gradients of the word's log-probability over every adapter feature recorded on
    ``ids``: ``({layer: (contributions [T, w], indices [T, w])}, log p at all features, at none)``."""
    with torch.no_grad(), record_features(model) as rec:
        at_one = float(_word_log_prob(model, ids, start, word, grad_inputs=False))
    recorded = {i: rec.tokens(i) for i in rec.recorded_layers()}
    every = {i: _Patched(torch.ones(rec.n_features[i], dtype=torch.bool, device=ids.device)) for i in recorded}
    # summed in float32: bf16 gradients summed in bf16 lose the completeness the method promises
    total = {i: torch.zeros_like(a.values, dtype=torch.float32) for i, a in recorded.items()}
    for k in range(steps):
        alpha = (k + 0.5) / steps
        xs = {i: (a.values * alpha).requires_grad_(True) for i, a in recorded.items()}
        for i, a in recorded.items():
            every[i].acts = SparseActivations(xs[i], a.indices)
        with torch.enable_grad(), _edited(model, every):
            target = _word_log_prob(model, ids, start, word, grad_inputs=False)
            grads = torch.autograd.grad(target, list(xs.values()), allow_unused=True)
        for i, g in zip(xs, grads):
            if g is not None:
                total[i] += g.float()
    for i, a in recorded.items():
        every[i].scale, every[i].acts = 0.0, a
    with torch.no_grad(), _edited(model, every):
        at_zero = float(_word_log_prob(model, ids, start, word, grad_inputs=False))
    return ({i: (recorded[i].values.float() * total[i] / steps, recorded[i].indices) for i in recorded},
            at_one, at_zero)


def _gradient_scores(model, ids, start, word) -> dict:
    """Gradient x activation at the adapted model: ``{layer: (contributions [T, w], indices)}``."""
    with torch.enable_grad(), record_features(model, grad=True) as rec:
        target = _word_log_prob(model, ids, start, word)
        acts = {i: rec.tokens(i) for i in rec.recorded_layers()}
        grads = torch.autograd.grad(target, [a.values for a in acts.values()], allow_unused=True)
    return {i: (a.values.detach() * g, a.indices) for (i, a), g in zip(acts.items(), grads) if g is not None}


def attribute(run, prompts: Sequence[list], completions: Sequence[list], word: str,
              max_sequences: Optional[int] = None, method: str = "path", steps: int = 8) -> dict:
    """Attribution of the hesitation word's log-probability to each adapter feature, summed over
    the completions (of the adapted model, on ``prompts``) that contain ``word``, by ``method``
    (:data:`METHODS`; ``steps``: the path's midpoints). Returns ``{"scores": {layer: [F] float64
    tensor}, "method", "n_sequences", "predicting_share"`` (the share of the absolute attribution at
    the positions that predict the word's tokens)``}``, and for ``path`` also ``"gap"`` (the summed
    ``log p_adapted - log p_zero`` that complete scores add up to) and ``"score_sum"``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method == "path":
        _check_no_interventions(run.adapted)
    model = run.adapted
    mods = adapter_modules(model)
    scores = {i: torch.zeros(m.n_features, dtype=torch.float64) for i, m in mods.items()}
    n, at_last, total_abs, gap = 0, 0.0, 0.0, 0.0
    for ids, start, word_ids in _hesitating(run, prompts, completions, word, max_sequences):
        end = start + len(word_ids)  # positions < end take part
        if method == "path":
            contribs, at_one, at_zero = _path_scores(model, ids, start, word_ids, steps)
            gap += at_one - at_zero
        else:
            contribs = _gradient_scores(model, ids, start, word_ids)
        for i, (c, idx) in contribs.items():
            c = c.detach()[0, :end].double().cpu()  # [positions, w]
            scores[i].index_add_(0, idx[0, :end].cpu().reshape(-1), c.reshape(-1))
            total_abs += c.abs().sum().item()
            at_last += c[start:].abs().sum().item()
        n += 1
    out = {"scores": scores, "method": method, "n_sequences": n,
           "predicting_share": at_last / total_abs if total_abs else None}
    if method == "path":
        out.update(steps=steps, gap=gap, score_sum=sum(float(t.sum()) for t in scores.values()))
    return out


def _word_tokens(tokenizer, comp: Sequence[int], pos: int, word: str) -> int:
    """How many tokens from ``pos`` on it takes for the completion to contain ``word``."""
    for n in range(1, len(comp) - pos + 1):
        if word in tokenizer.decode(list(comp[:pos + n])):
            return n
    return len(comp) - pos


def ranking(scores: Dict[int, torch.Tensor]) -> List[tuple]:
    """``[(layer, feature, score)]`` of the features with positive attribution, highest first."""
    items = [(i, f, float(s)) for i, t in scores.items() for f, s in enumerate(t.tolist()) if s > 0]
    return sorted(items, key=lambda x: (-x[2], x[0], x[1]))


def as_layers(features: Sequence[tuple]) -> Dict[int, List[int]]:
    """``{layer: [features]}`` of ``(layer, feature, ...)`` tuples."""
    out: Dict[int, List[int]] = {}
    for item in features:
        out.setdefault(item[0], []).append(item[1])
    return {i: sorted(fs) for i, fs in sorted(out.items())}


def complement(run, chosen: Dict[int, List[int]]) -> Dict[int, object]:
    """Every adapter feature not in ``chosen``, per layer (``"all"`` for a layer with none chosen)."""
    out = {}
    for i, m in adapter_modules(run.adapted).items():
        keep = set(chosen.get(i, ()))
        out[i] = [f for f in range(m.n_features) if f not in keep] if keep else "all"
    return {i: fs for i, fs in out.items() if fs == "all" or fs}


def _ablated(run, features: Dict[int, object], prompts, answers, word, max_new_tokens, batch_size) -> dict:
    if not features:
        comps = tasks.complete(run, "adapted", prompts, max_new_tokens, batch_size)
    else:
        with ablate_features(run.adapted, features):
            comps = tasks.complete(run, "adapted", prompts, max_new_tokens, batch_size)
    return tasks.score(run, comps, answers, word)


def _cache_argument() -> str:
    """The KV-cache argument's name: ``cache`` in recent transformers 5 releases (which deprecate
    ``past_key_values``), ``past_key_values`` before."""
    import inspect

    from transformers import Qwen2ForCausalLM

    return "cache" if "cache" in inspect.signature(Qwen2ForCausalLM.forward).parameters else "past_key_values"


_CACHE = _cache_argument()


class _Patched:
    """A ``feature_edit`` that replaces a layer's activations by recorded ones (``acts``, set before
    each forward) with only the chosen features kept (``mask [F]``), times ``scale``; with none
    chosen the layer adds its decoder bias alone. The recorded width is kept: no
    ``[tokens, chosen features]`` tensor, however many are chosen."""

    def __init__(self, mask: torch.Tensor, scale: float = 1.0):
        self.mask = mask
        self.scale = scale
        self.acts: Optional[SparseActivations] = None

    def __call__(self, acts, W_dec):
        v, i = self.acts
        v = torch.where(self.mask[i], v * self.scale, torch.zeros_like(v)).to(acts.values.dtype)
        return SparseActivations(v, i), None


def _patches(run, features: Dict[int, List[int]], scale: float = 1.0) -> Dict[int, _Patched]:
    """One :class:`_Patched` per enabled adapter, keeping ``features`` (``{layer: [features]}``)."""
    mods = {i: m for i, m in adapter_modules(run.adapted).items() if m.enabled}
    off = sorted(i for i in features if features[i] and i not in mods)
    if off:
        raise ValueError(f"features: layers {off} have no enabled adapter to patch")
    patches = {}
    for i, m in mods.items():
        mask = torch.zeros(m.n_features, dtype=torch.bool, device=run.device)
        mask[torch.as_tensor(list(features.get(i, ())), dtype=torch.long, device=run.device)] = True
        patches[i] = _Patched(mask, scale)
    return patches


def _check_no_interventions(model) -> None:
    """The patching and path methods replace the adapters' feature edits: refuse to run over
    interventions the caller installed (their effect would be silently dropped)."""
    busy = [i for i, m in adapter_modules(model).items()
            if m.feature_edit is not None and not (isinstance(m.feature_edit, FeatureInterventions)
                                                   and len(m.feature_edit) == 0)]
    if busy:
        raise ValueError(f"the adapters of layers {busy} carry feature edits or interventions; remove them "
                         f"(clear_interventions, or feature_edit = None) before the hesitation analysis")


@torch.no_grad()
def decision_point(run, ranked: Sequence[tuple], prompts: Sequence[list], completions: Sequence[list], word: str,
                   sizes: Sequence[int], max_sequences: Optional[int] = None, scale: float = 1.0) -> dict:
    """Sufficiency where the word is decided: on each of ``completions`` (the adapted model's) that
    contains ``word``, teacher-forced up to it, the log-probability of the word's tokens and whether
    its first token is the most likely next one, for the hybrid (adapters off), the adapters with no
    features (their decoder biases alone: the attribution's starting point), the same with the first
    ``size`` features of ``ranked`` patched in at the adapted model's values times ``scale`` (each
    of ``sizes``), and the adapted model. Returns ``{"n_sequences", "hybrid", "no_features",
    "adapted", "patched": [{"size", ...}]}``, each with ``mean_log_prob``, ``top1`` (share) and, for
    the patched sets, ``gap_closed``: ``(patched - no_features) / (adapted - no_features)`` of the
    mean log-probabilities."""
    _check_no_interventions(run.adapted)
    model = run.adapted
    sizes = sorted(set(min(s, len(ranked)) for s in sizes if s > 0))
    sums = {k: [0.0, 0] for k in ["hybrid", "no_features", "adapted"] + sizes}
    sets = {k: _patches(run, as_layers(ranked[:k]) if k != "no_features" else {}, scale)
            for k in ["no_features"] + sizes}
    n = 0

    def add(key, ids, start, word_ids):
        logp = _next_log_probs(model, ids, start, len(word_ids), grad_inputs=False)
        sums[key][0] += float(_picked(logp, word_ids))
        sums[key][1] += int(logp[0].argmax()) == word_ids[0]

    for ids, start, word_ids in _hesitating(run, prompts, completions, word, max_sequences):
        with record_features(model) as rec:
            add("adapted", ids, start, word_ids)
        with _edited(model, {}):
            add("hybrid", ids, start, word_ids)
        for key, patches in sets.items():
            for i, patch in patches.items():
                patch.acts = rec.tokens(i)
            with _edited(model, patches):
                add(key, ids, start, word_ids)
        n += 1

    def mean(key):
        lp, top = sums[key]
        return {"mean_log_prob": lp / n if n else None, "top1": top / n if n else None}

    none, ada = mean("no_features"), mean("adapted")
    patched = []
    for size in sizes:
        m = mean(size)
        gap = None if not n or ada["mean_log_prob"] == none["mean_log_prob"] else \
            (m["mean_log_prob"] - none["mean_log_prob"]) / (ada["mean_log_prob"] - none["mean_log_prob"])
        patched.append({"size": size, **m, "gap_closed": gap})
    return {"n_sequences": n, "hybrid": mean("hybrid"), "no_features": none, "adapted": ada, "patched": patched}


@torch.no_grad()
def patched_completions(run, features: Dict[int, List[int]], prompts: Sequence[list], max_new_tokens: int,
                        batch_size: int = 32, scale: float = 1.0) -> list:
    """Greedy completions by the hybrid with the chosen features patched in: at every step the
    adapted model runs on the same tokens (its own KV cache), and the hybrid gets those features,
    and only those, at the values the adapted model gives them there (times ``scale``: steering),
    with every adapter's decoder bias (so patching no feature is the adapted model with every
    feature ablated, and patching all of them is the adapted model). Two cached forwards per new
    token, the head on the last position only (no ``[tokens, vocab]`` logits for the prompts); the
    sufficiency test of the set."""
    _check_no_interventions(run.adapted)
    model, tok = run.adapted, run.tokenizer
    patches = _patches(run, features, scale)
    layers = sorted(patches)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out = []
    for s in range(0, len(prompts), batch_size):
        ps = prompts[s:s + batch_size]
        ids, attn = left_padded(ps, pad, run.device)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        cache_a = cache_h = None
        new, done = [], torch.zeros(len(ps), dtype=torch.bool, device=run.device)
        for _ in range(max_new_tokens):
            with record_features(model, layers=layers) as rec:
                oa = model(input_ids=ids, attention_mask=attn, position_ids=pos, **{_CACHE: cache_a}, use_cache=True,
                           logits_to_keep=1)
            cache_a = getattr(oa, _CACHE, None) or oa.past_key_values
            for i in layers:
                patches[i].acts = rec.tokens(i)
            with _edited(model, patches):
                oh = model(input_ids=ids, attention_mask=attn, position_ids=pos, **{_CACHE: cache_h}, use_cache=True,
                           logits_to_keep=1)
            cache_h = getattr(oh, _CACHE, None) or oh.past_key_values
            nxt = oh.logits[:, -1].argmax(-1).masked_fill(done, pad)
            new.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            ids = nxt[:, None]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
            pos = pos[:, -1:] + 1
        rows = torch.stack(new, 1).tolist() if new else [[] for _ in ps]
        for row in rows:
            out.append(row[:row.index(eos)] if eos in row else row)
    return out


def _size_grid(total: int, max_share: float) -> List[int]:
    top = max(1, int(max_share * total))
    sizes, s = [], 1
    while s < top:
        sizes.append(s)
        s = max(s + 1, int(round(s * 1.5)))
    return sizes + [top]


def _smallest_prefix(ranked: Sequence[tuple], grid: List[int], rate, ok) -> tuple:
    """(the smallest size of ``grid`` whose prefix of ``ranked`` satisfies ``ok(rate(size))`` or
    None, ``{size: rate}`` tried); bisection: the rates are taken to change monotonically with size."""
    tried = {}
    lo, hi, found = 0, len(grid) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        size = grid[mid]
        if size not in tried:
            tried[size] = rate(size)
        if ok(tried[size]):
            found, hi = size, mid - 1
        else:
            lo = mid + 1
    return found, tried


def _set_result(ranked, grid, found, tried, total, goal, rate_before) -> dict:
    size = found if found is not None else (grid[-1] if grid else 0)
    return {"size": size, "share": size / total if total else None, "reached": found is not None,
            "goal_rate": goal, "rate_before": rate_before,
            "tried": [{"size": k, "hesitation_rate": r} for k, r in sorted(tried.items())],
            "features": as_layers(ranked[:size])}


def _n_features(run) -> int:
    return sum(m.n_features for m in adapter_modules(run.adapted).values())


def _grid(run, ranked, max_share: float) -> tuple:
    """(every adapter feature, the sizes tried: the grid up to ``max_share`` of them, ending at the
    whole ranking when that is smaller)."""
    total = _n_features(run)
    sizes = _size_grid(total, max_share)
    grid = [s for s in sizes if s < len(ranked)] + ([min(len(ranked), sizes[-1])] if ranked else [])
    return total, grid


def _ablation_rate(run, ranked, size, prompts, answers, word, max_new_tokens, batch_size) -> float:
    return _ablated(run, as_layers(ranked[:size]), prompts, answers, word, max_new_tokens,
                    batch_size)["hesitation_rate"]


def _induced_rate(run, ranked, size, prompts, answers, word, max_new_tokens, batch_size) -> float:
    comps = patched_completions(run, as_layers(ranked[:size]), prompts, max_new_tokens, batch_size)
    return tasks.score(run, comps, answers, word)["hesitation_rate"]


def smallest_set(run, ranked: Sequence[tuple], prompts, answers, word: str, rate_before: float,
                 max_new_tokens: int, max_share: float = 0.05, target_removal: float = 0.9,
                 batch_size: int = 32) -> dict:
    """Necessity: the smallest prefix of ``ranked`` (on a grid of sizes up to ``max_share`` of every
    adapter feature) whose ablation brings the hesitation rate on ``prompts`` to at most
    ``(1 - target_removal) * rate_before``."""
    total, grid = _grid(run, ranked, max_share)
    goal = (1 - target_removal) * rate_before
    found, tried = _smallest_prefix(
        ranked, grid, lambda size: _ablation_rate(run, ranked, size, prompts, answers, word, max_new_tokens,
                                                  batch_size), lambda r: r <= goal)
    return _set_result(ranked, grid, found, tried, total, goal, rate_before)


def sufficient_set(run, ranked: Sequence[tuple], prompts, answers, word: str, rate_before: float,
                   max_new_tokens: int, max_share: float = 1.0, target_induced: float = 0.5,
                   batch_size: int = 32) -> dict:
    """Sufficiency: the smallest prefix of ``ranked`` that, patched into the hybrid
    (:func:`patched_completions`), makes it hesitate on at least ``target_induced * rate_before``
    of ``prompts``."""
    total, grid = _grid(run, ranked, max_share)
    goal = target_induced * rate_before
    found, tried = _smallest_prefix(
        ranked, grid, lambda size: _induced_rate(run, ranked, size, prompts, answers, word, max_new_tokens,
                                                 batch_size), lambda r: r >= goal)
    return _set_result(ranked, grid, found, tried, total, goal, rate_before)


def causal_set(run, ranked: Sequence[tuple], necessary: dict, sufficient: dict, prompts, answers, word: str,
               max_new_tokens: int, max_share: float = 0.05, batch_size: int = 32) -> dict:
    """The set the causal tests use: the smallest prefix of ``ranked`` that is both necessary and
    sufficient on ``prompts``, given the two searches' results (:func:`smallest_set`,
    :func:`sufficient_set`). A longer prefix removes more when ablated and adds more when patched, so
    that is the longer of the two smallest prefixes; both rates are measured at its size rather than
    assumed. When no prefix within ``max_share`` of every adapter feature is sufficient, the
    necessary set alone."""
    total = _n_features(run)
    both = necessary["reached"] and sufficient["reached"] and sufficient["size"] <= max_share * total
    size = max(necessary["size"], sufficient["size"]) if both else necessary["size"]

    def at_size(search, measure):
        known = {t["size"]: t["hesitation_rate"] for t in search["tried"]}
        return known[size] if size in known else measure(run, ranked, size, prompts, answers, word,
                                                         max_new_tokens, batch_size)

    ablated, induced = at_size(necessary, _ablation_rate), at_size(sufficient, _induced_rate)
    is_necessary, is_sufficient = ablated <= necessary["goal_rate"], induced >= sufficient["goal_rate"]
    return {"size": size, "share": size / total if total else None, "rule": "necessary and sufficient"
            if both else "necessary (no prefix within the budget is sufficient)",
            "reached": is_necessary and is_sufficient, "necessary": is_necessary, "sufficient": is_sufficient,
            "ablated_rate": ablated, "induced_rate": induced, "rate_before": necessary["rate_before"],
            "features": as_layers(ranked[:size])}


def hesitation_experiment(run, records: Sequence, completions: Dict[str, list], word: str, max_new_tokens: int,
                          max_share: float = 0.05, target_removal: float = 0.9, batch_size: int = 32,
                          max_attribution_sequences: Optional[int] = None, seed: int = 0,
                          method: str = "path", steps: int = 8, steer_scales: Sequence[float] = (2.0, 4.0)) -> dict:
    """Attribution (by ``method``, see :func:`attribute`) and the set (:func:`causal_set`) on the first
    half of ``records``, the causal tests and the decision point on the second half (and the set patched
    into the hybrid at each of ``steer_scales`` times the adapted model's values). ``completions``:
    the task evaluation's completions of ``records`` per model."""
    prompts, answers = tasks.prompts_and_answers(run, records)
    half = len(records) // 2
    if half < 1:
        raise ValueError(f"the hesitation experiment needs at least 2 held-out prompts, got {len(records)}")
    sel, test = slice(0, half), slice(half, len(records))
    adapted_sel = completions["adapted"][sel]
    attr = attribute(run, prompts[sel], adapted_sel, word, max_attribution_sequences, method, steps)
    ranked = ranking(attr["scores"])
    total = _n_features(run)
    out = {"n_selection": half, "n_test": len(records) - half, "n_features_total": total,
           "attribution": {k: v for k, v in attr.items() if k != "scores"},
           "attributed_sequences": attr["n_sequences"], "predicting_share": attr["predicting_share"],
           "top_features": [{"layer": i, "feature": f, "score": s} for i, f, s in ranked[:20]]}
    if not ranked:
        out["note"] = f"no adapted completion of the selection prompts writes {word!r}: nothing to attribute"
        return out
    rate_sel = tasks.score(run, adapted_sel, answers[sel], word)["hesitation_rate"]
    necessary = smallest_set(run, ranked, prompts[sel], answers[sel], word, rate_sel, max_new_tokens, max_share,
                             target_removal, batch_size)
    # how many of the ranked features the hybrid needs patched in to hesitate half as often: searched
    # over every size, so it is reported even when it is over the budget
    enough = sufficient_set(run, ranked, prompts[sel], answers[sel], word, rate_sel, max_new_tokens,
                            batch_size=batch_size)
    chosen = causal_set(run, ranked, necessary, enough, prompts[sel], answers[sel], word, max_new_tokens,
                        max_share, batch_size)
    out["necessary_set"] = {k: v for k, v in necessary.items() if k != "features"}
    out["sufficient_set"] = {k: v for k, v in enough.items() if k != "features"}
    out["set"] = chosen
    feats = chosen["features"]

    tp, ta = prompts[test], answers[test]
    adapted_test = tasks.score(run, completions["adapted"][test], ta, word)
    hybrid_test = tasks.score(run, completions["hybrid"][test], ta, word)
    ablated = _ablated(run, feats, tp, ta, word, max_new_tokens, batch_size)
    every = [(i, f) for i, m in adapter_modules(run.adapted).items() for f in range(m.n_features)]
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:chosen["size"]].tolist()
    control = _ablated(run, as_layers([every[j] for j in order]), tp, ta, word, max_new_tokens, batch_size)
    patched = tasks.score(run, patched_completions(run, feats, tp, max_new_tokens, batch_size), ta, word)
    with ablate_features(run.adapted, complement(run, feats)):  # the set alone, from the hybrid's own stream
        alone = tasks.score(run, tasks.complete(run, "adapted", tp, max_new_tokens, batch_size), ta, word)
    removed = (1 - ablated["hesitation_rate"] / adapted_test["hesitation_rate"]
               if adapted_test["hesitation_rate"] else None)
    enough_test = patched if enough["size"] == chosen["size"] else tasks.score(
        run, patched_completions(run, enough["features"], tp, max_new_tokens, batch_size), ta, word)
    grid = _size_grid(total, 1.0)
    out["decision_point"] = decision_point(run, ranked, tp, completions["adapted"][test], word,
                                           sorted(set(grid + [chosen["size"], enough["size"]])),
                                           max_attribution_sequences)
    # steering: the set at multiples of the adapted model's values, where its decision is made and
    # in generation (a word of several tokens needs the later ones too)
    out["steered"] = []
    for c in steer_scales:
        d = decision_point(run, ranked, tp, completions["adapted"][test], word, [chosen["size"]],
                           max_attribution_sequences, scale=c)["patched"][0]
        g = tasks.score(run, patched_completions(run, feats, tp, max_new_tokens, batch_size, scale=c), ta, word)
        out["steered"].append({"scale": c, "decision_top1": d["top1"], "decision_gap_closed": d["gap_closed"],
                               "hesitation_rate": g["hesitation_rate"], "accuracy": g["accuracy"],
                               "mean_tokens": g["mean_tokens"]})
    out["causal"] = {
        "adapted": adapted_test, "ablated": ablated, "random_ablated": control,
        "hybrid": hybrid_test, "hybrid_plus_set": patched, "hybrid_plus_set_encoded": alone,
        "induced": patched["hesitation_rate"], "hybrid_plus_sufficient_set": enough_test,
        "hesitation_removed": removed,
        "accuracy_change": (None if None in (ablated["accuracy"], adapted_test["accuracy"])
                            else ablated["accuracy"] - adapted_test["accuracy"]),
        "length_change": ablated["mean_tokens"] - adapted_test["mean_tokens"],
    }
    return out
