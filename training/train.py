"""Train transcoder adapters so a base model behaves like a reference model (bridging distillation).

    python -m training.train                                   # the embedded tiny default, minutes on a CPU
    python -m training.train --config training/configs/r1_distil_7b.yaml [--field value ...]
    torchrun --nproc_per_node 8 -m training.train --config ...  # data parallel (nccl on GPUs, gloo on CPU)
    torchrun --nproc_per_node 8 -m training.train --config ... --fsdp  # fully sharded (training/sharding.py)
    python -m training.train --help                            # every field

The loop, in order: check the configuration, files and model pair (every problem is reported before
any training); build the adapted model (the reference with the base model's MLPs, plus adapters, for
``backbone: target``); validate the hybrid start; then per optimizer step ``grad_accum_steps``
micro-batches of ``BridgingObjective`` (see ``training/losses.py`` for the objective), gradient
clipping, AdamW on the adapter parameters only (float32), a cosine schedule with warmup; metrics to
``<output_dir>/metrics.jsonl`` and the progress bar; checkpoints every ``save_every`` steps; a
non-finite loss or gradient stops the run and leaves the last good checkpoint in place. At the end:
validation, sample generations, ``summary.json`` and the adapted model (``final_model/``, HF format).
An output_dir that holds an earlier run is refused unless ``resume_from`` continues that run or
``overwrite_output_dir`` replaces it.

``_run`` is that loop: ``setup`` (a ``Trainer``), ``validate_at_start``, then per step ``train_step``,
``log_step``, ``validate_periodically`` and ``write_checkpoint`` when due, and ``finish``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from tckernels.nn.metrics import advance_tokens_since_fired_
from training import checkpoint as ckpt
from training import loop
from training import sharding
from training.config import DEFAULT_CONFIG, Config, ConfigError
from training.data import DataError, ResumableBatches, load_records, load_tokenizer, prepare_examples
from training.evaluate import sample_generations, validate
from training.losses import BridgingObjective, sample_cutoffs
from training.loop import (DTYPES, Dist, SetupError, TrainingDiverged, check_model_path, check_output_dir,  # noqa: F401
                           clear_earlier_run, load_model, lr_lambda)
from training.reporting import Reporter, progress_bar, report, say, show_step


# --------------------------------------------------------------------------------------------------
# setup: everything that can fail does so here, before the first step
# --------------------------------------------------------------------------------------------------
def _load_config_of(name: str, path: str):
    from transformers import AutoConfig

    import tckernels.models  # noqa: F401  (registers the adapter model type)

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise SetupError(f"{name} {path!r}: cannot read its configuration ({type(e).__name__}: {e})") from None


def check_pair_configs(cb, cr) -> None:
    problems = []
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads"):
        if getattr(cb, f, None) != getattr(cr, f, None):
            problems.append(f"{f}: base {getattr(cb, f, None)} vs reference {getattr(cr, f, None)}")
    if problems:
        raise SetupError("the base and reference models are not a pair (their vocabularies or shapes differ):\n  "
                         + "\n  ".join(problems))





def build_models(cfg: Config, device):
    """(adapted model, reference model) on ``device``. For ``backbone: target`` the adapted model is
    the reference with every MLP replaced by the base model's (the hybrid) plus adapters; for
    ``base`` it is the base model plus adapters. Adapters start at the original's initialisation
    (decoder 0), so the adapted model starts exactly at its backbone."""
    from tckernels.models import adapt_model, build_hybrid

    from training.forward_utils import check_compatible

    adapter_kw = dict(activation=cfg.activation, dec_bias=cfg.dec_bias, dtype=DTYPES[cfg.adapter_dtype],
                      seed=cfg.seed)
    if cfg.activation == "topk":
        adapter_kw["k"] = cfg.topk
    base = load_model("base_model", cfg.base_model, cfg, device)
    try:
        if cfg.backbone == "target":
            target = load_model("reference_model", cfg.reference_model, cfg, device)
            check_compatible(base, target)
            adapted = build_hybrid(target, base, cfg.n_features, **adapter_kw)
            del base
        else:
            adapted = adapt_model(base, cfg.n_features, **adapter_kw)
        reference = load_model("reference_model", cfg.reference_model, cfg, device)
        check_compatible(adapted, reference)
    except (ValueError, TypeError) as e:
        raise SetupError(str(e)) from None
    for p in reference.parameters():
        p.requires_grad_(False)
    adapted.to(device)
    return adapted, reference


def load_data(cfg: Config, tokenizer, vocab_size: int):
    train_records = load_records(cfg.train_data, cfg.train_split)
    if cfg.val_data:
        val_records = load_records(cfg.val_data, cfg.val_split)
    elif cfg.val_size:
        if cfg.val_size >= len(train_records):
            raise DataError(f"val_size={cfg.val_size} leaves no training data ({len(train_records)} records)")
        val_records, train_records = train_records[-cfg.val_size:], train_records[:-cfg.val_size]
    else:
        val_records = []
    if cfg.max_train_examples:
        train_records = train_records[:cfg.max_train_examples]
    if cfg.max_val_examples:
        val_records = val_records[:cfg.max_val_examples]
    common = dict(tokenizer=tokenizer, fmt=cfg.chat_format, loss_on_prompt=cfg.loss_on_prompt,
                  max_seq_len=cfg.max_seq_len, truncation=cfg.truncation, vocab_size=vocab_size,
                  append_eos=cfg.append_eos)
    train = prepare_examples(train_records, name=f"train_data {cfg.train_data!r}", **common)
    val = prepare_examples(val_records, name="validation data", **common) if val_records else []
    return train, val, val_records


def preflight(cfg: Config) -> None:
    """Cheap checks of everything named in the configuration."""
    check_model_path("base_model", cfg.base_model)
    check_model_path("reference_model", cfg.reference_model)
    if cfg.tokenizer:
        if not os.path.exists(cfg.tokenizer) and cfg.tokenizer.count("/") != 1:
            raise SetupError(f"tokenizer {cfg.tokenizer!r}: no such directory")
    if cfg.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SetupError("report_to: wandb is not installed (pip install wandb)") from None
    if cfg.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise SetupError("report_to: tensorboard is not installed (pip install tensorboard)") from None
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        raise SetupError(f"output_dir {cfg.output_dir!r}: cannot create it ({e})") from None
    if not os.access(cfg.output_dir, os.W_OK):
        raise SetupError(f"output_dir {cfg.output_dir!r} is not writable")


# --------------------------------------------------------------------------------------------------
# the run: setup, then train_step after train_step (validating and checkpointing at their times),
# then finish
# --------------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """One training run: what ``setup`` builds, and the state that each step advances (``step``,
    ``tokens_seen``, ``silent_for``; with the optimizer, scheduler, data position and RNG states,
    that is what a checkpoint keeps)."""
    cfg: Config
    pg: Dist
    tokenizer: object
    train_ex: list
    val_ex: list
    val_records: list  # the validation records as read (the sample generations prompt with them)
    batches: ResumableBatches
    adapted: torch.nn.Module
    objective: BridgingObjective
    model_for_step: torch.nn.Module  # the objective, or its DDP wrapper when there are several processes
    params: list  # the adapter parameters: the only ones trained
    sharded_layers: list  # under FSDP, every decoder layer of both models (empty otherwise)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    # per layer and feature: training tokens (all processes) since it last fired (dead features)
    silent_for: torch.Tensor
    reporter: Optional[Reporter] = None  # made once the resumed step is known (it trims metrics.jsonl)
    step: int = 0
    tokens_seen: int = 0
    start_eval: Optional[dict] = None  # the validation of the hybrid start; None until it has run
    last_good: Optional[str] = None  # the newest checkpoint written (or resumed from): named if training diverges
    t0: float = 0.0  # time.time() when this process began its training steps


def setup(cfg: Config, pg: Dist) -> Trainer:
    """Check the configuration, files, output_dir and model pair, load the data and models, and build
    the objective, optimizer and schedule; then resume from a checkpoint when asked. Every problem is
    raised here, before any training (and before overwrite_output_dir deletes anything)."""
    device = pg.device
    preflight(cfg)
    resume_path = ckpt.resolve_resume(cfg.resume_from, cfg.output_dir)
    earlier_run = check_output_dir(cfg, resume_path)  # deleted (when overwriting) once every check passed
    cb = _load_config_of("base_model", cfg.base_model)
    cr = _load_config_of("reference_model", cfg.reference_model)
    check_pair_configs(cb, cr)
    if cfg.n_cutoffs > cr.num_hidden_layers + 1:
        raise ConfigError(f"n_cutoffs: {cfg.n_cutoffs} > the {cr.num_hidden_layers + 1} possible cut-offs")
    try:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.reference_model)
    except Exception as e:
        raise SetupError(f"tokenizer {cfg.tokenizer or cfg.reference_model!r}: cannot load it ({e})") from None
    train_ex, val_ex, val_records = load_data(cfg, tokenizer, cr.vocab_size)
    batches = ResumableBatches(train_ex, cfg.micro_batch_size, tokenizer.pad_token_id, seed=cfg.seed,
                               rank=pg.rank, world_size=pg.world)

    sharded_layers = []
    if cfg.fsdp and pg.enabled:
        # the layers are sharded from the CPU so no process ever holds a whole model on its device
        adapted, reference = build_models(cfg, torch.device("cpu"))
        mesh = sharding.device_mesh(device, pg.world)
        for model in (adapted, reference):
            sharded_layers += sharding.shard_layers_(model, mesh, DTYPES[cfg.dtype])
            sharding.move_unsharded_(model, device)
    else:
        adapted, reference = build_models(cfg, device)
    objective = BridgingObjective(adapted, reference, cfg.lambda_adapt, cfg.l1_weight, cfg.lambda_nmse,
                                  cfg.lambda_bridge, cfg.kl_chunk_tokens, cfg.gradient_checkpointing,
                                  cfg.batch_reduction)
    from tckernels.models import adapter_parameters

    params = adapter_parameters(adapted)  # in adapter_dtype (float32 by default) whatever the model's dtype
    data_parallel = pg.enabled and not sharded_layers
    model_for_step = _data_parallel(objective, adapted, params, device) if data_parallel else objective

    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, batches.micro_batches_per_epoch // cfg.grad_accum_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.warmup_ratio,
                                                                       cfg.min_lr_ratio))
    silent_for = torch.zeros(objective.n_layers, cfg.n_features, dtype=torch.int64, device=device)
    tr = Trainer(cfg=cfg, pg=pg, tokenizer=tokenizer, train_ex=train_ex, val_ex=val_ex, val_records=val_records,
                 batches=batches, adapted=adapted, objective=objective, model_for_step=model_for_step,
                 params=params, sharded_layers=sharded_layers, optimizer=optimizer, scheduler=scheduler,
                 total_steps=total_steps, silent_for=silent_for)
    if resume_path is not None:
        resume(tr, resume_path)
    if pg.main:
        clear_earlier_run(cfg, earlier_run)
    tr.reporter = Reporter(cfg, pg.main, tr.step if resume_path is not None else None)
    if pg.main:
        n_params = sum(p.numel() for p in params)
        print(f"transcoder adapters: {objective.n_layers} layers x {cfg.n_features} features "
              f"({n_params / 1e6:.2f}M trainable), backbone {cfg.backbone}, {len(train_ex)} training / "
              f"{len(val_ex)} validation sequences, {total_steps} steps of {cfg.grad_accum_steps} x "
              f"{cfg.micro_batch_size} x {pg.world} sequences, device {device}"
              + (f", fully sharded over {pg.world} processes" if sharded_layers else "")
              + (f", resumed from {resume_path} at step {tr.step}" if resume_path else ""), flush=True)
    return tr


def _data_parallel(objective, adapted, params, device):
    """The objective wrapped in DDP, which syncs the adapter parameters' gradients only: the frozen
    model weights and the buffers are the same on every process and never change."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    trainable = {id(p) for p in params}
    ignore = [f"adapted.{n}" for n, p in adapted.named_parameters() if id(p) not in trainable]
    ignore += [f"adapted.{n}" for n, _ in adapted.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(objective, ignore)
    return DDP(objective, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


# --------------------------------------------------------------------------------------------------
# checkpoints: what is saved (trainer_state) and restored (resume) side by side
# --------------------------------------------------------------------------------------------------
def global_batch(cfg: Config, world: int) -> int:
    """Sequences per optimizer step, over every process."""
    return cfg.micro_batch_size * cfg.grad_accum_steps * world


def trainer_state(tr: Trainer, rngs: list) -> dict:
    """The checkpoint's ``trainer.pt`` (the adapters are saved on their own, and so is the optimizer
    state of a sharded run); ``rngs``: every process's RNG states, by rank."""
    state = {"scheduler": tr.scheduler.state_dict(), "step": tr.step, "tokens": tr.tokens_seen,
             "data": tr.batches.state_dict(), "rng": rngs, "start_eval": tr.start_eval,
             "silent_for": tr.silent_for.cpu(), "global_batch": global_batch(tr.cfg, tr.pg.world)}
    if not tr.sharded_layers:
        state["optimizer"] = tr.optimizer.state_dict()
    return state


def _check_global_batch(tr: Trainer, state: dict, path: str) -> None:
    """A run continues exactly only with the batches of the run it resumes: the same sequences per
    optimizer step, however many processes share them."""
    saved, now = state.get("global_batch"), global_batch(tr.cfg, tr.pg.world)
    if saved is None or saved == now:
        return
    cfg = tr.cfg
    per_step = cfg.micro_batch_size * tr.pg.world
    hint = (f"; with {tr.pg.world} processes of micro_batch_size {cfg.micro_batch_size}, set "
            f"--grad_accum_steps {saved // per_step}" if saved % per_step == 0 else "")
    raise ckpt.CheckpointError(
        f"{path}: written by a run of {saved} sequences per optimizer step; this run has {now} "
        f"(micro_batch_size {cfg.micro_batch_size} x grad_accum_steps {cfg.grad_accum_steps} x "
        f"{tr.pg.world} processes){hint}")


def resume(tr: Trainer, path: str) -> None:
    """Load checkpoint ``path`` into the adapters and ``tr``, so that training continues exactly
    where it stopped (on any number of processes, for a checkpoint of a sharded run)."""
    if ckpt.is_sharded(path):
        state = ckpt.load_sharded_checkpoint(path, tr.adapted, tr.optimizer)
    elif tr.sharded_layers:
        raise ckpt.CheckpointError(f"{path}: written by a run without fsdp; resume it without --fsdp")
    else:
        state = ckpt.load_checkpoint(path, tr.adapted)
    _check_global_batch(tr, state, path)
    try:
        if not ckpt.is_sharded(path):  # a sharded checkpoint's optimizer state was loaded with its shards
            tr.optimizer.load_state_dict(state["optimizer"])
        tr.scheduler.load_state_dict(state["scheduler"])
        tr.batches.load_state_dict(state["data"])
        tr.step, tr.tokens_seen, tr.start_eval = state["step"], state["tokens"], state.get("start_eval")
        rngs = state["rng"]
        # each process continues its own RNG streams; one the checkpoint has none for takes the first's
        ckpt.set_rng_state(rngs[tr.pg.rank] if tr.pg.rank < len(rngs) else rngs[0])
        tr.silent_for.copy_(state["silent_for"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        # a trainer.pt that unpickles but is not (or no longer matches) what trainer_state writes
        what = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ckpt.CheckpointError(f"{os.path.join(path, ckpt.TRAINER)}: not a training state this run can "
                                   f"continue ({what})") from None
    tr.last_good = path


def write_checkpoint(tr: Trainer) -> None:
    """Checkpoint step ``tr.step``: every process's RNG states are gathered; the main process writes,
    or, for a sharded run, every process writes its shards and the main process the rest."""
    rngs = tr.pg.gather_objects(ckpt.rng_state())
    cfg = tr.cfg
    if tr.sharded_layers:
        tr.last_good = ckpt.save_sharded_checkpoint(
            cfg.output_dir, tr.step, tr.adapted, tr.optimizer, trainer_state(tr, rngs) if tr.pg.main else None,
            cfg.to_dict(), cfg.keep_checkpoints, main=tr.pg.main, barrier=tr.pg.barrier)
        return
    if tr.pg.main:
        tr.last_good = ckpt.save_checkpoint(cfg.output_dir, tr.step, tr.adapted, trainer_state(tr, rngs),
                                            cfg.to_dict(), cfg.keep_checkpoints)
    tr.pg.barrier()


# --------------------------------------------------------------------------------------------------
# validation: on the main process, or under FSDP on every process (each layer's forward gathers its
# weights from all of them); the main process logs
# --------------------------------------------------------------------------------------------------
def validates(tr: Trainer) -> bool:
    """Whether this process runs the validations and sample generations."""
    return tr.pg.main or bool(tr.sharded_layers)


def validate_and_log(tr: Trainer, when: str) -> Optional[dict]:
    """Validation metrics (``training/evaluate.py``), logged with ``when``; None without validation data."""
    if not tr.val_ex:
        return None
    v = validate(tr.objective, tr.val_ex, tr.tokenizer.pad_token_id, tr.cfg.val_batch_size, tr.pg.device,
                 with_hybrid=True, dead_counters=tr.silent_for, dead_after_tokens=tr.cfg.dead_after_tokens)
    tr.reporter.log({"step": tr.step, "split": "val", "when": when, **v})
    return v


def validate_at_start(tr: Trainer) -> None:
    """Validate the hybrid start, unless a resumed run already did."""
    if tr.start_eval is None and validates(tr):
        tr.start_eval = validate_and_log(tr, "start")
        if tr.start_eval and tr.pg.main:
            print(f"validation at the start: KL(reference || hybrid) {tr.start_eval['kl_hybrid']:.4f}, "
                  f"top-1 agreement {100 * tr.start_eval['top1_hybrid']:.1f}%", flush=True)
    tr.pg.barrier()


def validate_periodically(tr: Trainer, bar) -> None:
    """Every ``eval_every`` steps, except the last one (``finish`` validates after it)."""
    cfg = tr.cfg
    if cfg.eval_every and tr.step % cfg.eval_every == 0 and tr.step < tr.total_steps and validates(tr):
        v = validate_and_log(tr, "periodic")
        if v and tr.pg.main:
            say(bar, f"step {tr.step}: validation KL {v['kl']:.4f} (hybrid {v['kl_hybrid']:.4f}), "
                     f"top-1 {100 * v['top1']:.1f}%, L0 {v['l0']:.2f}")


# --------------------------------------------------------------------------------------------------
# one optimizer step
# --------------------------------------------------------------------------------------------------
def micro_batch_generator(cfg: Config, step: int, micro: int, rank: int, world: int) -> torch.Generator:
    """The generator of micro-batch ``micro`` of optimizer step ``step`` (from 0) on process ``rank``
    of ``world``: seeded by the micro-batch's place in the global order of micro-batches alone (the
    order in which ``ResumableBatches`` deals out the data), so a resumed run draws the same cut-offs
    as an uninterrupted one, also on another number of processes that deal out the same micro-batches."""
    place = (step * cfg.grad_accum_steps + micro) * world + rank
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + place * 7_919) % (2**63))


def train_step(tr: Trainer) -> dict:
    """One optimizer step: ``grad_accum_steps`` micro-batches (forward and backward), gradient
    clipping, the step's numbers averaged over processes, the dead-feature counters, then (when
    every number is finite; else TrainingDiverged) AdamW and the schedule. Returns the step's record."""
    cfg, pg, device = tr.cfg, tr.pg, tr.pg.device
    L = tr.objective.n_layers
    tr.adapted.train()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss kl sparsity nmse bridge
    l0_layers = torch.zeros(L, dtype=torch.float64, device=device)
    step_tokens = torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(L, cfg.n_features, dtype=torch.bool, device=device)
    for micro in range(cfg.grad_accum_steps):
        batch = {k: v.to(device) for k, v in tr.batches.next().items()}
        # under FSDP every process must run the same layers (each forward gathers the layer's weights
        # from all of them): one draw per global micro-batch, as one process would draw for all of it
        rank, world = (0, 1) if tr.sharded_layers else (pg.rank, pg.world)
        cutoffs = sample_cutoffs(L, cfg.n_cutoffs, micro_batch_generator(cfg, tr.step, micro, rank, world))
        last = micro == cfg.grad_accum_steps - 1
        sync = contextlib.nullcontext()
        if tr.sharded_layers:  # gradients are reduced once, after the last micro-batch
            sharding.set_gradient_sync(tr.sharded_layers, last)
        elif pg.enabled and not last:
            sync = tr.model_for_step.no_sync()
        with sync:
            out = tr.model_for_step(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], cutoffs)
            (out["loss"] / cfg.grad_accum_steps).backward()
        n_tok = out["n_tokens"].double()
        sums += torch.stack([out["loss"].detach().double(), out["kl"].double(), out["sparsity"].double(),
                             out["nmse"].double(), out["bridge"].double()]) / cfg.grad_accum_steps
        l0_layers += out["l0_layers"].double() * n_tok  # L0 is a mean over all real tokens
        step_tokens += n_tok
        fired |= out["fired"]
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    grad_norm = sharding.full_tensor(grad_norm)  # the norm over every shard

    # one all-reduce for every number of the step
    vals = pg.all_mean(torch.cat([sums, l0_layers, step_tokens.reshape(1),
                                  grad_norm.detach().double().reshape(1).to(device)]))
    vals = vals.cpu().tolist()
    loss, kl, s_term, nmse, bridge = vals[:5]
    l0_per_layer = [x / max(vals[-2], 1e-9) for x in vals[5:5 + L]]
    l0 = sum(l0_per_layer) / L
    gn = vals[-1]
    new_tokens = int(round(vals[-2] * pg.world))  # real tokens of every process
    tr.tokens_seen += new_tokens
    advance_tokens_since_fired_(tr.silent_for, pg.all_any(fired), new_tokens)

    if not all(math.isfinite(x) for x in (loss, kl, s_term, nmse, bridge, gn)):
        where = f"the last good checkpoint is {tr.last_good}" if tr.last_good else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {tr.step + 1} "
            f"(loss {loss}, kl {kl}, sparsity {s_term}, nmse {nmse}, bridge {bridge}, grad norm {gn}); "
            f"stopping without an optimizer step. {where}"
            + (f" (resume with --resume_from {tr.last_good}, e.g. with a lower learning_rate)" if tr.last_good else ""))
    lr = tr.scheduler.get_last_lr()[0]
    tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.step += 1
    return {"step": tr.step, "split": "train",
            "epoch": round(tr.batches.epoch + tr.batches.offset / len(tr.train_ex), 4),
            "lr": lr, "loss": loss, "kl": kl, "sparsity": s_term, "nmse": nmse, "bridge": bridge,
            "grad_norm": gn, "l0": l0, "l0_layers": l0_per_layer, "tokens": tr.tokens_seen,
            "elapsed_s": round(time.time() - tr.t0, 3)}


def log_step(tr: Trainer, rec: dict, bar) -> None:
    """The step's record to metrics.jsonl (every ``log_every`` steps and the last), and to the progress bar."""
    cfg = tr.cfg
    if rec["step"] % cfg.log_every == 0 or rec["step"] == tr.total_steps:
        tr.reporter.log(rec)
    text_every = max(1, tr.total_steps // 20)  # progress lines when there is no bar (not a terminal)
    print_line = tr.pg.main and cfg.progress_bar and (rec["step"] % text_every == 0 or rec["step"] == tr.total_steps)
    show_step(bar, rec, tr.total_steps, print_line, time.time() - tr.t0)


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict:
    t_start = time.time()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the per-model "Loading weights" bars
    except ImportError:  # pragma: no cover
        pass
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    pg = Dist(cfg)
    try:
        return _run(cfg, pg, t_start)
    finally:
        pg.close()


def _run(cfg: Config, pg: Dist, t_start: float) -> dict:
    tr = setup(cfg, pg)
    validate_at_start(tr)
    bar = progress_bar(tr.total_steps, tr.step, pg.main and cfg.progress_bar)
    tr.t0 = time.time()
    halted = False
    try:
        while tr.step < tr.total_steps:
            rec = train_step(tr)
            log_step(tr, rec, bar)
            validate_periodically(tr, bar)
            # halt_at_step stops early as an interruption would, leaving a checkpoint to resume from
            halted = cfg.halt_at_step is not None and tr.step >= cfg.halt_at_step and tr.step < tr.total_steps
            if (cfg.save_every and tr.step % cfg.save_every == 0) or tr.step == tr.total_steps or halted:
                write_checkpoint(tr)
            if halted:
                break
    finally:
        if bar is not None:
            bar.close()
    return finish(tr, halted, t_start)


def finish(tr: Trainer, halted: bool, t_start: float) -> dict:
    """The run's summary. After the last step also (main process): the final validation, the sample
    generations, the adapted model (``final_model/``), ``summary.json`` and the printed report."""
    cfg, pg = tr.cfg, tr.pg
    summary = {"steps": tr.step, "total_steps": tr.total_steps, "train_seconds": round(time.time() - tr.t0, 1),
               "tokens": tr.tokens_seen, "dead_after_tokens": cfg.dead_after_tokens, "start": tr.start_eval,
               "checkpoint": tr.last_good}
    if halted:
        if pg.main:
            print(f"halted after step {tr.step} of {tr.total_steps} (halt_at_step); checkpoint {tr.last_good}",
                  flush=True)
        summary["halted"] = True
        tr.reporter.close()
        return summary
    if validates(tr):
        summary["final"] = validate_and_log(tr, "end")
        if cfg.n_generations and tr.val_records:
            tr.adapted.eval()
            summary["generations"] = sample_generations(tr.objective, tr.tokenizer, tr.val_records, cfg.chat_format,
                                                        cfg.n_generations, cfg.max_new_tokens, cfg.hesitation_word,
                                                        pg.device)
    # a sharded model's whole state is gathered onto the main process's CPU (every process takes part)
    final_state = sharding.full_state_dict(tr.adapted) if tr.sharded_layers and cfg.save_final_model else None
    if pg.main:
        if cfg.save_final_model:
            out_dir = os.path.join(cfg.output_dir, "final_model")
            tr.adapted.save_pretrained(out_dir, state_dict=final_state)
            tr.tokenizer.save_pretrained(out_dir)
            summary["final_model"] = out_dir
        summary["total_seconds"] = round(time.time() - t_start, 1)
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(report(summary, cfg.hesitation_word), flush=True)
        print(f"(metrics: {tr.reporter.path}; summary: {os.path.join(cfg.output_dir, 'summary.json')}; "
              f"{summary['total_seconds']:.0f} s in all)", flush=True)
    pg.barrier()
    tr.reporter.close()
    return summary


def main(argv=None) -> int:
    return loop.main(argv, Config, DEFAULT_CONFIG, lambda cfg: run(cfg))


if __name__ == "__main__":
    sys.exit(main())
