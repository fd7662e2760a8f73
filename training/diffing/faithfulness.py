"""How faithful the adapted model is to the reference: the paper's output faithfulness (its Figure 2)
and internal faithfulness (its Figure 3), as plain JSON-able dicts (``report.py`` plots them).

Both run on the run's held-out examples (``run.val_ex``), batch by batch, without gradients and on
``run.device``. Nothing over all the tokens is kept: each batch adds to running sums and is dropped.

Averaging (the same as ``training.evaluate.validate``): a KL is the mean over a sequence's scored
positions (its loss mask), then the mean over the sequences that have any; an NMSE is taken per
sequence over its real (non-padding) tokens and the hidden dimension, then averaged over sequences.
The KL over the vocabulary goes through ``losses.kl_and_agreement`` in chunks of
``run.cfg.kl_chunk_tokens`` positions, so the ``[tokens, vocab]`` logits never exist whole.

* :func:`output_faithfulness`: KL(reference || model) and top-1 error of the base model, the hybrid
  (the adapted model with its adapters off), the adapted model and the reference itself (0, a check).
* :func:`internal_faithfulness`: NMSE of every hidden state against the reference's, and the KL when
  a contiguous subset of the reference's layers is replaced by the adapted model's layers.
"""
from __future__ import annotations

from typing import Optional

import torch

from tckernels.models import adapters_enabled
from training import forward_utils as fu
from training.data import iterate_batches
from training.losses import kl_and_agreement, nmse_per_layer, sequence_weights

MODELS = ("base", "hybrid", "adapted", "reference")
SUBSET_MODES = ("all", "cutoffs")


def _batches(run, batch_size: int):
    """``(inputs, scored, real, n_sequences)`` per held-out batch, on the run's device."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for batch in iterate_batches(run.val_ex, batch_size, run.tokenizer.pad_token_id):
        batch = {k: v.to(run.device) for k, v in batch.items()}
        sel = batch["loss_mask"].bool()
        real = batch["attention_mask"].bool()
        n_seq = int((sel.sum(-1) > 0).sum())
        yield fu.BatchInputs(batch["input_ids"], batch["attention_mask"]), sel, real, n_seq


def _final(stack, inputs, sel: torch.Tensor) -> torch.Tensor:
    """A free run's final (normed) hidden states at the scored positions (the inputs of the head)."""
    h = fu.run_layers(stack, fu.embed(stack, inputs), inputs, 0, stack.n_layers)
    return fu.final_hidden(stack, h)[sel]


def _kl_sum(h_final: torch.Tensor, head, hr_final: torch.Tensor, head_r, sel: torch.Tensor, chunk: int):
    """(sum over this batch's sequences of their mean KL, number of positions whose top-1 agrees).

    ``h_final``/``hr_final``: the final (normed) hidden states at the scored positions. The sequence
    weights sum to 1 over the batch (mean over sequences), so ``* n_seq`` turns that mean into a sum
    that adds up across batches; this is how ``validate`` accumulates its ``kl``."""
    kl_tok, agree = kl_and_agreement(h_final, head, hr_final, head_r, chunk)
    w = sequence_weights(sel)[sel]
    n_seq = int((sel.sum(-1) > 0).sum())
    return float((w * kl_tok).sum()) * n_seq, int(agree.sum())


@torch.no_grad()
def output_faithfulness(run, batch_size: int = 16) -> dict:
    """KL(reference || model) and top-1 error on the held-out examples (the paper's Figure 2).

    Returns ``{"models": [...], "kl": {model: float}, "top1_error": {model: float},
    "n_positions": int, "n_sequences": int}`` for the models ``base``, ``hybrid`` (the adapted model
    with its adapters off), ``adapted`` and ``reference``. ``kl`` is the per-sequence mean over the
    scored positions, then the mean over sequences (``validate``'s ``kl``); ``top1_error`` is the
    fraction of scored positions where the model's most likely next token is not the reference's.
    Cost per batch: one forward of the reference, the base model and the adapted model with its
    adapters off and on, and four chunked KLs (the reference's against itself included).
    """
    chunk = run.cfg.kl_chunk_tokens
    A, R, Bm = fu.stack_of(run.adapted), fu.stack_of(run.reference), fu.stack_of(run.base)
    kl = {m: 0.0 for m in MODELS}
    agree = {m: 0 for m in MODELS}
    n_pos = n_seq = 0
    for inputs, sel, _real, b_seq in _batches(run, batch_size):
        hr = _final(R, inputs, sel)
        finals = {"base": (Bm, _final(Bm, inputs, sel))}
        with adapters_enabled(run.adapted, False):
            finals["hybrid"] = (A, _final(A, inputs, sel))
        with adapters_enabled(run.adapted, True):
            finals["adapted"] = (A, _final(A, inputs, sel))
        finals["reference"] = (R, hr)  # scored like the others, so its 0 checks the scoring itself
        for m, (stack, h) in finals.items():
            k, a = _kl_sum(h, stack.lm_head, hr, R.lm_head, sel, chunk)
            kl[m] += k
            agree[m] += a
        n_pos += int(sel.sum())
        n_seq += b_seq
    return {
        "models": list(MODELS),
        "kl": {m: kl[m] / max(1, n_seq) for m in MODELS},
        "top1_error": {m: 1.0 - agree[m] / max(1, n_pos) for m in MODELS},
        "n_positions": n_pos,
        "n_sequences": n_seq,
    }


def _wanted(i: int, j: int, L: int, subsets: str) -> bool:
    return subsets == "all" or i == 0 or j == L


def subset_summary(matrix: list) -> dict:
    """The curves and the comparison with the all-layers KL, read off a subset-KL matrix
    (``[L+1][L+1]``, entry ``[i][j]`` the KL of subset ``[i, j)``, None where not computed):
    ``{"subset_kl", "adapted_below_k", "adapted_from_k", "all_layers", "subsets_below_all",
    "max_subset_kl"}``."""
    L = len(matrix) - 1
    all_layers = matrix[0][L]
    others = [matrix[i][j] for i in range(L + 1) for j in range(i + 1, L + 1)
              if (i, j) != (0, L) and matrix[i][j] is not None]
    max_other: Optional[float] = max(others) if others else None
    return {
        "subset_kl": matrix,
        "adapted_below_k": [matrix[0][k] for k in range(L + 1)],
        "adapted_from_k": [matrix[k][L] for k in range(L + 1)],
        "all_layers": all_layers,
        "subsets_below_all": max_other is None or max_other <= all_layers,
        "max_subset_kl": max_other,
    }


@torch.no_grad()
def internal_faithfulness(run, batch_size: int = 16, subsets: str = "all") -> dict:
    """NMSE of the hidden states and the layer-subset replacement KL (the paper's Figure 3).

    **NMSE**: for ``adapted``, ``hybrid`` (adapters off) and ``base``, each running freely, the NMSE
    of each hidden state (the embeddings, then the output of every layer: ``L + 1`` values) against
    the reference's, over the real tokens (``losses.nmse_per_layer``, reduction ``"sequence"``).

    **Subset replacement**: for a contiguous subset ``[i, j)`` of the ``L`` layers, the reference runs
    with its layers ``i..j-1`` replaced by the adapted model's (adapters on); the embeddings, the other
    layers, the final norm and the head are the reference's. Its KL to the reference is averaged as
    in :func:`output_faithfulness`. ``subset_kl[i][j]`` is that KL for ``0 <= i < j <= L``, ``0.0`` on
    the diagonal (the empty subset is the reference itself) and ``None`` below it (``i > j``) and for
    subsets not computed. ``adapted_below_k[k]`` is subset ``[0, k)`` and ``adapted_from_k[k]`` is
    subset ``[k, L)``, for ``k = 0..L`` (the empty subset, ``k = 0`` resp. ``k = L``, gives 0);
    ``all_layers`` is subset ``[0, L)``. ``subsets_below_all``: every other computed non-empty subset's
    KL is at most ``all_layers`` (the paper finds it always is: errors inside do not add up beyond
    what reaches the output); ``max_subset_kl`` is the largest of them (None when there are none).

    ``subsets``: ``"all"`` computes every subset; ``"cutoffs"`` only ``[0, k)`` and ``[k, L)``, which
    the curves need. Cost per batch, in decoder-layer calls (one model forward is ``L``) and head
    evaluations (each ``kl_and_agreement`` call forms the reference's and the replaced run's logits):
    prefixes are shared (per start ``i`` the reference's state after ``i`` layers comes from its one
    free run, and the adapted layers are extended one at a time, ``L(L+1)/2`` calls over all ``i``), but
    each subset needs its own run of the reference's remaining layers: ``(L^3 - L)/6`` calls and
    ``L(L+1)/2`` KL evaluations for ``"all"`` (for ``L = 28``: about 3,700 layer calls, ~130 forwards'
    worth, and 406 KLs), against ``L(L-1)/2`` reference layer calls and ``2L - 1`` KLs for
    ``"cutoffs"``. The NMSE part adds four free runs.

    Returns ``{"n_layers", "hidden_states" (labels), "nmse": {model: [L+1]}, "nmse_mean": {model: float},
    "subsets", "subset_kl", "adapted_below_k", "adapted_from_k", "all_layers", "subsets_below_all",
    "max_subset_kl", "n_positions", "n_sequences", "n_tokens"}``.
    """
    if subsets not in SUBSET_MODES:
        raise ValueError(f"subsets must be one of {SUBSET_MODES}, got {subsets!r}")
    chunk = run.cfg.kl_chunk_tokens
    A, R, Bm = fu.stack_of(run.adapted), fu.stack_of(run.reference), fu.stack_of(run.base)
    L = R.n_layers
    if A.n_layers != L:
        raise ValueError(f"the adapted model has {A.n_layers} layers but the reference has {L}")
    nmse_models = ("adapted", "hybrid", "base")
    nmse_sum = {m: torch.zeros(L + 1, dtype=torch.float64) for m in nmse_models}
    kl_sum = [[0.0] * (L + 1) for _ in range(L + 1)]
    n_pos = n_seq = n_real = 0
    for inputs, sel, real, b_seq in _batches(run, batch_size):
        hs_r = fu.free_run(R, inputs)
        with adapters_enabled(run.adapted, True):
            hs_a = fu.free_run(A, inputs)
        with adapters_enabled(run.adapted, False):
            hs_h = fu.free_run(A, inputs)
        hs_b = fu.free_run(Bm, inputs)
        for m, hs in (("adapted", hs_a), ("hybrid", hs_h), ("base", hs_b)):
            nmse_sum[m] += nmse_per_layer(hs, hs_r, real, "sequence").double().cpu() * b_seq
        del hs_a, hs_h, hs_b

        hr_final = fu.final_hidden(R, hs_r[-1])[sel]
        with adapters_enabled(run.adapted, True):
            for i in range(L):
                h = hs_r[i]  # the reference's layers < i, from its free run
                for j in range(i + 1, L + 1):
                    h = fu.run_layers(A, h, inputs, j - 1, j)  # extend the replaced block by one layer
                    if not _wanted(i, j, L, subsets):
                        continue
                    out = fu.final_hidden(R, fu.run_layers(R, h, inputs, j, L))[sel]
                    kl_sum[i][j] += _kl_sum(out, R.lm_head, hr_final, R.lm_head, sel, chunk)[0]
        del hs_r, hr_final
        n_pos += int(sel.sum())
        n_seq += b_seq
        n_real += int(real.sum())

    d = max(1, n_seq)
    matrix: list = [[None] * (L + 1) for _ in range(L + 1)]
    for i in range(L + 1):
        matrix[i][i] = 0.0
        for j in range(i + 1, L + 1):
            if _wanted(i, j, L, subsets):
                matrix[i][j] = kl_sum[i][j] / d
    nmse = {m: (nmse_sum[m] / d).tolist() for m in nmse_models}
    return {
        "n_layers": L,
        "hidden_states": ["embeddings"] + [f"layer {i}" for i in range(L)],
        "nmse": nmse,
        "nmse_mean": {m: sum(v) / len(v) for m, v in nmse.items()},
        "subsets": subsets,
        **subset_summary(matrix),
        "n_positions": n_pos,
        "n_sequences": n_seq,
        "n_tokens": n_real,
    }
