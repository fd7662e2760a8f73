"""Train per-layer transcoders (MLP input -> MLP output) on a causal LM's activations.

    python -m training.transcoders                        # the embedded tiny default, minutes on a CPU
    python -m training.transcoders --config FILE.yaml [--field value ...]
    python -m training.transcoders --help                 # every field

The loop, in order: check the configuration and files (every problem is reported before training);
load the model and the packed token rows (``training/activations.py``); an endless, seeded
``ActivationStream`` of every chosen layer's (``mlp_in``, ``mlp_out``) from one forward, served in
shuffled batches by an ``ActivationBuffer``; one ``tckernels.nn.Transcoder`` per layer. The first
``standardize_batches`` batches estimate each layer's input and output standardisation
(``Standardizer``; read for that only), and the transcoders train on standardised activations, so one
learning rate fits layers of any scale. Per step: each transcoder's own objective
(``forward_with_aux``: reconstruction, AuxK for dead TopK features, l1 for relu, l0 for jumprelu),
summed over layers; gradient clipping; AdamW; warm-up then cosine (or constant). Metrics go to
``<output_dir>/metrics.jsonl``; checkpoints (transcoders, optimizer, scheduler, buffer position, RNG
states) every ``save_every`` steps resume exactly; a non-finite loss stops the run. Validation: per
layer FVU, L0 and dead fraction on held-out tokens, and the replacement model's KL(original ||
replaced) and top-1 agreement with every chosen layer's MLP replaced by its transcoder, and with each
layer alone. At the end the standardisation is folded into the weights and each transcoder is saved
with ``save_transcoder`` to ``<output_dir>/transcoders/layer_<i>`` (it runs on raw activations), with
``summary.json``.

Shared with the adapter loop (``training/train.py``): the config machinery, checkpoints, the
output_dir rules, the processes/device handling, the schedule and the metrics file.

``_run`` is that loop: ``setup`` (a ``Trainer``), then per step ``train_step``, ``log_step``,
``validate`` when due and ``write_checkpoint``, and ``finish``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from tckernels.nn import Standardizer, Transcoder, fold_standardization_, save_transcoder
from tckernels.nn.standardize import Standardization
from tckernels.nn import metrics as M
from training import checkpoint as ckpt
from training import config as config_lib
from training.activations import ActivationBuffer, ActivationStream, capture_activations, load_sequences
from training.config import ConfigError, _f, config_path_of
from training.data import DataError, load_tokenizer
from training.reporting import Reporter, progress_bar, say
from training.train import (Dist, SetupError, TrainingDiverged, _check_model_path, _load_model,
                            check_output_dir, clear_earlier_run, lr_lambda)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "transcoders_tiny.yaml")


@dataclass
class TranscoderRunConfig:
    # ---- model and data -----------------------------------------------------------------------
    model: str = _f("", "the model whose MLPs are transcoded (HF id or local directory)")
    tokenizer: Optional[str] = _f(None, "tokenizer (default: the model's)")
    dtype: str = _f("float32", "dtype the model runs in", ("float32", "bfloat16", "float16"))
    attn_implementation: Optional[str] = _f(None, "HF attention implementation (eager, sdpa, flash_attention_2)")
    layers: str = _f("all", "layers to transcode: 'all' or comma-separated indices, e.g. '0,2,5'")
    train_data: str = _f("", "training text: .jsonl/.json/.parquet, a saved HF dataset, or a hub name")
    train_split: str = _f("train", "split of a saved/hub dataset")
    val_data: Optional[str] = _f(None, "held-out text (default: the last val_sequences rows of train_data)")
    val_split: str = _f("validation", "split of a saved/hub validation dataset")
    text_field: str = _f("text", "field of a record that holds its text (chat records are rendered)")
    chat_format: str = _f("deepseek", "prompt format of chat records", ("deepseek", "chatml"))
    context_length: int = _f(128, "tokens per packed row (documents joined with EOS)")
    max_train_sequences: Optional[int] = _f(None, "use at most this many training rows")
    forward_batch_size: int = _f(8, "rows per model forward")
    buffer_tokens: int = _f(32768, "activations held in the shuffling buffer")
    batch_tokens: int = _f(1024, "tokens per optimizer step")
    cache_dir: Optional[str] = _f(None, "on-disk activation cache (.npy shards), reused when it matches")
    # ---- transcoders --------------------------------------------------------------------------
    n_features: int = _f(1024, "features per layer")
    activation: str = _f("topk", "feature activation", ("topk", "batchtopk", "relu", "jumprelu"))
    k: Optional[int] = _f(32, "features per token for topk/batchtopk")
    l1_coefficient: float = _f(0.0, "weight of the l1 sparsity term (relu; any activation when > 0)")
    l0_coefficient: float = _f(0.0, "weight of the L0 term (jumprelu)")
    jumprelu_threshold: float = _f(0.001, "initial JumpReLU threshold")
    aux_k_coefficient: Optional[float] = _f(None, "weight of AuxK (null: 1/32 for topk/batchtopk, else 0)")
    dead_after_tokens: int = _f(1_000_000, "a feature that has not fired for this many training tokens is dead")
    standardize: str = _f("layer", "standardise inputs and outputs: one std per layer, per dimension, or not",
                          ("layer", "dim", "none"))
    standardize_batches: int = _f(8, "batches read to estimate the standardisation")
    # ---- optimisation -------------------------------------------------------------------------
    learning_rate: float = _f(1e-3, "peak AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    schedule: str = _f("cosine", "after warm-up: cosine decay or constant", ("cosine", "constant"))
    warmup_ratio: float = _f(0.05, "fraction of the steps with linear warm-up")
    min_lr_ratio: float = _f(0.0, "the cosine decays to learning_rate * min_lr_ratio")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    max_steps: int = _f(1000, "optimizer steps")
    seed: int = _f(0, "seed of the initialisation, data order and buffer shuffles")
    device: str = _f("auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'")
    num_threads: Optional[int] = _f(None, "torch CPU threads (default: torch's)")
    # ---- run, logging, checkpoints ------------------------------------------------------------
    output_dir: str = _f("runs/transcoders", "where metrics, checkpoints and the transcoders go")
    log_every: int = _f(10, "steps between metric lines")
    save_every: int = _f(0, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(2, "most recent checkpoints kept")
    resume_from: Optional[str] = _f(None, "checkpoint directory to resume, or 'latest' (the newest in output_dir)")
    overwrite_output_dir: bool = _f(False, "start afresh in an output_dir that holds an earlier run, deleting it")
    halt_at_step: Optional[int] = _f(None, "stop (with a checkpoint) after this step, as if interrupted")
    progress_bar: bool = _f(True, "show a progress bar (progress lines instead when not on a terminal)")
    report_to: str = _f("none", "also log to wandb or tensorboard", ("none", "wandb", "tensorboard"))
    wandb_project: str = _f("transcoders", "wandb project")
    # ---- evaluation ---------------------------------------------------------------------------
    eval_every: int = _f(0, "steps between validations (0: at the end only)")
    val_sequences: int = _f(16, "held-out rows for validation")
    val_batch_size: int = _f(8, "rows per validation forward")

    def validate(self) -> "TranscoderRunConfig":
        errs = []
        for f in dataclasses.fields(self):
            ch = f.metadata.get("choices")
            if ch and getattr(self, f.name) not in ch:
                errs.append(f"{f.name}: {getattr(self, f.name)!r} is not one of {list(ch)}")
        for name in ("context_length", "forward_batch_size", "buffer_tokens", "batch_tokens", "n_features",
                     "dead_after_tokens", "standardize_batches", "max_steps", "log_every", "keep_checkpoints",
                     "val_sequences", "val_batch_size"):
            if getattr(self, name) < 1:
                errs.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_sequences", "halt_at_step", "num_threads", "k"):
            v = getattr(self, name)
            if v is not None and v < 1:
                errs.append(f"{name}: must be >= 1 or null, got {v}")
        for name in ("save_every", "eval_every", "l1_coefficient", "l0_coefficient", "weight_decay",
                     "max_grad_norm", "adam_eps"):
            if getattr(self, name) < 0:
                errs.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            errs.append(f"learning_rate: must be > 0, got {self.learning_rate}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                errs.append(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                errs.append(f"k: activation {self.activation!r} needs k (features per token)")
            elif self.k > self.n_features:
                errs.append(f"k: {self.k} > n_features {self.n_features}")
        if self.buffer_tokens < 2 * self.batch_tokens:
            errs.append(f"buffer_tokens: {self.buffer_tokens} must be at least 2 x batch_tokens ({self.batch_tokens})")
        try:
            self.layer_list(None)
        except ConfigError as e:
            errs.append(str(e))
        for name in ("model", "train_data", "output_dir"):
            if not getattr(self, name):
                errs.append(f"{name}: must be given")
        if self.overwrite_output_dir and self.resume_from == "latest":
            errs.append("overwrite_output_dir: cannot be combined with resume_from 'latest'; choose one")
        if errs:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(errs))
        return self

    def layer_list(self, n_layers: Optional[int]) -> Optional[list]:
        """The chosen layer indices (``n_layers``: the model's, to check them against; None: syntax only)."""
        if self.layers.strip() == "all":
            return None if n_layers is None else list(range(n_layers))
        try:
            layers = [int(x) for x in self.layers.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"layers: {self.layers!r} is not 'all' or comma-separated layer indices") from None
        if not layers:
            raise ConfigError("layers: no layer chosen")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"layers: {self.layers!r} names a layer twice")
        if n_layers is not None:
            bad = [i for i in layers if not 0 <= i < n_layers]
            if bad:
                raise ConfigError(f"layers: no layer {bad[0]}; the model has layers 0..{n_layers - 1}")
        return layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


config_lib.PROGRAMS[TranscoderRunConfig] = "python -m training.transcoders"


def load_config(argv=None) -> TranscoderRunConfig:
    return config_lib.load_config(argv, DEFAULT_CONFIG, schema=TranscoderRunConfig)


# --------------------------------------------------------------------------------------------------
# setup: everything that can fail does so here, before the first step
# --------------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """One run: what ``setup`` builds and the state each step advances (with the optimizer,
    scheduler, buffer and RNG states, what a checkpoint keeps)."""
    cfg: TranscoderRunConfig
    pg: Dist
    model: torch.nn.Module
    layers: list
    buffer: ActivationBuffer
    val_ids: torch.Tensor  # [n, context_length] held-out rows
    transcoders: torch.nn.ModuleList  # one per layer, trained on standardised activations
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    std_in: list = field(default_factory=list)  # per layer: Standardization or None
    std_out: list = field(default_factory=list)
    step: int = 0
    tokens_seen: int = 0
    last_good: Optional[str] = None
    t0: float = 0.0
    reporter: Optional[Reporter] = None


def preflight(cfg: TranscoderRunConfig) -> None:
    _check_model_path("model", cfg.model)
    for name in ("train_data", "val_data"):
        p = getattr(cfg, name)
        if p and not os.path.exists(p) and p.count("/") != 1:
            raise DataError(f"{name} {p!r}: no such file or directory")
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        raise SetupError(f"output_dir {cfg.output_dir!r}: cannot create it ({e})") from None


def load_data(cfg: TranscoderRunConfig, tokenizer):
    """(training rows, validation rows), each [n, context_length]."""
    kw = dict(text_field=cfg.text_field, chat_format=cfg.chat_format)
    train = load_sequences(cfg.train_data, tokenizer, cfg.context_length, cfg.train_split,
                           max_sequences=cfg.max_train_sequences, **kw)
    if cfg.val_data:
        val = load_sequences(cfg.val_data, tokenizer, cfg.context_length, cfg.val_split,
                             max_sequences=cfg.val_sequences, **kw)
    else:  # hold out the last rows
        if cfg.val_sequences >= len(train):
            raise DataError(f"val_sequences={cfg.val_sequences} leaves no training rows ({len(train)} in all)")
        train, val = train[:-cfg.val_sequences], train[-cfg.val_sequences:]
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"no {'training' if len(train) == 0 else 'validation'} rows of {cfg.context_length} tokens")
    return train, val


def make_transcoders(cfg: TranscoderRunConfig, d_in: int, d_out: int, n: int, device) -> torch.nn.ModuleList:
    kw = dict(activation=cfg.activation, l1_coefficient=cfg.l1_coefficient,
              jumprelu_threshold=cfg.jumprelu_threshold, l0_coefficient=cfg.l0_coefficient,
              aux_k_coefficient=cfg.aux_k_coefficient, dead_tokens_threshold=cfg.dead_after_tokens)
    if cfg.activation in ("topk", "batchtopk"):
        kw["k"] = cfg.k
    tcs = torch.nn.ModuleList()
    for i in range(n):
        tc = Transcoder(d_in, cfg.n_features, d_out, device=device, init=False, **kw)
        # each layer its own draw: the encoder from its seeded generator, the decoder from torch's global
        # RNG, seeded here so that two runs with one seed start from the same weights
        torch.manual_seed(cfg.seed * 1000 + i)
        tc.reset_parameters(seed=cfg.seed * 1000 + i)
        tcs.append(tc)
    return tcs


def schedule(cfg: TranscoderRunConfig):
    cosine = lr_lambda(cfg.max_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    if cfg.schedule == "cosine":
        return cosine
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    return lambda step: step / max(1, warmup) if step < warmup else 1.0


def setup(cfg: TranscoderRunConfig, pg: Dist) -> Trainer:
    preflight(cfg)
    resume_path = ckpt.resolve_resume(cfg.resume_from, cfg.output_dir)
    earlier_run = check_output_dir(cfg, resume_path)
    if earlier_run and os.path.lexists(os.path.join(cfg.output_dir, "transcoders")):
        earlier_run.append("transcoders")  # the adapter loop's list does not know this loop's output
    from transformers import AutoConfig

    try:
        n_model_layers = AutoConfig.from_pretrained(cfg.model).num_hidden_layers
    except Exception as e:
        raise SetupError(f"model {cfg.model!r}: cannot read its configuration ({type(e).__name__}: {e})") from None
    layers = cfg.layer_list(n_model_layers)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    train_ids, val_ids = load_data(cfg, tokenizer)
    model = _load_model("model", cfg.model, cfg, pg.device)
    for p in model.parameters():
        p.requires_grad_(False)
    stream = ActivationStream(model, train_ids, layers, forward_batch_size=cfg.forward_batch_size, seed=cfg.seed,
                              cache_dir=cfg.cache_dir, data_path=cfg.train_data)
    buffer = ActivationBuffer(stream, cfg.buffer_tokens, cfg.batch_tokens, seed=cfg.seed)
    transcoders = make_transcoders(cfg, stream.d_in, stream.d_out, len(layers), pg.device)
    opt_kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                  weight_decay=cfg.weight_decay)
    if pg.device.type == "cuda":
        opt_kw["fused"] = True
    optimizer = torch.optim.AdamW(transcoders.parameters(), **opt_kw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg))
    tr = Trainer(cfg=cfg, pg=pg, model=model, layers=layers, buffer=buffer, val_ids=val_ids,
                 transcoders=transcoders, optimizer=optimizer, scheduler=scheduler)
    if resume_path is not None:
        resume(tr, resume_path)
    else:
        estimate_standardization(tr)
    clear_earlier_run(cfg, earlier_run)
    tr.reporter = Reporter(cfg, True, tr.step if resume_path is not None else None)
    print(f"transcoders: layers {layers} x {cfg.n_features} features ({cfg.activation}"
          + (f", k={cfg.k}" if cfg.activation in ('topk', 'batchtopk') else "") + f"), {len(train_ids)} training / "
          f"{len(val_ids)} validation rows of {cfg.context_length} tokens, {cfg.max_steps} steps of "
          f"{cfg.batch_tokens} tokens, device {pg.device}"
          + (f", resumed from {resume_path} at step {tr.step}" if resume_path else ""), flush=True)
    return tr


def estimate_standardization(tr: Trainer) -> None:
    """Each layer's input and output mean/std from the first ``standardize_batches`` batches (read for
    that only, so every training step sees standardised data from the start)."""
    cfg = tr.cfg
    n = len(tr.layers)
    if cfg.standardize == "none":
        tr.std_in, tr.std_out = [None] * n, [None] * n
        return
    est_in = [Standardizer(tr.transcoders[0].d_in, scale=cfg.standardize) for _ in range(n)]
    est_out = [Standardizer(tr.transcoders[0].d_out, scale=cfg.standardize) for _ in range(n)]
    for _ in range(cfg.standardize_batches):
        b = tr.buffer.next_batch()
        for j in range(n):
            est_in[j].update(b.inputs[:, j])
            est_out[j].update(b.outputs[:, j])
    tr.std_in = [e.compute() for e in est_in]
    tr.std_out = [e.compute() for e in est_out]


def _std(s: Optional[Standardization], x: torch.Tensor) -> torch.Tensor:
    return x if s is None else s.transform(x)


def _unstd(s: Optional[Standardization], y: torch.Tensor) -> torch.Tensor:
    return y if s is None else s.inverse(y)


# --------------------------------------------------------------------------------------------------
# checkpoints: what is saved and restored, side by side
# --------------------------------------------------------------------------------------------------
def _stats(stds: list):
    return [None if s is None else {"mean": s.mean, "std": s.std} for s in stds]


def _unstats(stats: list):
    return [None if s is None else Standardization(s["mean"], s["std"]) for s in stats]


def write_checkpoint(tr: Trainer) -> None:
    weights = {f"layer_{i}.{k}": v for i, tc in zip(tr.layers, tr.transcoders) for k, v in tc.state_dict().items()}
    state = {"optimizer": tr.optimizer.state_dict(), "scheduler": tr.scheduler.state_dict(), "step": tr.step,
             "tokens": tr.tokens_seen, "buffer": tr.buffer.state_dict(), "rng": [ckpt.rng_state()],
             "std_in": _stats(tr.std_in), "std_out": _stats(tr.std_out)}
    tr.last_good = ckpt.save_checkpoint(tr.cfg.output_dir, tr.step, weights, state, tr.cfg.to_dict(),
                                        tr.cfg.keep_checkpoints)


def resume(tr: Trainer, path: str) -> None:
    def load_weights(weights: dict):
        for i, tc in zip(tr.layers, tr.transcoders):
            own = {k[len(f"layer_{i}."):]: v for k, v in weights.items() if k.startswith(f"layer_{i}.")}
            try:
                tc.load_state_dict(own)
            except RuntimeError as e:
                raise ckpt.CheckpointError(f"layer {i}: the checkpoint's transcoder does not fit this "
                                           f"configuration (different layers or n_features?): {e}") from None

    state = ckpt.load_checkpoint(path, load_weights)
    try:
        tr.optimizer.load_state_dict(state["optimizer"])
        tr.scheduler.load_state_dict(state["scheduler"])
        tr.buffer.load_state_dict(state["buffer"])
        tr.step, tr.tokens_seen = state["step"], state["tokens"]
        tr.std_in, tr.std_out = _unstats(state["std_in"]), _unstats(state["std_out"])
        ckpt.set_rng_state(state["rng"][0])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ckpt.CheckpointError(f"{os.path.join(path, ckpt.TRAINER)}: not a transcoder training state "
                                   f"this run can continue ({type(e).__name__}: {e})") from None
    tr.last_good = path


# --------------------------------------------------------------------------------------------------
# one optimizer step
# --------------------------------------------------------------------------------------------------
def train_step(tr: Trainer) -> dict:
    """One batch through every layer's transcoder, the summed objective, clipping, AdamW, schedule."""
    cfg = tr.cfg
    tr.transcoders.train()
    b = tr.buffer.next_batch()
    dev = tr.pg.device
    total = 0.0
    per_layer = []
    for j, tc in enumerate(tr.transcoders):
        x = _std(tr.std_in[j], b.inputs[:, j].to(dev))
        y = _std(tr.std_out[j], b.outputs[:, j].to(dev))
        out = tc.forward_with_aux(x, y)  # also counts each feature's tokens since it fired
        total = total + out.losses["loss"]
        rec = {"fvu": float(out.metrics["fvu"]), "l0": float(out.metrics["l0"]),
               "dead": int(out.metrics["dead_features"])}
        rec.update({k: float(out.losses[k].detach()) for k in ("auxk", "sparsity") if k in out.losses})
        per_layer.append(rec)
    total.backward()
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(tr.transcoders.parameters(), max_norm))
    loss = float(total.detach())
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        where = f"the last good checkpoint is {tr.last_good}" if tr.last_good else "no checkpoint was written yet"
        raise TrainingDiverged(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step "
                               f"{tr.step + 1} (loss {loss}, grad norm {grad_norm}); stopping without an optimizer "
                               f"step. {where}")
    lr = tr.scheduler.get_last_lr()[0]
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    tr.tokens_seen += b.n
    return {"step": tr.step, "split": "train", "lr": lr, "loss": loss, "grad_norm": grad_norm,
            "fvu": sum(r["fvu"] for r in per_layer) / len(per_layer), "layers": per_layer,
            "tokens": tr.tokens_seen, "elapsed_s": round(time.time() - tr.t0, 3)}


def log_step(tr: Trainer, rec: dict, bar) -> None:
    cfg = tr.cfg
    if rec["step"] % cfg.log_every == 0 or rec["step"] == cfg.max_steps:
        tr.reporter.log(rec)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", fvu=f"{rec['fvu']:.3f}", refresh=False)
    elif cfg.progress_bar and (rec["step"] % max(1, cfg.max_steps // 20) == 0 or rec["step"] == cfg.max_steps):
        print(f"step {rec['step']}/{cfg.max_steps}  loss {rec['loss']:.4f}  fvu {rec['fvu']:.4f}  "
              f"lr {rec['lr']:.2e}  {time.time() - tr.t0:.0f}s", flush=True)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _decoder_layers(model):
    from tckernels.models import find_decoder_layers

    return find_decoder_layers(model)


@torch.no_grad()
def replacement_outputs(tr: Trainer, j: int, x: torch.Tensor) -> torch.Tensor:
    """Layer j's transcoder on raw MLP inputs ``x`` -> its raw MLP-output estimate."""
    tc = tr.transcoders[j]
    y = tc(_std(tr.std_in[j], x).to(tc.W_enc.dtype))
    return _unstd(tr.std_out[j], y).to(x.dtype)


@torch.no_grad()
def replaced_logits(tr: Trainer, ids: torch.Tensor, replace: list) -> torch.Tensor:
    """The model's logits with the MLPs of layer positions ``replace`` (indices into tr.layers) replaced
    by their transcoders: a forward hook on each MLP returns the transcoder's output on the MLP's input."""
    decoder = _decoder_layers(tr.model)
    handles = []
    for j in replace:
        def hook(module, args, output, j=j):
            return replacement_outputs(tr, j, args[0])
        handles.append(decoder[tr.layers[j]].mlp.register_forward_hook(hook))
    try:
        return tr.model(input_ids=ids).logits.float()
    finally:
        for h in handles:
            h.remove()


def _kl_top1(orig: torch.Tensor, new: torch.Tensor) -> tuple:
    """(summed KL(orig || new) over positions, number of positions where the argmax agrees)."""
    lp, lq = F.log_softmax(orig, -1), F.log_softmax(new, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float(kl.sum()), int((orig.argmax(-1) == new.argmax(-1)).sum())


@torch.no_grad()
def validate(tr: Trainer) -> dict:
    """Per layer FVU, L0 (on the raw held-out activations) and dead fraction (training tokens), and the
    replacement model's KL and top-1 agreement: all layers replaced, and each alone."""
    tr.transcoders.eval()
    n = len(tr.layers)
    dev = tr.pg.device
    sq_err, sq_var, l0_sum, n_tok = [0.0] * n, [0.0] * n, [0.0] * n, 0
    kl_all, top1_all = 0.0, 0
    kl_one, top1_one = [0.0] * n, [0] * n
    # FVU needs the held-out outputs' variance about their own mean: gather them first (small)
    ins, outs = capture_activations(tr.model, tr.val_ids.to(dev), tr.layers, stop_early=True)
    for j in range(n):
        x, y = ins[:, j], outs[:, j].double()
        y_hat = replacement_outputs(tr, j, x).double()
        sq_err[j] = float((y_hat - y).pow(2).sum())
        sq_var[j] = float((y - y.mean(0)).pow(2).sum())
        acts = tr.transcoders[j].encode(_std(tr.std_in[j], x))
        l0_sum[j] = float(M.l0(acts.values)) * x.shape[0]
    n_tok = ins.shape[0]
    for s in range(0, len(tr.val_ids), tr.cfg.val_batch_size):
        ids = tr.val_ids[s:s + tr.cfg.val_batch_size].to(dev)
        orig = tr.model(input_ids=ids).logits.float()
        kl, agree = _kl_top1(orig, replaced_logits(tr, ids, list(range(n))))
        kl_all, top1_all = kl_all + kl, top1_all + agree
        for j in range(n):
            kl, agree = _kl_top1(orig, replaced_logits(tr, ids, [j]))
            kl_one[j] += kl
            top1_one[j] += agree
    positions = tr.val_ids.numel()
    dead = [float(tc.dead_mask().float().mean()) for tc in tr.transcoders]
    return {"layers": tr.layers, "n_tokens": n_tok,
            "fvu": [e / max(v, 1e-30) for e, v in zip(sq_err, sq_var)],
            "l0": [x / n_tok for x in l0_sum], "dead_fraction": dead,
            "kl_all": kl_all / positions, "top1_all": top1_all / positions,
            "kl_each": [x / positions for x in kl_one], "top1_each": [x / positions for x in top1_one]}


def validate_and_log(tr: Trainer, when: str) -> dict:
    v = validate(tr)
    tr.reporter.log({"step": tr.step, "split": "val", "when": when, **v})
    return v


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def run(cfg: TranscoderRunConfig) -> dict:
    t_start = time.time()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    pg = Dist(cfg)
    if pg.world > 1:
        raise SetupError("training.transcoders runs on one process for now (no torchrun)")
    return _run(cfg, pg, t_start)


def _run(cfg: TranscoderRunConfig, pg: Dist, t_start: float) -> dict:
    tr = setup(cfg, pg)
    bar = progress_bar(cfg.max_steps, tr.step, cfg.progress_bar)
    tr.t0 = time.time()
    halted = False
    try:
        while tr.step < cfg.max_steps:
            rec = train_step(tr)
            log_step(tr, rec, bar)
            if cfg.eval_every and tr.step % cfg.eval_every == 0 and tr.step < cfg.max_steps:
                v = validate_and_log(tr, "periodic")
                say(bar, f"step {tr.step}: FVU " + ", ".join(f"{x:.3f}" for x in v["fvu"])
                    + f"; KL (all replaced) {v['kl_all']:.4f}")
            halted = cfg.halt_at_step is not None and cfg.halt_at_step <= tr.step < cfg.max_steps
            if (cfg.save_every and tr.step % cfg.save_every == 0) or tr.step == cfg.max_steps or halted:
                write_checkpoint(tr)
            if halted:
                break
    finally:
        if bar is not None:
            bar.close()
    return finish(tr, halted, t_start)


def save_transcoders(tr: Trainer) -> dict:
    """Each layer's transcoder with its standardisation folded into the weights (a copy; the trained
    module is left as it is), saved to output_dir/transcoders/layer_<i>."""
    import copy

    paths = {}
    for j, (i, tc) in enumerate(zip(tr.layers, tr.transcoders)):
        folded = fold_standardization_(copy.deepcopy(tc).cpu(), tr.std_in[j], tr.std_out[j])
        path = os.path.join(tr.cfg.output_dir, "transcoders", f"layer_{i}")
        save_transcoder(folded, path)
        paths[i] = path
    return paths


def report(v: dict) -> str:
    lines = ["", "== transcoders: result =="]
    for j, i in enumerate(v["layers"]):
        lines.append(f"layer {i}: FVU {v['fvu'][j]:.4f}, L0 {v['l0'][j]:.1f}, dead {100 * v['dead_fraction'][j]:.1f}%, "
                     f"replaced alone: KL {v['kl_each'][j]:.4f}, top-1 {100 * v['top1_each'][j]:.1f}%")
    lines.append(f"replacement model (every layer's MLP replaced), {v['n_tokens']} held-out tokens: "
                 f"KL(original || replaced) {v['kl_all']:.4f}, top-1 agreement {100 * v['top1_all']:.1f}%")
    return "\n".join(lines)


def finish(tr: Trainer, halted: bool, t_start: float) -> dict:
    cfg = tr.cfg
    summary = {"steps": tr.step, "total_steps": cfg.max_steps, "train_seconds": round(time.time() - tr.t0, 1),
               "tokens": tr.tokens_seen, "dead_after_tokens": cfg.dead_after_tokens, "checkpoint": tr.last_good}
    if halted:
        print(f"halted after step {tr.step} of {cfg.max_steps} (halt_at_step); checkpoint {tr.last_good}", flush=True)
        summary["halted"] = True
        tr.reporter.close()
        return summary
    summary["final"] = validate_and_log(tr, "end")
    summary["transcoders"] = save_transcoders(tr)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(report(summary["final"]), flush=True)
    print(f"(transcoders: {os.path.join(cfg.output_dir, 'transcoders')}; metrics: {tr.reporter.path}; "
          f"{summary['total_seconds']:.0f} s in all)", flush=True)
    tr.reporter.close()
    return summary


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if "-h" in argv or "--help" in argv:
            print(config_lib.help_text(config_path_of(argv), TranscoderRunConfig, DEFAULT_CONFIG))
            return 0
        run(load_config(argv))
    # ValueError: the activation stream or cache refusing the data, model or layers (before training)
    except (ConfigError, DataError, SetupError, ckpt.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
