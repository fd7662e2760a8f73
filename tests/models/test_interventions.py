"""On/off, feature interventions, recording and statistics, each against a by-hand computation."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tckernels.models import (  # noqa: E402
    ablate_features,
    add_intervention,
    adapter_modules,
    adapter_stats,
    adapters_enabled,
    clamp_features,
    clear_interventions,
    dead_feature_counts,
    fired_features,
    interventions_of,
    l0_per_layer,
    record_features,
    scale_features,
    set_adapters_enabled,
    steer_features,
    update_feature_stats_,
)
from tests.models import (  # noqa: E402
    N_FEATURES,
    MLPInputs,
    adapted_qwen2,
    assert_close,
    by_hand,
    dense_features,
    ids,
    plain_qwen2,
)


@pytest.fixture(scope="module")
def plain():
    return plain_qwen2()


@pytest.fixture
def model(plain):
    return adapted_qwen2(plain)


def run(model, x):
    with MLPInputs(model) as io, torch.no_grad():
        logits = model(x).logits
    return logits, io


@torch.no_grad()
def test_on_off_per_layer(model, plain):
    x = ids()
    ref = plain(x).logits
    set_adapters_enabled(model, False, layers=[0, 2])
    assert [m.enabled for m in adapter_modules(model).values()] == [False, True, False]
    _, io = run(model, x)
    for i, mlp in adapter_modules(model).items():
        expect = mlp.base_mlp(io.inputs[i]) if i != 1 else by_hand(mlp, io.inputs[i])
        assert_close(io.outputs[i], expect)
    with adapters_enabled(model, False, layers=[1]):
        assert torch.equal(model(x).logits, ref)
    assert [m.enabled for m in adapter_modules(model).values()] == [False, True, False]
    with adapters_enabled(model):  # all on inside, previous states after
        assert all(m.enabled for m in adapter_modules(model).values())
    assert [m.enabled for m in adapter_modules(model).values()] == [False, True, False]
    with pytest.raises(ValueError, match="layers: unknown layer index 3"):
        set_adapters_enabled(model, True, layers=[3])
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_adapters_enabled(model, 1)


@torch.no_grad()
def test_ablating_every_feature_equals_adapters_off(model, plain):
    x = ids()
    ref = plain(x).logits
    with ablate_features(model):
        assert torch.equal(model(x).logits, ref)
    assert not torch.equal(model(x).logits, ref)
    # with a decoder bias only b_dec is left
    biased = adapted_qwen2(plain, transcoder_dec_bias=True)
    with ablate_features(biased, "all"):
        _, io = run(biased, x)
    for i, mlp in adapter_modules(biased).items():
        assert_close(io.outputs[i], mlp.base_mlp(io.inputs[i]) + mlp.b_dec)


@torch.no_grad()
def test_each_intervention_against_the_formula(model):
    x = ids(batch=2, seq=8)
    feats = [1, 5, 17, 40]
    layer = 1
    cases = {
        "zero": (
            lambda: ablate_features(model, feats, layers=[layer]),
            lambda f: f.index_fill(-1, torch.tensor(feats), 0.0),
        ),
        "scale": (
            lambda: scale_features(model, feats, 3.0, layers=[layer]),
            lambda f: _cols(f, feats, lambda c: c * 3),
        ),
        "scale_per_feature": (
            lambda: scale_features(model, feats, torch.tensor([0.5, 2.0, -1.0, 4.0]), layers=[layer]),
            lambda f: _cols_each(f, feats, [0.5, 2.0, -1.0, 4.0], lambda c, v: c * v),
        ),
        "clamp": (
            lambda: clamp_features(model, feats, 2.5, layers=[layer]),
            lambda f: _cols(f, feats, lambda c: torch.full_like(c, 2.5)),
        ),
        "steer": (lambda: steer_features(model, 7, -4.0, layers=[layer]), lambda f: _cols(f, [7], lambda c: c - 4.0)),
    }
    for name, (make, change) in cases.items():
        with make():
            _, io = run(model, x)
        for i, mlp in adapter_modules(model).items():
            f = dense_features(mlp, io.inputs[i])
            if i == layer:
                f = change(f)
            assert_close(io.outputs[i], by_hand(mlp, io.inputs[i], f=f), atol=1e-4, rtol=1e-4), name
    # removed after each block
    assert not interventions_of(model.model.layers[layer].mlp).entries


def _cols(f, feats, fn):
    f = f.clone()
    f[..., feats] = fn(f[..., feats])
    return f


def _cols_each(f, feats, values, fn):
    f = f.clone()
    for j, v in zip(feats, values):
        f[..., j] = fn(f[..., j], v)
    return f


@torch.no_grad()
def test_interventions_compose_in_order_and_per_layer_dict(model):
    x = ids()
    mlp0 = model.model.layers[0].mlp
    h1 = scale_features(model, [2, 3], 2.0, layers=[0])
    h2 = steer_features(model, [3], 1.0, layers=[0])
    h3 = ablate_features(model, [2], layers=[0])
    _, io = run(model, x)
    f = dense_features(mlp0, io.inputs[0])
    f[..., 3] = f[..., 3] * 2 + 1
    f[..., 2] = 0
    assert_close(io.outputs[0], by_hand(mlp0, io.inputs[0], f=f), atol=1e-4, rtol=1e-4)
    h3.remove()
    h3.remove()  # harmless
    h1.remove()
    h2.remove()
    assert not interventions_of(mlp0).entries
    handle = ablate_features(model, {0: [1], 2: "all"})
    _, io = run(model, x)
    mods = adapter_modules(model)
    f0 = dense_features(mods[0], io.inputs[0]).index_fill(-1, torch.tensor([1]), 0.0)
    assert_close(io.outputs[0], by_hand(mods[0], io.inputs[0], f=f0))
    assert_close(io.outputs[1], by_hand(mods[1], io.inputs[1]))
    assert_close(io.outputs[2], mods[2].base_mlp(io.inputs[2]))
    clear_interventions(model)
    assert not any(interventions_of(m).entries for m in mods.values())
    handle.remove()


def test_intervention_errors(model):
    msg = r"features: feature index 48 is out of range; the adapter has n_features = 48"
    with pytest.raises(ValueError, match=msg):
        ablate_features(model, [3, 48], layers=[0])
    with pytest.raises(ValueError, match="features: feature index -1 is out of range"):
        steer_features(model, -1, 1.0)
    with pytest.raises(ValueError, match="layers: unknown layer index 9"):
        ablate_features(model, [1], layers=[9])
    with pytest.raises(ValueError, match="layers: unknown layer index 4"):
        ablate_features(model, {4: [1]})
    with pytest.raises(ValueError, match="value must be a number or hold one value per feature"):
        scale_features(model, [1, 2], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="features must hold integer feature indices"):
        clamp_features(model, [1.5], 1.0)
    with pytest.raises(TypeError, match="features must hold integer feature indices"):
        clamp_features(model, torch.tensor([True, False]), 1.0)
    with pytest.raises(ValueError, match="layers must be None"):
        ablate_features(model, {0: [1]}, layers=[0])
    # a failure at one layer leaves no intervention behind at the others
    assert not any(interventions_of(m).entries for m in adapter_modules(model).values())


@torch.no_grad()
def test_record_features_matches_dense_activations(model):
    x = ids(batch=2, seq=5)
    with record_features(model, layers=[0, 2]) as rec:
        _, io = run(model, x)
        with ablate_features(model, "all"):  # records show the encoder's output, not the ablated one
            _, io2 = run(model, x)
    assert set(rec.records) == {0, 2} and len(rec.records[0]) == 2
    for i in (0, 2):
        mlp = model.model.layers[i].mlp
        dense = rec.dense(i)
        assert dense.shape == (2, 10, N_FEATURES)
        expect = dense_features(mlp, io.inputs[i])
        assert_close(dense[:, :5], expect)
        assert_close(dense[:, 5:], dense_features(mlp, io2.inputs[i]))
        values, indices = rec.tokens(i)
        assert values.shape == indices.shape and values.shape[:2] == (2, 10)
        act = rec.active(i)
        assert len(act) == 20
        assert sorted(f for f, _ in act[0]) == sorted((expect[0, 0] > 0).nonzero().squeeze(1).tolist())
    model(x)  # outside the block: nothing more is recorded
    assert len(rec.records[0]) == 2
    with pytest.raises(ValueError, match=r"layer: unknown layer index 1; recorded layers: \[0, 2\]"):
        rec.tokens(1)
    with record_features(model, to_cpu=True) as rec2:
        model(x)
    assert set(rec2.records) == {0, 1, 2}


@torch.no_grad()
def test_l0_and_dead_features_count_real_tokens_only(model):
    x = ids(batch=2, seq=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False
    with record_features(model) as rec:
        _, io = run(model, x)
    for i, l0 in l0_per_layer(rec, mask).items():
        f = dense_features(adapter_modules(model)[i], io.inputs[i])
        assert_close(l0, (f > 0).sum(-1)[mask].double().mean())
    update_feature_stats_(rec, mask)
    mlp = model.model.layers[0].mlp
    f = dense_features(mlp, io.inputs[0])
    fired_real = (f > 0)[mask].any(0)
    assert torch.equal(fired_features(rec, mask)[0], fired_real)
    expect = torch.where(fired_real, 0, int(mask.sum()))
    assert torch.equal(mlp.tokens_since_fired, expect)
    counts = dead_feature_counts(model, int(mask.sum()))
    assert int(counts[0]) == int((~fired_real).sum())
    assert int(dead_feature_counts(model, 1000)[0]) == 0
    stats = adapter_stats(rec, mask, dead_thresholds=(8,), update=True)  # counts this forward again
    per_layer = {f"{name}/layer_{i}" for name in ("l0", "dead_8") for i in range(3)}
    assert set(stats) == {"l0", "dead_8", *per_layer}
    assert int(stats["dead_8/layer_0"]) == int((~fired_real).sum())
    with pytest.raises(ValueError, match="threshold must be a positive int"):
        dead_feature_counts(model, 0)
    set_adapters_enabled(model, False, layers=[1])
    with record_features(model) as rec_off:
        model(x)
    assert set(l0_per_layer(rec_off)) == {0, 2}  # layer 1 had no activations


@torch.no_grad()
def test_one_adapter_interventions_and_a_foreign_edit(model):
    x = ids()
    mlp = model.model.layers[1].mlp
    with add_intervention(mlp, "zero", "all"):
        _, io = run(model, x)
        assert len(interventions_of(mlp)) == 1
    assert_close(io.outputs[1], mlp.base_mlp(io.inputs[1]))
    assert not interventions_of(mlp).entries
    with pytest.raises(ValueError, match="kind must be one of"):
        add_intervention(mlp, "double", [1])
    with pytest.raises(ValueError, match="kind 'zero' takes no value"):
        add_intervention(mlp, "zero", [1], 2.0)
    with pytest.raises(ValueError, match="kind 'scale' needs a value"):
        add_intervention(mlp, "scale", [1])
    mlp.feature_edit = lambda acts, W_dec: (acts, None)  # someone else's edit is not overwritten
    with pytest.raises(ValueError, match="feature_edit is a function, not the interventions"):
        ablate_features(model, [1], layers=[1])
    mlp.feature_edit = None
