"""The transcoder trainer's throughput: tokens per second of ``training.transcoders.train_step`` (the
real loop: a batch from the ActivationBuffer, standardisation, ``forward_with_aux`` with AuxK,
backward, clipping, AdamW, schedule) against the same loop written with dense PyTorch (F.linear +
bias + ReLU + torch.topk over all N, decode by scattering into [B, N] and a matmul, AuxK done
densely on the same pre-activations, the same AdamW, clipping and schedule), the dense loop fed by
an identical ActivationBuffer over the same model. Target (at the GPT-2 shape, on the CPU): the
trainer >= 3x the dense loop's tokens/s.

    python -m pytest bench/test_transcoder_trainer.py -s          # --save: into bench/results/

Shapes:
  tiny   the default run: training/configs/transcoders_tiny.yaml as it is, on the shipped tiny model
  gpt2   d 768, 24,576 features, k 32, 2048 tokens per step, every layer of a random 2-layer Qwen2
         (hidden 768, intermediate 3072, 12 heads, the tiny tokenizer's vocabulary), made here and
         saved to a temporary folder, on the shipped tiny text

The ratio comes from interleaved rounds (one step of each loop per round, the ratio taken within
the round, then the median), so that load drifting on a shared machine hits both alike. Both loops
start from the same weights and standardisation, so their first losses agree (recorded). The share
of the trainer's time that goes to making activations (the model forwards of its ActivationStream)
is read from the stream's ``seconds``; the rounds span whole refills of the buffer, so each token
trained was made once within them. TCK_BENCH_SMOKE=1 runs both entries at toy sizes (its numbers
mean nothing). Writes transcoder_trainer_cpu.json in bench/harness.py's results format (family
"loop", op "transcoder_trainer", providers tckernels and dense_eager; each figure's "extra" holds
tokens/s, the activation share, the first-step loss and the configuration) to the folder
``bench.conftest.results_dir`` names. A missed target is reported, not failed.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from bench import harness  # noqa: E402
from bench.conftest import ROOT  # noqa: E402
from training.activations import ActivationBuffer, ActivationStream  # noqa: E402
from training.loop import Dist  # noqa: E402
from training.transcoders import load_config, schedule, setup, train_step  # noqa: E402

SMOKE = os.environ.get("TCK_BENCH_SMOKE") == "1"
TINY_BASE = ROOT / "training" / "assets" / "tiny" / "base"
TINY_TEXT = ROOT / "training" / "assets" / "tiny" / "train.jsonl"
TARGET = 3.0  # trainer tokens/s over the dense loop's, at the gpt2 shape

# model: None for the shipped tiny model, else the random Qwen2's sizes. overrides: config fields.
# The buffers hold four batches (gpt2) or 32 (tiny) and refill half when half is served, so rounds in
# multiples of 2 (gpt2) or 16 (tiny) after the warm-up step span whole refills; a burst of other load
# during one refill moves the share less the more refills the rounds hold (tiny's steps are cheap).
SHAPES = {
    "tiny": dict(model=None, overrides={}, rounds=96),
    "gpt2": dict(
        model=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
                   num_key_value_heads=12),
        # dead_after_tokens = one batch: a feature that did not fire in the previous batch is dead,
        # so AuxK does its work in every timed step, as early in a real run (with the default of
        # 10^6 tokens it would start only after ~490 steps). Two batches estimate the
        # standardisation: setup's forwards are not what is measured.
        overrides=dict(n_features=24576, k=32, batch_tokens=2048, buffer_tokens=8192, dead_after_tokens=2048,
                       standardize_batches=2),
        rounds=6,
        target=TARGET,
    ),
}
if SMOKE:
    SHAPES = {
        # buffers of four batches and forwards no larger than a refill: two rounds span one refill
        "tiny": dict(model=None, overrides=dict(standardize_batches=2, buffer_tokens=2048, forward_batch_size=2),
                     rounds=2),
        "gpt2": dict(
            model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4),
            overrides=dict(n_features=512, k=8, batch_tokens=256, buffer_tokens=1024, dead_after_tokens=256,
                           standardize_batches=2, forward_batch_size=2),
            rounds=2,
            target=TARGET,
        ),
    }

@pytest.fixture(scope="module")
def results():
    r = harness.Results("transcoder_trainer", "cpu", {name: spec["rounds"] for name, spec in SHAPES.items()})
    yield r
    r.report()


def _random_model(path: Path, sizes: dict) -> None:
    """A randomly initialised Qwen2 with the tiny tokenizer's vocabulary and special tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tiny = json.loads((TINY_BASE / "config.json").read_text())
    config = Qwen2Config(vocab_size=tiny["vocab_size"], max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tiny["bos_token_id"], eos_token_id=tiny["eos_token_id"],
                         pad_token_id=tiny["pad_token_id"], **sizes)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)


class DenseLoop:
    """The trainer's step in dense eager PyTorch, from the same initial weights (the trainer's seeded
    draws) and standardisation (estimated from the same first batches of an identical buffer)."""

    def __init__(self, cfg, source: ActivationStream, buffer_tokens: int, batch_tokens: int, std_in, std_out):
        if cfg.activation != "topk":
            raise ValueError(f"the dense loop is TopK's; the config asks for {cfg.activation!r}")
        self.cfg = cfg
        # the trainer's stream settings over the same model and token rows; its own position
        self.stream = ActivationStream(source.model, source.sequences, source.layers, source.input_hook,
                                       source.output_hook, forward_batch_size=source.forward_batch_size,
                                       seed=source.seed, stop_early=source.stop_early)
        self.buffer = ActivationBuffer(self.stream, buffer_tokens, batch_tokens, seed=cfg.seed)
        n_layers, d_in, d_out, N = len(source.layers), source.d_in, source.d_out, cfg.n_features
        self.k, self.n_features = cfg.k, N
        self.aux_k = max(d_out // 2, 1)  # Transcoder's default
        self.aux_coef = 1.0 / 32.0 if cfg.aux_k_coefficient is None else float(cfg.aux_k_coefficient)
        # the trainer's estimate, from the first batches of an identical buffer, which this one skips too
        for _ in range(cfg.standardize_batches if cfg.standardize != "none" else 0):
            self.buffer.next_batch()
        self.std = None if cfg.standardize == "none" else [  # float32 once: two broadcast ops per step
            (si.mean.float(), si.std.float(), so.mean.float(), so.std.float()) for si, so in zip(std_in, std_out)]
        self.params = []
        for i in range(n_layers):
            torch.manual_seed(cfg.seed * 1000 + i)
            g = torch.Generator().manual_seed(cfg.seed * 1000 + i)
            bound = 1.0 / math.sqrt(d_in)
            W_enc = torch.empty(N, d_in).uniform_(-bound, bound, generator=g)
            W_dec = torch.empty(N, d_out).normal_()
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            self.params.append({name: t.requires_grad_() for name, t in
                                (("W_enc", W_enc), ("b_enc", torch.zeros(N)), ("W_dec", W_dec),
                                 ("b_dec", torch.zeros(d_out)))})
        self.tokens_since_fired = [torch.zeros(N, dtype=torch.int64) for _ in range(n_layers)]
        flat = [p for layer in self.params for p in layer.values()]
        self.optimizer = torch.optim.AdamW(flat, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(cfg))
        self.flat = flat

    def step(self) -> dict:
        cfg = self.cfg
        b = self.buffer.next_batch()
        total = 0.0
        per_layer = []
        for j, p in enumerate(self.params):
            x, y = b.inputs[:, j], b.outputs[:, j]
            if self.std is not None:
                mi, si, mo, so = self.std[j]
                x, y = (x - mi) / si, (y - mo) / so
            counter = self.tokens_since_fired[j]
            dead = counter >= cfg.dead_after_tokens  # before this batch, as the trainer's
            pre = F.linear(x, p["W_enc"], p["b_enc"])
            top = torch.topk(torch.relu(pre), self.k, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            out = torch.addmm(p["b_dec"], acts, p["W_dec"])
            sq = (out - y).pow(2)
            mse = sq.mean()
            with torch.no_grad():
                fired = (acts > 0).any(0)
                counter += x.shape[0]
                counter[fired] = 0
                fvu = sq.sum() / (y - y.mean(0)).pow(2).sum()
                l0 = (acts > 0).sum(-1).float().mean()
            loss = mse
            rec = {"fvu": float(fvu), "l0": float(l0), "dead": int((counter >= cfg.dead_after_tokens).sum())}
            n_dead = int(dead.sum())
            if self.aux_coef > 0:
                auxk = torch.zeros(())
                if n_dead:
                    e = (y - out).detach()
                    aux = torch.topk(pre.masked_fill(~dead, float("-inf")), min(self.aux_k, n_dead), dim=-1)
                    aux_acts = torch.zeros_like(pre).scatter(-1, aux.indices, torch.relu(aux.values))
                    auxk = (e - aux_acts @ p["W_dec"]).pow(2).sum() / e.pow(2).sum().clamp_min(1e-30)
                loss = loss + self.aux_coef * auxk
                rec["auxk"] = float(auxk.detach())
            total = total + loss
            per_layer.append(rec)
        total.backward()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.flat, max_norm))
        loss = float(total.detach())
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise FloatingPointError(f"dense loop: loss {loss}, grad norm {grad_norm}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": grad_norm, "layers": per_layer}


def _measure(name: str, spec: dict, tmp: Path) -> dict:
    argv = ["--output_dir", str(tmp / "run")]
    if spec["model"] is not None:
        _random_model(tmp / "model", spec["model"])
        argv += ["--model", str(tmp / "model"), "--tokenizer", str(TINY_BASE), "--train_data", str(TINY_TEXT)]
    for field, value in spec["overrides"].items():
        argv += [f"--{field}", str(value)]
    cfg = load_config(argv)
    tr = setup(cfg, Dist(cfg))
    source = tr.buffer.source
    dense = DenseLoop(cfg, source, tr.buffer.capacity, tr.buffer.batch_tokens, tr.std_in, tr.std_out)

    first = {"trainer": train_step(tr)["loss"], "dense": dense.step()["loss"]}  # warm-up
    rounds = spec["rounds"]
    seconds0 = {"trainer": source.seconds, "dense": dense.stream.seconds}
    forwards0 = source.forwards
    times = {"trainer": [], "dense": []}
    making = {"trainer": [], "dense": []}  # per round: the part of the step spent in model forwards
    for _ in range(rounds):
        s_t, s_d = source.seconds, dense.stream.seconds
        t0 = time.perf_counter()
        rec_t = train_step(tr)
        t1 = time.perf_counter()
        rec_d = dense.step()
        t2 = time.perf_counter()
        times["trainer"].append(t1 - t0)
        times["dense"].append(t2 - t1)
        making["trainer"].append(source.seconds - s_t)
        making["dense"].append(dense.stream.seconds - s_d)
    made = {"trainer": source.seconds - seconds0["trainer"], "dense": dense.stream.seconds - seconds0["dense"]}
    share = {v: made[v] / sum(times[v]) for v in times}
    ratios = [d / t for d, t in zip(times["dense"], times["trainer"])]
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    tokens = cfg.batch_tokens
    speedup = statistics.median(ratios)
    target = spec.get("target")
    result = {
        "config": {"model": "training/assets/tiny/base" if spec["model"] is None else
                   dict(type="qwen2 (random)", **spec["model"]),
                   "layers": list(source.layers), "d_in": source.d_in, "d_out": source.d_out,
                   **{f: getattr(cfg, f) for f in ("n_features", "k", "batch_tokens", "buffer_tokens",
                                                   "forward_batch_size", "context_length", "standardize",
                                                   "standardize_batches", "dead_after_tokens", "learning_rate",
                                                   "max_grad_norm")},
                   "aux_k": dense.aux_k, "aux_k_coefficient": dense.aux_coef, "dtype": cfg.dtype},
        "rounds": rounds,
        "step_seconds": times,
        "median_step_s": medians,
        "tokens_per_s": {v: tokens / s for v, s in medians.items()},
        "speedup_per_round": ratios,
        "speedup": speedup,
        "target": target,
        "target_met": None if target is None else speedup >= target,
        "activation_share": share,
        "activation_seconds": made,
        "activation_seconds_per_round": making,
        "tokens_made_in_rounds": (source.forwards - forwards0) * source.forward_batch_size * source.context_length,
        "tokens_trained_in_rounds": rounds * tokens,
        "dead_features_last_step": {"trainer": [r["dead"] for r in rec_t["layers"]],
                                    "dense": [r["dead"] for r in rec_d["layers"]]},
        "first_step_loss": first,
    }
    del tr, dense, source
    gc.collect()
    return result


def _summary(name: str, r: dict) -> str:
    t, d = r["median_step_s"]["trainer"], r["median_step_s"]["dense"]
    tps = r["tokens_per_s"]
    c = r["config"]
    line = (f"{name} (d {c['d_in']}, {c['n_features']} features, k {c['k']}, {c['batch_tokens']} tokens/step, "
            f"{len(c['layers'])} layers): trainer {t * 1e3:.0f} ms/step = {tps['trainer']:,.0f} tokens/s, "
            f"dense loop {d * 1e3:.0f} ms/step = {tps['dense']:,.0f} tokens/s; trainer {r['speedup']:.2f}x "
            f"(median of {r['rounds']} rounds")
    if r["target"] is not None:
        line += f", target {r['target']}x {'met' if r['target_met'] else 'MISSED'}"
    return line + (f"); activations {100 * r['activation_share']['trainer']:.0f}% of the trainer's time "
                   f"({100 * r['activation_share']['dense']:.0f}% of the dense loop's)")


def _rows(results, name: str, r: dict) -> None:
    c = r["config"]
    common = dict(family="loop", op="transcoder_trainer", dtype=c["dtype"], shape_set=name, mode="full",
                  shape={"M": c["batch_tokens"], "D": c["d_in"], "N": c["n_features"], "k": c["k"],
                         "layers": len(c["layers"])})
    for loop, provider in (("trainer", "tckernels"), ("dense", "dense_eager")):
        extra = {"tokens_per_s": r["tokens_per_s"][loop], "activation_share": r["activation_share"][loop],
                 "first_step_loss": r["first_step_loss"][loop], "rounds": r["rounds"]}
        if loop == "trainer":
            extra.update(config=c, tokens_made_in_rounds=r["tokens_made_in_rounds"],
                         tokens_trained_in_rounds=r["tokens_trained_in_rounds"],
                         dead_features_last_step=r["dead_features_last_step"])
        ours = loop == "trainer"
        results.row(provider=provider, times=r["step_seconds"][loop], baseline="dense_eager" if ours else None,
                    speedup=r["speedup"] if ours else None, target=r["target"] if ours else None,
                    extra=extra, **common)


@pytest.mark.parametrize("name", list(SHAPES))
def test_trainer_vs_dense_loop(results, name):
    with tempfile.TemporaryDirectory(prefix="tck-bench-trainer-") as tmp:
        r = _measure(name, SHAPES[name], Path(tmp))
    _rows(results, name, r)
    path = results.write()
    print("\n" + _summary(name, r))
    print(f"first-step loss: trainer {r['first_step_loss']['trainer']:.6f}, "
          f"dense loop {r['first_step_loss']['dense']:.6f}")
    print(f"written to {path}")
    assert r["median_step_s"]["trainer"] > 0 and r["median_step_s"]["dense"] > 0
    # otherwise the share is not the steady state's: the rounds must make what they train on
    assert r["tokens_made_in_rounds"] == r["tokens_trained_in_rounds"], r
    assert 0 < r["activation_share"]["trainer"] < 1
    # a benchmark reports a missed target (in its JSON and above); it does not fail on a busy machine
