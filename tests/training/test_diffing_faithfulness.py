"""training.diffing.faithfulness on a hand-built Run (a random 4-layer pair, adapters with random
decoders), checked against computations that share none of its batching, padding or prefix reuse:
one sequence at a time through the HF forward or forward_utils, and training.evaluate.validate."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from tests.training.conftest import make_pair, write_data
from training import forward_utils as fu
from training.diffing.faithfulness import internal_faithfulness, output_faithfulness, subset_summary

L = 4          # enough layers for subsets that touch neither end ([1, 2), [1, 3), [2, 3))
BATCH = 3      # batches mix sequence lengths, so padding is exercised
CHUNK = 5      # KL chunks much smaller than a batch's positions


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tckernels.models import adapter_modules, build_hybrid
    from training.config import Config
    from training.data import load_records, prepare_examples
    from training.diffing.run import Run
    from training.tokenizer import CharTokenizer

    root = str(tmp_path_factory.mktemp("faithfulness"))
    paths = make_pair(root, seed=3, layers=L)
    val = write_data(os.path.join(root, "val.jsonl"), 7, seed=2)
    base = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    reference = AutoModelForCausalLM.from_pretrained(paths["reference"]).eval()
    target = AutoModelForCausalLM.from_pretrained(paths["reference"])
    adapted = build_hybrid(target, base, 16, dec_bias=True, seed=0).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # non-zero decoders, so the adapted model is not the hybrid
        for m in adapter_modules(adapted).values():
            m.W_dec.copy_(0.3 * torch.randn(m.W_dec.shape, generator=g))
            m.b_dec.copy_(0.1 * torch.randn(m.b_dec.shape, generator=g))
    for m in (adapted, reference, base):
        for p in m.parameters():
            p.requires_grad_(False)
    tok = CharTokenizer()
    cfg = Config(base_model=paths["base"], reference_model=paths["reference"], train_data=val, val_data=val,
                 output_dir=root, n_features=16, kl_chunk_tokens=CHUNK, loss_on_prompt=False, append_eos=True,
                 max_seq_len=256)
    records = load_records(val)
    # loss_on_prompt false: the scored positions (answers) are fewer than the real tokens
    val_ex = prepare_examples(records, tokenizer=tok, fmt=cfg.chat_format, loss_on_prompt=False, max_seq_len=256,
                              vocab_size=reference.config.vocab_size, append_eos=True)
    assert len({len(e.input_ids) for e in val_ex}) > 1
    return Run(root, cfg, adapted, reference, base, tok, val_ex, records, torch.device("cpu"))


@pytest.fixture(scope="module")
def out(run):
    return output_faithfulness(run, batch_size=BATCH)


@pytest.fixture(scope="module")
def internal(run):
    return internal_faithfulness(run, batch_size=BATCH, subsets="all")


def _one(ex):
    ids = torch.tensor([ex.input_ids])
    return ids, torch.tensor(ex.loss_mask, dtype=torch.bool)


def _kl_top1(logits_r, logits_m):
    """Mean KL(ref || model) over the positions given, and the number where the top-1s differ."""
    lr, lm = F.log_softmax(logits_r.double(), -1), F.log_softmax(logits_m.double(), -1)
    kl = (lr.exp() * (lr - lm)).sum(-1)
    return float(kl.mean()), int((lr.argmax(-1) != lm.argmax(-1)).sum())


def _replaced_logits(run, ids, i, j):
    """Reference with its layers i..j-1 replaced by the adapted model's, from scratch (no reuse)."""
    A, R = fu.stack_of(run.adapted), fu.stack_of(run.reference)
    inputs = fu.BatchInputs(ids, None)
    h = fu.run_layers(R, fu.embed(R, inputs), inputs, 0, i)
    h = fu.run_layers(A, h, inputs, i, j)
    h = fu.run_layers(R, h, inputs, j, R.n_layers)
    return R.lm_head(fu.final_hidden(R, h))[0]


def test_output_faithfulness_matches_one_sequence_at_a_time(run, out):
    """Every model's KL and top-1 error equal a plain HF forward of one sequence at a time."""
    from tckernels.models import adapters_enabled

    kls = {m: [] for m in out["models"]}
    wrong = {m: 0 for m in out["models"]}
    n_pos = 0
    with torch.no_grad():
        for ex in run.val_ex:
            ids, sel = _one(ex)
            lr = run.reference(ids).logits[0][sel]
            logits = {"base": run.base(ids).logits[0][sel], "reference": lr}
            for m, on in (("hybrid", False), ("adapted", True)):
                with adapters_enabled(run.adapted, on):
                    logits[m] = run.adapted(ids).logits[0][sel]
            for m, lg in logits.items():
                kl, w = _kl_top1(lr, lg)
                kls[m].append(kl)
                wrong[m] += w
            n_pos += int(sel.sum())
    assert out["n_sequences"] == len(run.val_ex) and out["n_positions"] == n_pos
    for m in out["models"]:
        assert out["kl"][m] == pytest.approx(sum(kls[m]) / len(kls[m]), rel=1e-4, abs=1e-7), m
        assert out["top1_error"][m] == pytest.approx(wrong[m] / n_pos), m
    assert abs(out["kl"]["reference"]) < 1e-7 and out["top1_error"]["reference"] == 0.0
    # the check above is not vacuous: the models differ from the reference and from each other
    assert min(out["kl"][m] for m in ("base", "hybrid", "adapted")) > 1e-3
    assert abs(out["kl"]["adapted"] - out["kl"]["hybrid"]) > 1e-3
    json.dumps(out)


def test_output_and_nmse_equal_validate(run, out, internal):
    """The same numbers as the training loop's validation of the same model and data."""
    from training.evaluate import validate
    from training.losses import BridgingObjective

    obj = BridgingObjective(run.adapted, run.reference, kl_chunk_tokens=run.cfg.kl_chunk_tokens)
    v = validate(obj, run.val_ex, run.tokenizer.pad_token_id, BATCH, run.device)
    assert out["kl"]["adapted"] == pytest.approx(v["kl"], rel=1e-5, abs=1e-8)
    assert out["kl"]["hybrid"] == pytest.approx(v["kl_hybrid"], rel=1e-5, abs=1e-8)
    assert 1 - out["top1_error"]["adapted"] == pytest.approx(v["top1"])
    assert 1 - out["top1_error"]["hybrid"] == pytest.approx(v["top1_hybrid"])
    assert internal["nmse"]["adapted"] == pytest.approx(v["nmse_layers"], rel=1e-5, abs=1e-9)
    assert internal["nmse_mean"]["hybrid"] == pytest.approx(v["nmse_hybrid"], rel=1e-5, abs=1e-9)
    assert internal["n_sequences"] == v["n_sequences"] and internal["n_positions"] == v["n_positions"]


def test_nmse_matches_one_sequence_at_a_time(run, internal):
    """NMSE over every real token (prompts included), per sequence, then the mean over sequences."""
    from tckernels.models import adapters_enabled

    A, R, B = fu.stack_of(run.adapted), fu.stack_of(run.reference), fu.stack_of(run.base)
    sums = {m: torch.zeros(L + 1, dtype=torch.float64) for m in ("adapted", "hybrid", "base")}
    with torch.no_grad():
        for ex in run.val_ex:
            ids, _ = _one(ex)
            inputs = fu.BatchInputs(ids, None)
            hr = fu.free_run(R, inputs)
            with adapters_enabled(run.adapted, True):
                ha = fu.free_run(A, inputs)
            with adapters_enabled(run.adapted, False):
                hh = fu.free_run(A, inputs)
            hb = fu.free_run(B, inputs)
            for m, hs in (("adapted", ha), ("hybrid", hh), ("base", hb)):
                sums[m] += torch.tensor([float(((a.double() - r.double()) ** 2).mean() / (r.double() ** 2).mean())
                                         for a, r in zip(hs, hr)], dtype=torch.float64)
    for m, s in sums.items():
        assert internal["nmse"][m] == pytest.approx((s / len(run.val_ex)).tolist(), rel=1e-4, abs=1e-9), m
    assert internal["hidden_states"][0] == "embeddings" and len(internal["hidden_states"]) == L + 1
    # the adapters change the hidden states from the first layer on; the embeddings are shared
    assert internal["nmse"]["adapted"][0] == 0.0 and internal["nmse"]["base"][0] > 0
    assert internal["nmse"]["adapted"][1] != pytest.approx(internal["nmse"]["hybrid"][1])


def test_every_subset_matches_a_forward_from_scratch(run, internal):
    """Each entry of the matrix equals the replaced forward built from scratch, one sequence at a
    time; the diagonal is 0, below it None."""
    M = internal["subset_kl"]
    assert len(M) == L + 1 and all(len(r) == L + 1 for r in M)
    with torch.no_grad():
        lr_all = [run.reference(_one(ex)[0]).logits[0][_one(ex)[1]] for ex in run.val_ex]
        for i in range(L + 1):
            for j in range(L + 1):
                if i > j:
                    assert M[i][j] is None
                    continue
                if i == j:
                    assert M[i][j] == 0.0
                    continue
                kls = []
                for ex, lr in zip(run.val_ex, lr_all):
                    ids, sel = _one(ex)
                    kls.append(_kl_top1(lr, _replaced_logits(run, ids, i, j)[sel])[0])
                assert M[i][j] == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-7), (i, j)
    assert len({round(M[i][j], 6) for i in range(L) for j in range(i + 1, L + 1)}) > 3  # not all alike
    json.dumps(internal)


def test_cutoff_curves_equal_mixed_hidden(run, internal):
    """adapted_below_k / adapted_from_k equal forward_utils.mixed_hidden (adapted layers below k,
    resp. reference layers below k); with the target backbone the adapted model's embeddings, norm and
    head are the reference's, so the subset [0, L) is the adapted model itself."""
    A, R = fu.stack_of(run.adapted), fu.stack_of(run.reference)
    below, above = [[] for _ in range(L + 1)], [[] for _ in range(L + 1)]
    with torch.no_grad():
        for ex in run.val_ex:
            ids, sel = _one(ex)
            inputs = fu.BatchInputs(ids, None)
            lr = run.reference(ids).logits[0][sel]
            for k in range(L + 1):
                hb = fu.mixed_hidden(A, R, k, inputs)[0][sel]
                ha = fu.mixed_hidden(R, A, k, inputs)[0][sel]
                below[k].append(_kl_top1(lr, R.lm_head(hb))[0])
                above[k].append(_kl_top1(lr, A.lm_head(ha))[0])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert internal["adapted_below_k"][0] == 0.0 and internal["adapted_from_k"][L] == 0.0
    for k in range(L + 1):
        assert internal["adapted_below_k"][k] == pytest.approx(mean(below[k]), rel=1e-4, abs=1e-7), k
        assert internal["adapted_from_k"][k] == pytest.approx(mean(above[k]), rel=1e-4, abs=1e-7), k
    assert internal["adapted_below_k"][L] == internal["all_layers"] == internal["adapted_from_k"][0]


def test_all_layers_is_the_adapted_model(out, internal):
    assert internal["all_layers"] == pytest.approx(out["kl"]["adapted"], rel=1e-5, abs=1e-8)


def test_subsets_below_all_is_the_comparison(internal):
    M = internal["subset_kl"]
    others = [M[i][j] for i in range(L + 1) for j in range(i + 1, L + 1) if (i, j) != (0, L)]
    assert internal["max_subset_kl"] == max(others)
    assert internal["subsets_below_all"] == (max(others) <= internal["all_layers"])


def test_subset_summary_reads_the_matrix():
    """A subset above the all-layers KL turns subsets_below_all false; None entries are skipped."""
    n = None
    below = [[0.0, 0.1, 0.4], [n, 0.0, 0.2], [n, n, 0.0]]
    s = subset_summary(below)
    assert s["all_layers"] == 0.4 and s["max_subset_kl"] == 0.2 and s["subsets_below_all"] is True
    assert s["adapted_below_k"] == [0.0, 0.1, 0.4] and s["adapted_from_k"] == [0.4, 0.2, 0.0]
    above = [[0.0, 0.5, 0.4], [n, 0.0, 0.2], [n, n, 0.0]]
    s = subset_summary(above)
    assert s["subsets_below_all"] is False and s["max_subset_kl"] == 0.5
    s = subset_summary([[0.0, 0.3], [n, 0.0]])  # one layer: no other subset
    assert s["subsets_below_all"] is True and s["max_subset_kl"] is None


def test_cutoffs_mode_equals_all_mode(run, internal):
    cut = internal_faithfulness(run, batch_size=BATCH, subsets="cutoffs")
    assert cut["subsets"] == "cutoffs"
    for i in range(L + 1):
        for j in range(L + 1):
            if i < j and not (i == 0 or j == L):
                assert cut["subset_kl"][i][j] is None, (i, j)
            elif cut["subset_kl"][i][j] is None:
                assert internal["subset_kl"][i][j] is None
            else:
                assert cut["subset_kl"][i][j] == pytest.approx(internal["subset_kl"][i][j], rel=1e-6, abs=1e-9)
    for key in ("adapted_below_k", "adapted_from_k"):
        assert cut[key] == pytest.approx(internal[key], rel=1e-6, abs=1e-9), key
    assert cut["nmse"] == internal["nmse"]  # the same computation in both modes
    assert cut["all_layers"] == pytest.approx(internal["all_layers"], rel=1e-6)
    others = [cut["subset_kl"][k][L] for k in range(1, L)] + [cut["subset_kl"][0][k] for k in range(1, L)]
    assert cut["subsets_below_all"] == (max(others) <= cut["all_layers"])


def test_bad_arguments(run):
    with pytest.raises(ValueError, match="subsets"):
        internal_faithfulness(run, subsets="some")
    with pytest.raises(ValueError, match="batch_size"):
        output_faithfulness(run, batch_size=0)
