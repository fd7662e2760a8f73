"""Mixed forwards and the whole objective on a micro Qwen2 pair, against plain HF computations."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from training import forward_utils as fu
from training.data import collate, tokenize_record
from training.make_tiny_pair import checked_answer, conversation
from tests.training.conftest import build_objective


def _batch(tok, problems, loss_on_prompt=False):
    exs = [tokenize_record(conversation(a, b, checked_answer(a, b)), tok, "deepseek", loss_on_prompt)
           for a, b in problems]
    return collate(exs, tok.pad_token_id)


PROBLEMS = [(12, 34), (567, 89), (90, 11)]  # different lengths: padding in the batch


@contextlib.contextmanager
def swapped(top_model, bottom_model, k):
    """``top_model`` with its embeddings and layers < k taken from ``bottom_model`` (the plain way)."""
    t, b = top_model.model, bottom_model.model
    saved_embed, saved = t.embed_tokens, [t.layers[i] for i in range(k)]
    t.embed_tokens = b.embed_tokens
    for i in range(k):
        t.layers[i] = b.layers[i]
    try:
        yield top_model
    finally:
        t.embed_tokens = saved_embed
        for i in range(k):
            t.layers[i] = saved[i]


@pytest.fixture(scope="module")
def setup(micro):
    obj, tok = build_objective(micro)
    return obj, tok, _batch(tok, PROBLEMS)


def test_free_run_matches_hf_forward(setup):
    obj, tok, bt = setup
    real = bt["attention_mask"].bool()
    for stack in (obj.A, obj.R):
        inputs = fu.BatchInputs(bt["input_ids"], bt["attention_mask"])
        with torch.no_grad():
            hs = fu.free_run(stack, inputs)
            mine = stack.lm_head(fu.final_hidden(stack, hs[-1]))
            hf = stack.model(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits
        assert len(hs) == stack.n_layers + 1
        torch.testing.assert_close(mine[real], hf[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["adapted_below", "reference_below"])
def test_mixed_forward_matches_swapped_model(setup, direction):
    obj, tok, bt = setup
    real = bt["attention_mask"].bool()
    L = obj.n_layers
    bottom, top = (obj.A, obj.R) if direction == "adapted_below" else (obj.R, obj.A)
    for k in range(L + 1):
        inputs = fu.BatchInputs(bt["input_ids"], bt["attention_mask"])
        with torch.no_grad():
            mine = top.lm_head(fu.mixed_hidden(bottom, top, k, inputs))
            reuse = top.lm_head(fu.mixed_hidden(bottom, top, k, inputs, bottom_states=fu.free_run(bottom, inputs)))
            with swapped(top.model, bottom.model, k) as m:
                plain = m(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits
        torch.testing.assert_close(mine[real], plain[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reuse[real], plain[real], rtol=1e-5, atol=1e-5)


def _original_kl(logits_r, logits_a, scored):
    """The original's KL: ``kl_div(log_softmax(a), softmax(r))`` summed over the vocabulary, then the
    mean over the scored positions of the whole micro-batch."""
    kl = F.kl_div(F.log_softmax(logits_a.double(), -1), F.softmax(logits_r.double(), -1), reduction="none").sum(-1)
    return (kl * scored).sum() / scored.sum()


def _original_objective(obj, bt, cutoffs, lam=(1.0, 1e-3, 1.0, 2.0)):
    """The original transcoder-adapter code's objective, written out from its formulas: HF forwards
    of (swapped) models with full logits, dense adapter features; KL over the scored positions,
    S and NMSE over every real token, each pooled over the micro-batch; every bridging pass
    weighted lambda_bridge / n_cutoffs."""
    from tckernels.models import adapter_modules

    ids, attn = bt["input_ids"], bt["attention_mask"]
    scored, real = bt["loss_mask"].double(), attn.double()
    A, R = obj.adapted, obj.reference
    L = obj.n_layers
    with torch.no_grad():
        out_r = R(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    feats = {}
    hooks = [mlp.register_forward_hook(lambda mod, inp, out, i=i: feats.__setitem__(i, inp[0]))
             for i, mlp in adapter_modules(A).items()]
    out_a = A(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    for h in hooks:
        h.remove()
    kl = _original_kl(out_r.logits, out_a.logits, scored)
    # HF's last hidden state is after the final norm; the original's NMSE takes the last layer's output
    hs_a = list(out_a.hidden_states[:-1]) + [None]
    hs_r = list(out_r.hidden_states[:-1]) + [None]
    inputs = fu.BatchInputs(ids, attn)
    hs_a[-1] = fu.free_run(obj.A, inputs)[-1]
    with torch.no_grad():
        hs_r[-1] = fu.free_run(obj.R, inputs)[-1]
    nm = []
    for a, r in zip(hs_a, hs_r):
        n_el = real.sum() * a.shape[-1]
        mse = (((a.double() - r.double()) * real[..., None]) ** 2).sum() / n_el
        norm = ((r.double() * real[..., None]) ** 2).sum() / n_el
        nm.append(mse / (norm + 1e-8))
    nmse = torch.stack(nm).mean()
    s = 0
    for i, mlp in adapter_modules(A).items():
        f = torch.relu(feats[i].double() @ mlp.W_enc.double().t() + mlp.b_enc.double())
        per_tok = f @ mlp.W_dec.double().norm(dim=1)
        s = s + per_tok[real.bool()].mean()
    passes = {}
    for k in cutoffs:
        if k > 0:
            with swapped(R, A, k) as mm:
                passes[f"adapted_below_{k}"] = _original_kl(out_r.logits, mm(input_ids=ids, attention_mask=attn).logits,
                                                            scored)
        if k < L:
            with swapped(A, R, k) as mm:
                passes[f"reference_below_{k}"] = _original_kl(out_r.logits, mm(input_ids=ids, attention_mask=attn).logits,
                                                              scored)
    bridge = sum(passes.values()) / len(cutoffs)
    loss = lam[0] * kl + lam[1] * s + lam[2] * nmse + lam[3] * bridge
    return {"loss": loss, "kl": kl, "sparsity": s, "nmse": nmse, "bridge": bridge, "passes": passes}


@pytest.mark.parametrize("cutoffs", [[0], [1], [2], [0, 2], [1, 2]])
def test_objective_equals_the_originals_values_and_gradients(setup, cutoffs):
    obj, tok, bt = setup
    params = [p for p in obj.adapted.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    out = obj(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], cutoffs, track_features=False)
    out["loss"].backward()
    mine = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    plain = _original_objective(obj, bt, cutoffs)
    plain["loss"].backward()
    for name in ("loss", "kl", "sparsity", "nmse", "bridge"):
        torch.testing.assert_close(out[name].double(), plain[name].detach(), rtol=2e-5, atol=1e-7, msg=name)
    assert set(out["bridge_passes"]) == set(plain["passes"])
    for k, v in plain["passes"].items():
        torch.testing.assert_close(out["bridge_passes"][k].double(), v.detach(), rtol=2e-5, atol=1e-7)
    for a, b in zip(mine, [p.grad for p in params]):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-7)


def test_every_bridging_pass_counts_in_full(setup):
    """lambda_bridge * (a2r + r2a) / n_cutoffs: at 0 < k < L both passes count in full, not their mean."""
    obj, tok, bt = setup
    only_bridge = type(obj)(obj.adapted, obj.reference, lambda_adapt=0.0, l1_weight=0.0, lambda_nmse=0.0,
                            lambda_bridge=2.0)
    run = lambda ks: only_bridge(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], ks,  # noqa: E731
                                 track_features=False)
    with torch.no_grad():
        one = run([1])
        p = one["bridge_passes"]
        torch.testing.assert_close(one["loss"], 2.0 * (p["adapted_below_1"] + p["reference_below_1"]))
        two = run([0, 1])  # k=0 has no adapted-below pass: three passes over two cut-offs
        p = two["bridge_passes"]
        assert set(p) == {"reference_below_0", "adapted_below_1", "reference_below_1"}
        torch.testing.assert_close(two["loss"], 2.0 * sum(p.values()) / 2)
        torch.testing.assert_close(two["bridge"], sum(p.values()) / 2)


def test_sparsity_and_nmse_cover_every_real_token_whatever_is_scored(setup):
    """The loss mask chooses the KL's positions only: S and NMSE see the prompt (and the last token)."""
    obj, tok, bt = setup
    prompt_only = bt["loss_mask"].clone()
    prompt_only[:, 3:] = False  # score a few prompt positions only
    with torch.no_grad():
        full = obj(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], [1], track_features=False)
        few = obj(bt["input_ids"], bt["attention_mask"], prompt_only, [1], track_features=False)
    for name in ("sparsity", "nmse", "nmse_layers", "l0_layers"):
        torch.testing.assert_close(few[name], full[name], msg=name)
    assert abs(float(few["kl"]) - float(full["kl"])) > 1e-4


def test_passes_without_adapter_layers_are_skipped(setup):
    obj, tok, bt = setup
    L = obj.n_layers
    run = lambda ks: obj(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], ks, track_features=False)  # noqa
    assert set(run([0])["bridge_passes"]) == {"reference_below_0"}
    assert set(run([L])["bridge_passes"]) == {f"adapted_below_{L}"}
    assert set(run([1])["bridge_passes"]) == {"adapted_below_1", "reference_below_1"}
    assert float(run([])["bridge"]) == 0.0


def test_bridging_gradients_reach_only_the_adapter_layers_of_the_pass(setup):
    """Adapted layers below k, then reference layers: only adapters < k learn from the pass;
    reference layers below k, then adapted layers: only adapters >= k. The reference never does."""
    from tckernels.models import adapter_modules
    from training.losses import chunked_kl, sequence_weights

    obj, tok, bt = setup
    mods = adapter_modules(obj.adapted)
    L = obj.n_layers
    inputs = fu.BatchInputs(bt["input_ids"], bt["attention_mask"])
    sel = bt["loss_mask"].bool()
    with torch.no_grad():
        hr = fu.final_hidden(obj.R, fu.free_run(obj.R, inputs)[-1])
    for k in range(L + 1):
        for direction, bottom, top, expect in (("adapted_below", obj.A, obj.R, set(range(k))),
                                               ("reference_below", obj.R, obj.A, set(range(k, L)))):
            if not expect:
                continue  # the pass the objective skips
            obj.adapted.zero_grad(set_to_none=True)
            h = fu.mixed_hidden(bottom, top, k, inputs)
            chunked_kl(h[sel], top.lm_head, hr[sel], obj.R.lm_head, sequence_weights(sel)[sel]).backward()
            got = {i for i, m in mods.items() if m.transcoder_enc.weight.grad is not None
                   and m.transcoder_enc.weight.grad.abs().sum() > 0}
            assert got == expect, (direction, k)
            assert all(p.grad is None for p in obj.reference.parameters())


def test_padding_is_masked_and_sequences_weigh_equally_with_sequence_reduction(setup):
    obj, tok, _ = setup
    per_seq = type(obj)(obj.adapted, obj.reference, reduction="sequence")
    single = []
    for pr in PROBLEMS:
        bt = _batch(tok, [pr])
        with torch.no_grad():
            single.append(per_seq(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], [1], track_features=False))
    bt = _batch(tok, PROBLEMS)
    with torch.no_grad():
        both = per_seq(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], [1], track_features=False)
    for name in ("loss", "kl", "sparsity", "nmse", "bridge"):
        want = torch.stack([s[name] for s in single]).mean()
        torch.testing.assert_close(both[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_token_reduction_pools_the_micro_batch(setup):
    """KL weighs each sequence by its scored positions, S by its real tokens; at one sequence per
    micro-batch the two reductions agree."""
    obj, tok, _ = setup
    per_seq = type(obj)(obj.adapted, obj.reference, reduction="sequence")
    single, n_scored, n_real = [], [], []
    for pr in PROBLEMS:
        bt = _batch(tok, [pr])
        with torch.no_grad():
            single.append(obj(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], [1], track_features=False))
            alt = per_seq(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], [1], track_features=False)
        for name in ("loss", "kl", "sparsity", "nmse", "bridge"):
            torch.testing.assert_close(single[-1][name], alt[name], msg=name)
        n_scored.append(float(bt["loss_mask"].sum()))
        n_real.append(float(bt["attention_mask"].sum()))
    bt = _batch(tok, PROBLEMS)
    with torch.no_grad():
        both = obj(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], [1], track_features=False)
    for name, n in (("kl", n_scored), ("bridge", n_scored), ("sparsity", n_real)):
        want = sum(s[name] * w for s, w in zip(single, n)) / sum(n)
        torch.testing.assert_close(both[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert len(set(n_real)) > 1  # the sequences differ in length, so pooling differs from averaging


def test_adapted_model_starts_at_the_hybrid(micro):
    from tckernels.models import adapters_enabled

    obj, tok = build_objective(micro, randomize=False)
    bt = _batch(tok, PROBLEMS)
    with torch.no_grad():
        on = obj.adapted(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits
        with adapters_enabled(obj.adapted, False):
            off = obj.adapted(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits
    assert torch.equal(on, off)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(micro):
    obj, tok = build_objective(micro)
    obj_c = type(obj)(obj.adapted, obj.reference, gradient_checkpointing=True)
    bt = _batch(tok, PROBLEMS)
    params = [p for p in obj.adapted.parameters() if p.requires_grad]
    res = []
    for o in (obj, obj_c):
        for p in params:
            p.grad = None
        out = o(bt["input_ids"], bt["attention_mask"], bt["loss_mask"], [1], track_features=False)
        out["loss"].backward()
        res.append((out["loss"].detach(), [p.grad.clone() for p in params]))
    torch.testing.assert_close(res[0][0], res[1][0])
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
