"""Feature-sharded transcoders on 2 and 4 gloo processes against the unsharded modules.

Each world size runs every case in one launch (tests/nn/sharded_worker.py); the tests here make
the unsharded reference on the same data and compare activations, outputs, every gradient and
the gathered modules' state, rank by rank."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from tckernels.nn import CrossLayerTranscoder, Transcoder
from tckernels.nn.activations import to_dense
from tests.nn import sharded_worker

TOL = dict(rtol=1e-5, atol=1e-5)
WORLDS = (2, 4)
D_IN, D_OUT, N = 16, 12, 64


def _randomise(module, seed):
    """Weights with non-zero biases, skip and pre-bias, so that every gradient is checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("b_enc", "b_dec", "b_pre", "W_skip")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _transcoder(activation, n=N, seed=0, **kw):
    torch.manual_seed(seed)
    tc = Transcoder(D_IN, n, D_OUT, activation, skip=True, pre_bias=True, **kw)
    tc.reset_parameters(seed=seed)
    return _randomise(tc, seed + 1)


def _data(seed, lead=(3, 5), d_out=D_OUT, d_in=D_IN):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, d_in, generator=g), torch.randn(*lead, d_out, generator=g)


def _case(module, seed=0, train=False, mask=None, kind="transcoder"):
    module.train(train)
    x, dy = _data(seed)
    case = dict(kind=kind, module=module, x=x, dy=dy)
    if mask is not None:
        case["mask"] = mask
    return case


def _one_slice_holds_the_top():
    # the last quarter of the features (all on the last rank) outranks every other feature
    tc = _transcoder("topk", k=6, seed=3)
    with torch.no_grad():
        tc.b_enc[-N // 4:] += 3.0
    return _case(tc, seed=3)


def _ties():
    # integer-valued weights and inputs: every dot product is exact, so the twin features (rows i
    # and i + N/2 are equal, and live on different ranks) tie exactly; zero inputs tie everywhere
    g = torch.Generator().manual_seed(5)
    tc = Transcoder(D_IN, N, D_OUT, "topk", k=8)
    with torch.no_grad():
        half = torch.randint(-2, 3, (N // 2, D_IN), generator=g).float() / 4
        tc.W_enc.copy_(torch.cat([half, half]))
        tc.b_enc.zero_()
    x = torch.randint(-2, 3, (3, 5, D_IN), generator=g).float() / 2
    x[0, :2] = 0.0
    x[1, 0] = -x[1, 0].abs()  # only a few positive entries in that row
    tc.eval()
    return dict(kind="transcoder", module=tc, x=x, dy=_data(5)[1])


def _mask():
    m = torch.ones(3, 5, dtype=torch.bool)
    m[1, 3:] = False
    m[2, 0] = False
    return m


def _batchtopk_eval():
    tc = _transcoder("batchtopk", k=4, seed=7)
    with torch.no_grad():
        tc.threshold.fill_(0.25)
    return _case(tc, seed=7)


def _crosslayer(activation, seed, train):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(3, 8, 32, 6, activation, k=4, skip=True)
    _randomise(clt, seed)
    clt.train(train)
    g = torch.Generator().manual_seed(seed)
    return dict(kind="crosslayer", module=clt, x=torch.randn(3, 7, 8, generator=g),
                dy=torch.randn(3, 7, 6, generator=g))


def _mesh():
    tc = _transcoder("topk", k=5, seed=11)
    xs = torch.stack([_data(11)[0], _data(12)[0]])  # one batch per data-parallel replica
    return dict(kind="mesh", module=tc, x=xs, dy=_data(13)[1])


def _errors(world):
    tc = _transcoder("topk", k=3, seed=17)
    return dict(kind="errors", module=tc, x=_data(17)[0],
                few_features=Transcoder(D_IN, world - 1, D_OUT, "topk", k=1),
                module_per_rank=[_transcoder("topk", k=3, seed=100 + r) for r in range(world)])


def _aux(activation, seed, dead, mask=None, n=N, **kw):
    """A forward_with_aux case whose features ``dead`` are dead before the batch (AuxK is on)."""
    kw.setdefault("k", 4 if activation in ("topk", "batchtopk") else None)
    tc = _transcoder(activation, n=n, seed=seed, dead_tokens_threshold=1000, **kw)
    with torch.no_grad():
        tc.tokens_since_fired[dead] = 5000
    x, target = _data(seed)
    tc.train()
    case = dict(kind="aux", module=tc, x=x, target=target, dead=dead)
    if mask is not None:
        case["mask"] = mask
    return case


def _crosslayer_aux(activation, seed, mask=None, **kw):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(3, 8, 32, 6, activation, k=4, skip=True, pre_bias=True, dead_tokens_threshold=1000,
                               aux_k=3, **kw)
    _randomise(clt, seed)
    with torch.no_grad():
        for src, layer in enumerate(clt.layers):
            layer.tokens_since_fired[src::2 + src] = 5000  # a different share of each source is dead
    clt.train()
    g = torch.Generator().manual_seed(seed)
    case = dict(kind="crosslayer_aux", module=clt, x=torch.randn(3, 3, 5, 8, generator=g),
                target=torch.randn(3, 3, 5, 6, generator=g))
    if mask is not None:
        case["mask"] = mask
    return case


AUX_CASES = ("aux_topk", "aux_topk_few_dead", "aux_topk_many_dead", "aux_topk_uneven", "aux_batchtopk",
             "aux_relu", "aux_jumprelu")
CLT_AUX_CASES = ("clt_aux_topk", "clt_aux_batchtopk")


def aux_cases():
    every = torch.arange(N)
    return {
        # l1 on a TopK dictionary, the FVU objective, a mask; dead features on every rank
        "aux_topk": _aux("topk", 20, every[::3], _mask(), k=6, aux_k=5, l1_coefficient=0.01,
                         reconstruction_loss="fvu"),
        # all the dead features on the first rank, fewer than aux_k: aux_k is capped by the global count
        "aux_topk_few_dead": _aux("topk", 21, every[:3], aux_k=8),
        # more than half dead: the unsharded module takes its masked-bias path
        "aux_topk_many_dead": _aux("topk", 22, every[every % 4 != 0], aux_k=6),
        "aux_topk_uneven": _aux("topk", 23, torch.arange(0, 30, 2), n=30, k=10, aux_k=7),
        "aux_batchtopk": _aux("batchtopk", 24, every[1::2], _mask(), aux_k=6, l1_coefficient=0.02,
                              sparsity_tanh_scale=2.0),
        "aux_relu": _aux("relu", 25, every[::5], _mask(), l1_coefficient=0.05, pre_act_coefficient=0.1,
                         aux_k_coefficient=0.1, aux_k=4),
        "aux_jumprelu": _aux("jumprelu", 26, every[2::4], _mask(), jumprelu_threshold=0.05, jumprelu_bandwidth=0.05,
                             l0_coefficient=0.1, l1_coefficient=0.01, pre_act_coefficient=0.05,
                             aux_k_coefficient=0.1, aux_k=4),
        "clt_aux_topk": _crosslayer_aux("topk", 27),
        "clt_aux_batchtopk": _crosslayer_aux("batchtopk", 28, _mask(), l1_coefficient=0.02),
    }


def cases(world):
    out = {
        "topk": _case(_transcoder("topk", k=6)),
        "topk_train": _case(_transcoder("topk", k=6, seed=1), seed=1, train=True, mask=_mask()),
        "topk_one_slice": _one_slice_holds_the_top(),
        "topk_ties": _ties(),
        "topk_uneven": _case(_transcoder("topk", n=30, k=10, seed=2), seed=2),  # k > the slices at 4 ranks
        "batchtopk_train": _case(_transcoder("batchtopk", k=4, seed=4), seed=4, train=True, mask=_mask()),
        "batchtopk_uneven": _case(_transcoder("batchtopk", n=30, k=3, seed=6), seed=6, train=True),
        "batchtopk_eval": _batchtopk_eval(),
        "batchtopk_before_training": _case(_transcoder("batchtopk", k=4, seed=8), seed=8),
        "relu": _case(_transcoder("relu", seed=9), seed=9, train=True),
        "jumprelu": _case(_transcoder("jumprelu", seed=10, jumprelu_threshold=0.05, jumprelu_bandwidth=0.05),
                          seed=10, train=True),
        "clt_topk": _crosslayer("topk", 14, False),
        "clt_batchtopk": _crosslayer("batchtopk", 15, True),
        "errors": _errors(world),
        **aux_cases(),
    }
    if world == 4:
        out["mesh"] = _mesh()
    return out


_LAUNCHED = {}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``launched(world)`` -> (cases, results per rank), one launch per world size."""

    def get(world):
        if world not in _LAUNCHED:
            tmp = tmp_path_factory.mktemp(f"sharded{world}")
            cs = cases(world)
            torch.save(cs, tmp / "cases.pt")
            mp.spawn(sharded_worker.run, args=(world, str(tmp / "init"), str(tmp / "cases.pt"), str(tmp)),
                     nprocs=world, join=True)
            results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
            _LAUNCHED[world] = (cases(world), results)  # fresh copies: the reference runs on them
        return _LAUNCHED[world]

    yield get
    _LAUNCHED.clear()


def _reference(case, x=None, dy=None):
    module = copy.deepcopy(case["module"])
    x = (case["x"] if x is None else x).clone().requires_grad_()
    dy = case["dy"] if dy is None else dy
    if isinstance(module, CrossLayerTranscoder):
        acts = module.encode(x)
        y = module(x)
        values = [a.values for a in acts]
    else:
        acts = module.encode(x, case.get("mask"))
        y = module(x)
        values = [acts.values]
    sharded_worker._objective(y, dy, values).backward()
    return module, acts, y, x.grad


SHARDED = ("W_enc", "b_enc", "W_dec", "log_threshold")


def _check_transcoder_grads(full: Transcoder, got: dict, start: int, stop: int, msg: str):
    for name, p in full.named_parameters():
        want = p.grad[start:stop] if name in SHARDED else p.grad
        assert got[name] is not None, f"{msg}: {name} has no gradient"
        torch.testing.assert_close(got[name], want, **TOL, msg=f"{msg}: grad of {name}")


def _check_state(ref: torch.nn.Module, gathered: dict, msg: str):
    """The gathered module: weights bit for bit, the counters exactly; the BatchTopK threshold
    comes from a slice's GEMM, which may round its last bit differently from the full one."""
    want = ref.state_dict()
    assert set(gathered) == set(want)
    for key in want:
        tol = TOL if key.endswith("threshold") and want[key].is_floating_point() else dict(rtol=0, atol=0)
        torch.testing.assert_close(gathered[key], want[key], **tol, msg=f"{msg}: gathered {key}")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["topk", "topk_train", "topk_one_slice", "topk_ties", "topk_uneven",
                                  "batchtopk_train", "batchtopk_uneven", "batchtopk_before_training"])
def test_selection_outputs_and_gradients_match_the_unsharded_module(launched, world, name):
    cs, results = launched(world)
    case = cs[name]
    ref, acts, y, dx = _reference(case)
    assert ref.activation in ("topk", "batchtopk")
    covered = []
    for rank, res in enumerate(results):
        r = res[name]
        msg = f"{name}, rank {rank} of {world}"
        # the same features in the same slots and order: selection and tie-breaking are global
        assert torch.equal(r["indices"], acts.indices), msg
        torch.testing.assert_close(r["values"], acts.values.detach(), **TOL, msg=msg)
        torch.testing.assert_close(r["y"], y.detach(), **TOL, msg=msg)
        torch.testing.assert_close(r["dx"], dx, **TOL, msg=msg)
        _check_transcoder_grads(ref, r["grads"], r["start"], r["stop"], msg)
        # the training forwards advanced the BatchTopK threshold and the dead-feature counter alike
        _check_state(ref, r["full"], msg)
        covered.append((r["start"], r["stop"]))
    sizes = [ref.n_features // world + (r < ref.n_features % world) for r in range(world)]
    stops = torch.tensor(sizes).cumsum(0).tolist()
    assert covered == [(b - n, b) for n, b in zip(sizes, stops)]


@pytest.mark.parametrize("world", WORLDS)
def test_the_selection_is_global_when_one_slice_holds_every_top_feature(launched, world):
    cs, results = launched(world)
    case = cs["topk_one_slice"]
    ref, acts, y, _ = _reference(case)
    last = results[-1]["topk_one_slice"]
    assert bool((acts.indices >= last["start"]).all())  # the data does what it claims
    # what a per-slice selection would give: each slice's own top k, all decoded
    with torch.no_grad():
        x = case["x"].reshape(-1, D_IN)
        s = torch.relu((x - ref.b_pre) @ ref.W_enc.t() + ref.b_enc)
        f = torch.zeros_like(s)
        for res in results:
            a, b = res["topk_one_slice"]["start"], res["topk_one_slice"]["stop"]
            top = s[:, a:b].topk(ref.k, dim=1)
            f[:, a:b].scatter_(1, top.indices, top.values)
        per_slice = (f @ ref.W_dec + ref.b_dec + x @ ref.W_skip.t()).reshape(y.shape)
    assert not torch.allclose(per_slice, y.detach(), **TOL)
    for res in results:
        r = res["topk_one_slice"]
        assert torch.equal(r["indices"], acts.indices)
        torch.testing.assert_close(r["y"], y.detach(), **TOL)


@pytest.mark.parametrize("world", WORLDS)
def test_ties_go_to_the_lower_global_index(launched, world):
    cs, results = launched(world)
    case = cs["topk_ties"]
    _, acts, _, _ = _reference(case)
    twin = N // 2
    # the data ties: a feature's twin (on another rank) scores the same
    tc = case["module"]
    s = case["x"].reshape(-1, D_IN) @ tc.W_enc.t()
    assert torch.equal(s[:, :twin], s[:, twin:])
    # the unsharded rule: descending, ties by ascending index; never the upper twin when the lower one was free
    assert bool((acts.indices[0, :2] == torch.arange(8)).all())
    for res in results:
        assert torch.equal(res["topk_ties"]["indices"], acts.indices)
        torch.testing.assert_close(res["topk_ties"]["values"], acts.values.detach(), **TOL)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["relu", "jumprelu", "batchtopk_eval"])
def test_local_activations_match_the_unsharded_module(launched, world, name):
    cs, results = launched(world)
    ref, acts, y, dx = _reference(cs[name])
    dense = to_dense(acts, ref.n_features).detach()
    assert int((dense != 0).sum()) > 0
    for rank, res in enumerate(results):
        r = res[name]
        msg = f"{name}, rank {rank} of {world}"
        got = to_dense((r["values"], r["indices"]), ref.n_features)
        torch.testing.assert_close(got, dense, **TOL, msg=msg)
        torch.testing.assert_close(r["y"], y.detach(), **TOL, msg=msg)
        torch.testing.assert_close(r["dx"], dx, **TOL, msg=msg)
        _check_transcoder_grads(ref, r["grads"], r["start"], r["stop"], msg)
        _check_state(ref, r["full"], msg)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["clt_topk", "clt_batchtopk"])
def test_crosslayer_matches_the_unsharded_module(launched, world, name):
    cs, results = launched(world)
    ref, acts, y, dx = _reference(cs[name])
    for rank, res in enumerate(results):
        r = res[name]
        msg = f"{name}, rank {rank} of {world}"
        for layer, (a, v, i) in enumerate(zip(acts, r["values"], r["indices"])):
            assert torch.equal(i, a.indices), f"{msg}, layer {layer}"
            torch.testing.assert_close(v, a.values.detach(), **TOL, msg=f"{msg}, layer {layer}")
        torch.testing.assert_close(r["y"], y.detach(), **TOL, msg=msg)
        torch.testing.assert_close(r["dx"], dx, **TOL, msg=msg)
        for layer, (full, got) in enumerate(zip(ref.layers, r["grads"])):
            _check_transcoder_grads(full, got, r["start"], r["stop"], f"{msg}, layer {layer}")
        torch.testing.assert_close(r["b_dec"], ref.b_dec.grad, **TOL, msg=msg)
        torch.testing.assert_close(r["W_skip"], ref.W_skip.grad, **TOL, msg=msg)
        _check_state(ref, r["full"], msg)


def test_a_2x2_mesh_shards_over_tp_and_averages_over_dp(launched):
    cs, results = launched(4)
    case = cs["mesh"]
    refs = [_reference(case, x=case["x"][d]) for d in range(2)]
    full = refs[0][0]
    for name, p in full.named_parameters():
        p.grad = (p.grad + dict(refs[1][0].named_parameters())[name].grad) / 2
    seen = set()
    for rank, res in enumerate(results):
        r = res["mesh"]
        dp, tp = r["dp"], r["tp"]
        seen.add((dp, tp))
        msg = f"rank {rank} (dp {dp}, tp {tp})"
        assert (r["start"], r["stop"]) == (tp * N // 2, (tp + 1) * N // 2), msg  # features split over tp only
        _, acts, y, dx = refs[dp]
        assert torch.equal(r["indices"], acts.indices), msg
        torch.testing.assert_close(r["y"], y.detach(), **TOL, msg=msg)  # this replica's own batch
        torch.testing.assert_close(r["dx"], dx, **TOL, msg=msg)
        _check_transcoder_grads(full, r["grads"], r["start"], r["stop"], msg)  # averaged over dp
        assert r["no_dim"][0] == "ValueError" and "mesh_dim" in r["no_dim"][1]
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def _reference_aux(case):
    module = copy.deepcopy(case["module"])
    x = case["x"].clone().requires_grad_()
    out = module.forward_with_aux(x, case["target"], case.get("mask"))
    out.losses["loss"].backward()
    return module, out, x.grad


def _check_losses_and_metrics(r, out, msg):
    assert set(r["losses"]) == set(out.losses), msg
    for key, want in out.losses.items():
        torch.testing.assert_close(r["losses"][key], want.detach(), **TOL, msg=f"{msg}: loss {key}")
    assert set(r["metrics"]) == set(out.metrics), msg
    for key, want in out.metrics.items():
        torch.testing.assert_close(r["metrics"][key], want.detach().to(r["metrics"][key].dtype), **TOL,
                                   msg=f"{msg}: metric {key}")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", AUX_CASES)
def test_forward_with_aux_matches_the_unsharded_module(launched, world, name):
    cs, results = launched(world)
    case = cs[name]
    ref, out, dx = _reference_aux(case)
    assert float(out.losses["auxk"].detach()) > 0  # the dead features reconstruct something
    for key in ("sparsity", "l0", "pre_act"):  # the terms the case switches on are there
        coef = getattr(ref.config, {"sparsity": "l1_coefficient"}.get(key, f"{key}_coefficient"))
        assert (key in out.losses) == (coef > 0 or (key == "sparsity" and ref.activation in ("relu", "jumprelu")))
    for rank, res in enumerate(results):
        r = res[name]
        msg = f"{name}, rank {rank} of {world}"
        _check_losses_and_metrics(r, out, msg)
        if ref.activation in ("topk", "batchtopk"):
            assert torch.equal(r["indices"], out.acts.indices), msg
            torch.testing.assert_close(r["values"], out.acts.values.detach(), **TOL, msg=msg)
        else:
            torch.testing.assert_close(to_dense((r["values"], r["indices"]), ref.n_features),
                                       to_dense(out.acts, ref.n_features).detach(), **TOL, msg=msg)
        torch.testing.assert_close(r["y"], out.output.detach(), **TOL, msg=msg)
        torch.testing.assert_close(r["dx"], dx, **TOL, msg=msg)
        _check_transcoder_grads(ref, r["grads"], r["start"], r["stop"], msg)
        _check_state(ref, r["full"], msg)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", CLT_AUX_CASES)
def test_crosslayer_forward_with_aux_matches_the_unsharded_module(launched, world, name):
    cs, results = launched(world)
    ref, out, dx = _reference_aux(cs[name])
    assert float(out.losses["auxk"].detach()) > 0
    for rank, res in enumerate(results):
        r = res[name]
        msg = f"{name}, rank {rank} of {world}"
        _check_losses_and_metrics(r, out, msg)
        for layer, (a, v, i) in enumerate(zip(out.acts, r["values"], r["indices"])):
            assert torch.equal(i, a.indices), f"{msg}, layer {layer}"
            torch.testing.assert_close(v, a.values.detach(), **TOL, msg=f"{msg}, layer {layer}")
        torch.testing.assert_close(r["y"], torch.stack(out.outputs).detach(), **TOL, msg=msg)
        torch.testing.assert_close(r["dx"], dx, **TOL, msg=msg)
        for layer, (full, got) in enumerate(zip(ref.layers, r["grads"])):
            _check_transcoder_grads(full, got, r["start"], r["stop"], f"{msg}, layer {layer}")
        torch.testing.assert_close(r["b_dec"], ref.b_dec.grad, **TOL, msg=msg)
        torch.testing.assert_close(r["W_skip"], ref.W_skip.grad, **TOL, msg=msg)
        _check_state(ref, r["full"], msg)


@pytest.mark.parametrize("world", WORLDS)
def test_bad_input_raises_a_clear_error(launched, world):
    _, results = launched(world)
    for rank, res in enumerate(results):
        e = res["errors"]
        assert e["few_features"][0] == "ValueError" and "n_features" in e["few_features"][1]
        assert e["not_replicated"][0] == "ValueError" and e["not_replicated"][1].startswith("transcoder:")
        if rank:
            assert e["not_member"][0] == "ValueError" and e["not_member"][1].startswith("group:")
        assert e["other_rank_state"][0] == "ValueError" and e["other_rank_state"][1].startswith("state_dict:")
        assert e["own_state"] is None
        assert e["wrong_dtype"][0] == "TypeError" and "x" in e["wrong_dtype"][1]


def test_needs_an_initialised_process_group():
    from tckernels.nn.sharded import FeatureShardedTranscoder

    with pytest.raises(RuntimeError, match="init_process_group"):
        FeatureShardedTranscoder.from_transcoder(Transcoder(4, 8, activation="topk", k=2))
