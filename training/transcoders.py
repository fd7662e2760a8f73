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

Processes (torchrun): by default every process is a data-parallel replica (DDP). With
``feature_shards`` F > 1 the WORLD_SIZE processes form a ("dp", "tp") device mesh of WORLD_SIZE / F
replicas by F feature shards: each dictionary (per-layer or cross-layer, not bilinear) is split over
the F processes of a tp group (``tckernels.nn.sharded``), which make the same batches; gradients,
dead-feature counters and BatchTopK thresholds are averaged over dp only, and clipping uses the
whole dictionary's norm. AdamW runs on each process's slices. Checkpoints hold the gathered full
weights and optimizer state, in the format a run without feature sharding writes, so a run resumes
on any feature_shards (with the same number of data-parallel replicas); validation and the saved
transcoders use the gathered full dictionary.

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
import torch.distributed as dist
import torch.nn.functional as F

from tckernels.nn import Standardizer, save_transcoder
from tckernels.nn.standardize import Standardization
from tckernels.nn import metrics as M
from training import checkpoint as ckpt
from training import config as config_lib
from training.activations import (HOOK_POINTS, ActivationBuffer, ActivationStream, first_tensor, load_sequences,
                                  with_first_tensor)
from training.config import ConfigError, _f
from training.data import DataError, load_tokenizer
from training.dictionaries import ARCHITECTURES, BILINEAR_KINDS, CrossLayer, PerLayerTranscoders, build_dictionary
from training.reporting import Reporter, progress_bar, say
from training import loop
from training.loop import (RUN_OUTPUTS, Dist, SetupError, TrainingDiverged, check_model_path, check_output_dir,
                           clear_earlier_run, load_model, lr_lambda)

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
    input_hook: str = _f("mlp_in", "what the dictionary reads at each chosen layer: the MLP's input (mlp_in) "
                         "or output (mlp_out), or the layer's input (resid_pre) or output (resid_post)", HOOK_POINTS)
    output_hook: str = _f("mlp_out", "what it reconstructs (the same point as input_hook: a sparse autoencoder)",
                          HOOK_POINTS)
    train_data: str = _f("", "training text: .jsonl/.json/.parquet, a saved HF dataset, or a hub name")
    train_split: str = _f("train", "split of a saved/hub dataset")
    val_data: Optional[str] = _f(None, "held-out text (default: the last val_sequences rows of train_data)")
    val_split: str = _f("validation", "split of a saved/hub validation dataset")
    text_field: str = _f("text", "field of a record that holds its text (chat records are rendered)")
    chat_format: str = _f("deepseek", "prompt format of chat records", ("deepseek", "chatml"))
    context_length: int = _f(128, "tokens per packed row (documents joined with EOS)")
    max_train_sequences: Optional[int] = _f(None, "use at most this many training rows")
    forward_batch_size: int = _f(8, "rows per model forward")
    buffer_tokens: int = _f(32768, "activations held in the shuffling buffer (per process)")
    batch_tokens: int = _f(1024, "tokens per optimizer step, per process")
    cache_dir: Optional[str] = _f(None, "on-disk activation cache (.npy shards), reused when it matches")
    # ---- the dictionary -----------------------------------------------------------------------
    architecture: str = _f("per_layer", "per_layer: one transcoder per chosen layer; crosslayer: one cross-layer "
                           "transcoder over them (features read at a layer write to it and to every later chosen "
                           "layer); bilinear: one dense bilinear layer per chosen layer", ARCHITECTURES)
    bilinear_kind: str = _f("transcoder", "architecture bilinear: 'transcoder' = BilinearTranscoder (the published "
                            "Pythia bilinear transcoders' class), 'mlp' = BilinearMLP, head(left(x) * right(x))",
                            BILINEAR_KINDS)
    n_features: int = _f(1024, "features per layer (bilinear: the hidden width)")
    activation: str = _f("topk", "feature activation", ("topk", "batchtopk", "relu", "jumprelu"))
    k: Optional[int] = _f(32, "features per token for topk/batchtopk")
    pre_bias: bool = _f(False, "pre-encoder bias: the encoder reads x - b_pre")
    reconstruction_loss: str = _f("mse", "reconstruction term of the objective", ("mse", "fvu"))
    l1_coefficient: float = _f(0.0, "weight of the sparsity term sum_i f_i*|W_dec[i]| (relu, jumprelu; any "
                               "activation when > 0)")
    sparsity_tanh_scale: Optional[float] = _f(None, "sparsity term sum_i tanh(c * f_i*|W_dec[i]|) with this c "
                                              "(null: the plain sum)")
    l1_warmup_ratio: float = _f(0.0, "fraction of the steps over which l1_coefficient ramps up linearly from 0")
    l0_coefficient: float = _f(0.0, "weight of the L0 term (jumprelu)")
    pre_act_coefficient: float = _f(0.0, "weight of the pre-activation loss sum_i relu(theta_i - h_i)*|W_dec[i]| "
                                    "(relu, jumprelu)")
    jumprelu_threshold: float = _f(0.001, "initial JumpReLU threshold")
    jumprelu_bandwidth: float = _f(0.001, "JumpReLU straight-through estimator's bandwidth")
    aux_k: Optional[int] = _f(None, "AuxK: dead features per token that reconstruct the residual (null: d_out/2)")
    aux_k_coefficient: Optional[float] = _f(None, "weight of AuxK (null: 1/32 for topk/batchtopk, else 0)")
    dead_after_tokens: int = _f(1_000_000, "a feature that has not fired for this many training tokens is dead")
    standardize: str = _f("layer", "standardise inputs and outputs: one std per layer, per dimension, or not "
                          "(bilinear transcoder: its input is scaled by one std, not centred; see README)",
                          ("layer", "dim", "none"))
    standardize_batches: int = _f(8, "batches read to estimate the standardisation")
    # ---- optimisation -------------------------------------------------------------------------
    optimizer: str = _f("adamw", "adamw, or muon: torch.optim.Muon on the 2-D weight matrices and AdamW on the "
                        "rest", ("adamw", "muon"))
    learning_rate: float = _f(1e-3, "peak learning rate (optimizer muon: Muon's)")
    adamw_learning_rate: Optional[float] = _f(None, "optimizer muon: AdamW's peak learning rate for the "
                                              "parameters that are not matrices (null: learning_rate)")
    muon_momentum: float = _f(0.95, "optimizer muon: Muon's momentum")
    weight_decay: float = _f(0.0, "weight decay (AdamW and Muon)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    schedule: str = _f("cosine", "after warm-up: cosine decay or constant", ("cosine", "constant"))
    warmup_ratio: float = _f(0.05, "fraction of the steps with linear warm-up")
    min_lr_ratio: float = _f(0.0, "the cosine decays to learning_rate * min_lr_ratio")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    autocast: bool = _f(False, "run the dictionary's forward under torch.autocast in bfloat16 (float32 master "
                        "weights and optimizer state)")
    max_steps: int = _f(1000, "optimizer steps")
    seed: int = _f(0, "seed of the initialisation, data order and buffer shuffles")
    device: str = _f("auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N' (torchrun: one GPU per process)")
    num_threads: Optional[int] = _f(None, "torch CPU threads per process (default: torch's)")
    feature_shards: int = _f(1, "processes that split each dictionary's features; world size = feature_shards x "
                             "data-parallel replicas (torchrun; per_layer and crosslayer)")
    # ---- run, logging, checkpoints ------------------------------------------------------------
    output_dir: str = _f("runs/transcoders", "where metrics, checkpoints and the transcoders go")
    log_every: int = _f(10, "steps between metric lines")
    save_every: int = _f(0, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(2, "most recent checkpoints kept")
    resume_from: Optional[str] = _f(None, "checkpoint directory to resume, or 'latest' (the newest in output_dir)")
    overwrite_output_dir: bool = _f(False, "start afresh in an output_dir that holds an earlier run, deleting it")
    halt_at_step: Optional[int] = _f(None, "stop (with a checkpoint) after this step, as if interrupted")
    progress_bar: bool = _f(True, "show a progress bar (rank 0; progress lines instead when not on a terminal)")
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
                     "val_sequences", "val_batch_size", "feature_shards"):
            if getattr(self, name) < 1:
                errs.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_sequences", "halt_at_step", "num_threads", "k", "aux_k"):
            v = getattr(self, name)
            if v is not None and v < 1:
                errs.append(f"{name}: must be >= 1 or null, got {v}")
        for name in ("save_every", "eval_every", "l1_coefficient", "l0_coefficient", "pre_act_coefficient",
                     "weight_decay", "max_grad_norm", "adam_eps"):
            if getattr(self, name) < 0:
                errs.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "adamw_learning_rate", "jumprelu_threshold", "jumprelu_bandwidth",
                     "sparsity_tanh_scale"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                errs.append(f"{name}: must be > 0, got {v}")
        for name in ("warmup_ratio", "min_lr_ratio", "l1_warmup_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                errs.append(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                errs.append(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.architecture != "bilinear" and self.activation in ("topk", "batchtopk"):
            if self.k is None:
                errs.append(f"k: activation {self.activation!r} needs k (features per token)")
            elif self.k > self.n_features:
                errs.append(f"k: {self.k} > n_features {self.n_features}")
        if self.architecture != "bilinear" and self.pre_act_coefficient > 0 and self.activation in ("topk", "batchtopk"):
            errs.append(f"pre_act_coefficient: applies to activation relu or jumprelu, not {self.activation!r}")
        if self.architecture == "bilinear" and self.bilinear_kind == "transcoder" and self.standardize == "dim":
            errs.append("standardize: 'dim' cannot be folded into a BilinearTranscoder (its hidden layer is "
                        "(sum_i x_i) * W_right x: no shift or per-dimension scale of x fits in it); use 'layer' "
                        "(one std, not centred), 'none', or bilinear_kind 'mlp'")
        if self.input_hook in HOOK_POINTS and self.output_hook in HOOK_POINTS and (
                HOOK_POINTS.index(self.output_hook) < HOOK_POINTS.index(self.input_hook)):
            errs.append(f"output_hook: {self.output_hook!r} comes before input_hook {self.input_hook!r} in a layer's "
                        f"forward ({' -> '.join(HOOK_POINTS)})")
        if self.feature_shards > 1:
            if self.architecture == "bilinear":
                errs.append("feature_shards: architecture 'bilinear' is dense and cannot be feature-sharded; use "
                            "feature_shards 1 (data parallel) or architecture per_layer / crosslayer")
            if self.n_features < self.feature_shards:
                errs.append(f"feature_shards: {self.feature_shards} > n_features {self.n_features}; every shard "
                            f"needs a feature")
            if self.optimizer == "muon":
                errs.append("feature_shards: optimizer 'muon' orthogonalises whole weight matrices, which a "
                            "feature shard does not hold; use optimizer adamw, or feature_shards 1")
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
    """One run: what ``setup`` builds and the state each step advances (with the optimizers,
    schedulers, buffer and RNG states, what a checkpoint keeps)."""
    cfg: TranscoderRunConfig
    pg: Dist
    model: torch.nn.Module
    layers: list
    buffer: ActivationBuffer
    val_ids: torch.Tensor  # [n, context_length] held-out rows
    dictionary: torch.nn.Module  # training/dictionaries.py; trained on standardised activations
    objective: torch.nn.Module  # the dictionary, or its DistributedDataParallel wrapper
    optimizers: list
    schedulers: list
    std_in: list = field(default_factory=list)  # per layer: Standardization or None
    std_out: list = field(default_factory=list)
    step: int = 0
    tokens_seen: int = 0
    last_good: Optional[str] = None
    t0: float = 0.0
    reporter: Optional[Reporter] = None
    par: Optional["Parallel"] = None  # how the processes split the data and the features


def preflight(cfg: TranscoderRunConfig) -> None:
    check_model_path("model", cfg.model)
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


def transcoder_kwargs(cfg: TranscoderRunConfig) -> dict:
    """The ``tckernels.nn.Transcoder`` arguments of the configuration (per layer, or per CLT source)."""
    kw = dict(activation=cfg.activation, pre_bias=cfg.pre_bias, reconstruction_loss=cfg.reconstruction_loss,
              l1_coefficient=l1_at(cfg, 0), sparsity_tanh_scale=cfg.sparsity_tanh_scale,
              jumprelu_threshold=cfg.jumprelu_threshold, jumprelu_bandwidth=cfg.jumprelu_bandwidth,
              l0_coefficient=cfg.l0_coefficient, pre_act_coefficient=cfg.pre_act_coefficient, aux_k=cfg.aux_k,
              aux_k_coefficient=cfg.aux_k_coefficient, dead_tokens_threshold=cfg.dead_after_tokens)
    if cfg.activation in ("topk", "batchtopk"):
        kw["k"] = cfg.k
    return kw


def l1_at(cfg: TranscoderRunConfig, step: int) -> float:
    """The sparsity weight of optimizer step ``step`` (from 0): ramped linearly over ``l1_warmup_ratio``."""
    ramp = cfg.l1_warmup_ratio * cfg.max_steps
    return cfg.l1_coefficient * (min(1.0, step / ramp) if ramp > 0 else 1.0)


def schedule(cfg: TranscoderRunConfig):
    cosine = lr_lambda(cfg.max_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    if cfg.schedule == "cosine":
        return cosine
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    return lambda step: step / max(1, warmup) if step < warmup else 1.0


def is_weight_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight (what Muon orthogonalises), not a stack of biases such as a cross-layer
    transcoder's per-layer output biases ``b_dec [L, d]``."""
    last = name.rsplit(".", 1)[-1]
    return p.dim() == 2 and not (last == "bias" or last.startswith("b_"))


def make_optimizers(cfg: TranscoderRunConfig, dictionary: torch.nn.Module, device) -> list:
    """AdamW over every parameter; or Muon over the 2-D weight matrices and AdamW over the rest."""
    adam_kw = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        adam_kw["fused"] = True
    named = [(n, p) for n, p in dictionary.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return [torch.optim.AdamW([p for _, p in named], lr=cfg.learning_rate, **adam_kw)]
    matrices = [p for n, p in named if is_weight_matrix(n, p)]
    rest = [p for n, p in named if not is_weight_matrix(n, p)]
    opts = [torch.optim.Muon(matrices, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             momentum=cfg.muon_momentum)]
    if rest:
        opts.append(torch.optim.AdamW(rest, lr=cfg.adamw_learning_rate or cfg.learning_rate, **adam_kw))
    return opts


# --------------------------------------------------------------------------------------------------
# feature sharding: the processes of a tensor-parallel group split each dictionary's features
# --------------------------------------------------------------------------------------------------
@dataclass
class Parallel:
    """How the processes split the work: ``shards`` processes (one "tp" group of the mesh) hold one
    slice each of every dictionary's features and see the same batches; ``dp`` such groups read
    different data and average their gradients. Without feature sharding every process is a
    data-parallel replica (DDP) and ``mesh`` is None."""
    shards: int
    dp: int
    dp_rank: int
    tp_rank: int = 0
    mesh: object = None  # DeviceMesh ("dp", "tp") when shards > 1

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    @property
    def dp_group(self):
        """The data-parallel group: the mesh's "dp" dim, or every process (None)."""
        return self.mesh.get_group("dp") if self.mesh is not None else None


def parallel_layout(cfg: TranscoderRunConfig, pg) -> Parallel:
    if pg.world % cfg.feature_shards:
        raise ConfigError(f"feature_shards: {cfg.feature_shards} does not divide the number of processes "
                          f"(WORLD_SIZE {pg.world}); the world is feature_shards x data-parallel replicas")
    if cfg.feature_shards == 1:
        return Parallel(1, pg.world, pg.rank)
    from torch.distributed.device_mesh import init_device_mesh

    # tp is the inner dim: a tensor-parallel group is consecutive ranks, on one node when it fits
    mesh = init_device_mesh(pg.device.type, (pg.world // cfg.feature_shards, cfg.feature_shards),
                            mesh_dim_names=("dp", "tp"))
    return Parallel(cfg.feature_shards, pg.world // cfg.feature_shards, mesh.get_local_rank("dp"),
                    mesh.get_local_rank("tp"), mesh)


class ShardedCrossLayer(CrossLayer):
    """``CrossLayer`` over a ``FeatureShardedCrossLayerTranscoder``: the per-layer dead-feature
    figure counts every slice, not this process's."""

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        loss, per_layer = super().forward(x, y)
        for rec, src in zip(per_layer, self.clt.layers):
            rec["dead"] = int(src.count_dead())
        return loss, per_layer


def shard_dictionary(dictionary: torch.nn.Module, mesh) -> torch.nn.Module:
    """This process's slice of ``dictionary`` (the same full one on every process) over the mesh's
    "tp" dim: per-layer transcoders as FeatureShardedTranscoders in a ``PerLayerTranscoders``, a
    cross-layer transcoder as a FeatureShardedCrossLayerTranscoder in a ``ShardedCrossLayer``."""
    from tckernels.nn.sharded import FeatureShardedCrossLayerTranscoder, FeatureShardedTranscoder

    if isinstance(dictionary, PerLayerTranscoders):
        return PerLayerTranscoders(dictionary.layers, [FeatureShardedTranscoder.from_transcoder(tc, mesh, mesh_dim="tp")
                                                       for tc in dictionary.transcoders])
    if isinstance(dictionary, CrossLayer):
        return ShardedCrossLayer(dictionary.layers,
                                 FeatureShardedCrossLayerTranscoder.from_crosslayer(dictionary.clt, mesh, mesh_dim="tp"))
    raise ConfigError(f"feature_shards: a {type(dictionary).__name__} cannot be feature-sharded")


def whole_dictionary(tr: Trainer) -> torch.nn.Module:
    """The full dictionary: the trained one, or with feature sharding its slices gathered into an
    ordinary one (on every process; collective), which validation, checkpoints and export use."""
    d = tr.dictionary
    if not tr.par.sharded:
        return d
    if isinstance(d, PerLayerTranscoders):
        return PerLayerTranscoders(d.layers, [tc.to_transcoder() for tc in d.transcoders])
    return CrossLayer(d.layers, d.clt.to_crosslayer())


def load_whole_dictionary_(tr: Trainer, full: torch.nn.Module) -> None:
    """Copy a full dictionary's weights and state into this process's slices, in place (the
    optimizers keep their parameters). Collective."""
    d = tr.dictionary
    if isinstance(d, PerLayerTranscoders):
        for mine, tc in zip(d.transcoders, full.transcoders):
            mine.copy_from_(tc)
    else:
        d.clt.copy_from_(full.clt)


def _row_owners(tr: Trainer) -> dict:
    """``id(parameter) -> the FeatureShardedTranscoder holding its rows`` for the sharded parameters."""
    from tckernels.nn.sharded import FeatureShardedTranscoder

    owners = {}
    for m in tr.dictionary.modules():
        if isinstance(m, FeatureShardedTranscoder):
            owners.update({id(p): m for p in m.shard.parameters() if m.is_sharded(p)})
    return owners


def _optimizer_params(o: torch.optim.Optimizer) -> list:
    return [p for g in o.param_groups for p in g["params"]]  # the order of the state dict's indices


def _map_row_states(tr: Trainer, o: torch.optim.Optimizer, sd: dict, fn) -> dict:
    """``sd`` (an optimizer state dict of ``o``'s parameters) with ``fn(module, state, param)``
    applied to every tensor state of a feature-sharded parameter (the others as they are)."""
    owners = _row_owners(tr)
    state = {}
    for i, p in enumerate(_optimizer_params(o)):
        if i not in sd["state"]:
            continue
        m = owners.get(id(p))
        state[i] = {k: (fn(m, v, p) if m is not None and torch.is_tensor(v) else v) for k, v in sd["state"][i].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def whole_optimizer_state(tr: Trainer, o: torch.optim.Optimizer) -> dict:
    """``o.state_dict()`` as the full dictionary's optimizer would have it: every per-feature state
    of a sharded parameter (AdamW's moments) gathered from its slices. The parameters' order is the
    full dictionary's, so the checkpoint does not depend on feature_shards. Collective."""
    sd = o.state_dict()
    if not tr.par.sharded:
        return sd
    return _map_row_states(tr, o, sd, lambda m, v, p: m.gather_rows(v) if v.shape == p.shape else v)


def load_whole_optimizer_state_(tr: Trainer, o: torch.optim.Optimizer, sd: dict) -> None:
    """Load a full dictionary's optimizer state (``whole_optimizer_state``'s layout) into ``o``:
    this process's rows of every per-feature state."""
    if tr.par.sharded:
        sd = _map_row_states(tr, o, sd, lambda m, v, p: (m.local_rows(v) if v.dim() == p.dim()
                                                         and v.shape[0] == m.n_features else v))
    o.load_state_dict(sd)


def average_gradients_over_dp(tr: Trainer) -> None:
    """Feature sharding: the mean of the gradients over the data-parallel replicas (DDP does it
    otherwise). Each tp rank averages its slice with the same slice of the other replicas."""
    if not tr.par.sharded or tr.par.dp == 1:
        return
    grads = [p.grad for p in tr.dictionary.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all of them
    dist.all_reduce(flat, group=tr.par.dp_group)
    flat /= tr.par.dp
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_gradients(tr: Trainer, max_norm: float) -> float:
    """``clip_grad_norm_`` over the whole dictionary; returns the total norm before clipping. With
    feature sharding the squares of the sharded parameters' gradients are summed over the tp group
    and the replicated ones (equal on every tp rank) counted once."""
    params = [p for p in tr.dictionary.parameters() if p.grad is not None]
    if not tr.par.sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    owners = _row_owners(tr)
    sq = torch.zeros(2, dtype=torch.float64, device=tr.pg.device)  # [sharded, replicated]
    for p in params:
        sq[0 if id(p) in owners else 1] += p.grad.detach().double().pow(2).sum()
    shared = sq[0].clone()
    dist.all_reduce(shared, group=tr.par.mesh.get_group("tp"))
    total = float((shared + sq[1]).sqrt())
    coef = min(max_norm / (total + 1e-6), 1.0)
    for p in params:
        p.grad.mul_(coef)
    return total


def setup(cfg: TranscoderRunConfig, pg: Dist) -> Trainer:
    preflight(cfg)
    par = parallel_layout(cfg, pg)
    resume_path = ckpt.resolve_resume(cfg.resume_from, cfg.output_dir)
    earlier_run = check_output_dir(cfg, resume_path, RUN_OUTPUTS + ("transcoders",)) if pg.main else []
    from transformers import AutoConfig

    try:
        n_model_layers = AutoConfig.from_pretrained(cfg.model).num_hidden_layers
    except Exception as e:
        raise SetupError(f"model {cfg.model!r}: cannot read its configuration ({type(e).__name__}: {e})") from None
    layers = cfg.layer_list(n_model_layers)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    train_ids, val_ids = load_data(cfg, tokenizer)
    model = load_model("model", cfg.model, cfg, pg.device)
    for p in model.parameters():
        p.requires_grad_(False)
    # each data-parallel replica runs its own forwards (replica r: r, r + dp, ...) and shuffles its own
    # buffer; the feature shards of one replica make the same batches, so they need no broadcast
    stream = ActivationStream(model, train_ids, layers, cfg.input_hook, cfg.output_hook,
                              forward_batch_size=cfg.forward_batch_size, seed=cfg.seed, rank=par.dp_rank,
                              world_size=par.dp, cache_dir=cfg.cache_dir, data_path=cfg.train_data)
    buffer = ActivationBuffer(stream, cfg.buffer_tokens, cfg.batch_tokens, seed=cfg.seed + 7919 * par.dp_rank)
    try:
        dictionary = build_dictionary(cfg.architecture, layers, stream.d_in, stream.d_out, cfg.n_features,
                                      transcoder_kwargs(cfg), bilinear_kind=cfg.bilinear_kind,
                                      reconstruction_loss=cfg.reconstruction_loss, seed=cfg.seed, device=pg.device)
    except ValueError as e:
        raise ConfigError(f"the dictionary cannot be built from this configuration: {e}") from None
    if par.sharded:
        # the full dictionary, initialised as one process would, then sliced: runs with any
        # feature_shards start from the same weights
        dictionary = shard_dictionary(dictionary, par.mesh)
    objective = dictionary
    if pg.enabled and not par.sharded:
        from torch.nn.parallel import DistributedDataParallel

        # the dead-feature counters and BatchTopK thresholds are combined after each step (sync_state);
        # DDP's per-forward broadcast would overwrite them with rank 0's instead
        import inspect

        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})  # the name before torch 2.13
        objective = DistributedDataParallel(dictionary, device_ids=[pg.device] if pg.device.type == "cuda" else None,
                                            **no_buffer_sync)
    optimizers = make_optimizers(cfg, dictionary, pg.device)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule(cfg)) for o in optimizers]
    tr = Trainer(cfg=cfg, pg=pg, model=model, layers=layers, buffer=buffer, val_ids=val_ids, dictionary=dictionary,
                 objective=objective, optimizers=optimizers, schedulers=schedulers, par=par)
    if resume_path is not None:
        resume(tr, resume_path)
    else:
        estimate_standardization(tr)
    if pg.main:
        clear_earlier_run(cfg, earlier_run)
    pg.barrier()
    tr.reporter = Reporter(cfg, pg.main, tr.step if resume_path is not None else None)
    if pg.main:
        what = {"per_layer": "per-layer transcoders", "crosslayer": "a cross-layer transcoder",
                "bilinear": f"bilinear {cfg.bilinear_kind}s"}[cfg.architecture]
        act = "" if cfg.architecture == "bilinear" else (
            f", {cfg.activation}" + (f" k={cfg.k}" if cfg.activation in ('topk', 'batchtopk') else ""))
        print(f"transcoders: {what} on layers {layers} x {cfg.n_features} features{act}; {len(train_ids)} training / "
              f"{len(val_ids)} validation rows of {cfg.context_length} tokens, {cfg.max_steps} steps of "
              f"{cfg.batch_tokens} tokens x {par.dp} data-parallel process(es)"
              + (f" x {par.shards} feature shards" if par.sharded else "") + f", {cfg.optimizer}, device {pg.device}"
              + (f", resumed from {resume_path} at step {tr.step}" if resume_path else ""), flush=True)
    return tr


def estimate_standardization(tr: Trainer) -> None:
    """Each layer's input and output mean/std from the first ``standardize_batches`` batches (read for
    that only, so every training step sees standardised data from the start). With several processes
    every one reads its batches (its buffer moves on alike) and all use rank 0's estimate."""
    cfg = tr.cfg
    n = len(tr.layers)
    if cfg.standardize == "none":
        tr.std_in, tr.std_out = [None] * n, [None] * n
        return
    d_in, d_out = tr.buffer.source.d_in, tr.buffer.source.d_out
    # a BilinearTranscoder's hidden layer (sum_i x_i) * W_right x takes no shift and one scale only
    center_in = not (cfg.architecture == "bilinear" and cfg.bilinear_kind == "transcoder")
    est_in = [Standardizer(d_in, scale=cfg.standardize, center=center_in) for _ in range(n)]
    est_out = [Standardizer(d_out, scale=cfg.standardize) for _ in range(n)]
    for _ in range(cfg.standardize_batches):
        b = tr.buffer.next_batch()
        for j in range(n):
            est_in[j].update(b.inputs[:, j])
            est_out[j].update(b.targets[:, j])
    stats = _stats([e.compute() for e in est_in]), _stats([e.compute() for e in est_out])
    stats = tr.pg.gather_objects(stats)[0]
    tr.std_in, tr.std_out = _unstats(stats[0]), _unstats(stats[1])


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
    """Every data-parallel replica's buffer position and RNG states, and the (equal on every
    replica) weights, optimizer and scheduler states, written by rank 0. With feature sharding the
    weights and optimizer state are gathered first, so the checkpoint is the one a run without it
    writes and resumes with any feature_shards."""
    par = tr.par
    per_rank = tr.pg.gather_objects({"buffer": tr.buffer.state_dict(), "rng": ckpt.rng_state(),
                                     "dp": par.dp_rank, "tp": par.tp_rank})
    replicas = sorted((r for r in per_rank if r["tp"] == 0), key=lambda r: r["dp"])  # a replica's shards agree
    weights = whole_dictionary(tr).weights()
    optimizers = [whole_optimizer_state(tr, o) for o in tr.optimizers]
    if tr.pg.main:
        state = {"optimizer": optimizers,
                 "scheduler": [s.state_dict() for s in tr.schedulers], "step": tr.step, "tokens": tr.tokens_seen,
                 "world_size": par.dp, "feature_shards": par.shards, "buffer": [r["buffer"] for r in replicas],
                 "rng": [r["rng"] for r in replicas], "std_in": _stats(tr.std_in), "std_out": _stats(tr.std_out)}
        tr.last_good = ckpt.save_checkpoint(tr.cfg.output_dir, tr.step, weights, state,
                                            tr.cfg.to_dict(), tr.cfg.keep_checkpoints)
    tr.last_good = tr.pg.gather_objects(tr.last_good)[0]


def resume(tr: Trainer, path: str) -> None:
    par = tr.par

    def load_weights(weights: dict):
        full = whole_dictionary(tr)  # with feature sharding: a full copy to load, then sliced
        try:
            full.load_weights(weights)
        except RuntimeError as e:
            raise ckpt.CheckpointError(f"the checkpoint's dictionary does not fit this configuration (different "
                                       f"architecture, layers or n_features?): {e}") from None
        if par.sharded:
            load_whole_dictionary_(tr, full)

    state = ckpt.load_checkpoint(path, load_weights)
    try:
        world = state.get("world_size", 1)  # data-parallel replicas, each with its buffer position
        if world != par.dp:
            this = f"{par.dp}" + (f" ({tr.pg.world} processes / feature_shards {par.shards})" if par.sharded else "")
            raise ckpt.CheckpointError(f"{path}: written by {world} data-parallel process(es); resume it with as "
                                       f"many (this run has {this}), since each one's buffer position is kept; "
                                       f"feature_shards may differ")
        optimizers = state["optimizer"] if isinstance(state["optimizer"], list) else [state["optimizer"]]
        schedulers = state["scheduler"] if isinstance(state["scheduler"], list) else [state["scheduler"]]
        if len(optimizers) != len(tr.optimizers):
            raise ckpt.CheckpointError(f"{path}: written with another optimizer ({len(optimizers)} optimizer "
                                       f"state(s), this configuration has {len(tr.optimizers)})")
        for o, s in zip(tr.optimizers, optimizers):
            load_whole_optimizer_state_(tr, o, s)
        for sch, s in zip(tr.schedulers, schedulers):
            sch.load_state_dict(s)
        tr.buffer.load_state_dict(state["buffer"][par.dp_rank])
        tr.step, tr.tokens_seen = state["step"], state["tokens"]
        tr.std_in, tr.std_out = _unstats(state["std_in"]), _unstats(state["std_out"])
        ckpt.set_rng_state(state["rng"][par.dp_rank])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ckpt.CheckpointError(f"{os.path.join(path, ckpt.TRAINER)}: not a transcoder training state "
                                   f"this run can continue ({type(e).__name__}: {e})") from None
    tr.last_good = path


# --------------------------------------------------------------------------------------------------
# one optimizer step
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sync_state(tr: Trainer, batch_tokens: int) -> None:
    """Make the state each training forward updates equal on every data-parallel replica: a feature
    has fired in this step if it fired on any replica (each counted only its own ``batch_tokens``),
    and the BatchTopK thresholds are averaged. (With feature sharding each process's counters are
    its slice's, combined with the same slice of the other replicas.)"""
    dp, group = tr.par.dp, tr.par.dp_group
    if not tr.pg.enabled or dp == 1:
        return
    for c in tr.dictionary.counters():
        dist.all_reduce(c, op=dist.ReduceOp.MIN, group=group)
        c[c > 0] += (dp - 1) * batch_tokens
    for t in tr.dictionary.thresholds():
        dist.all_reduce(t, group=group)
        t /= dp


def train_step(tr: Trainer) -> dict:
    """One batch per process through the dictionary, its objective, backward (gradients averaged over
    processes), clipping, the optimizers and schedules."""
    cfg = tr.cfg
    tr.dictionary.train()
    tr.dictionary.set_l1_coefficient(l1_at(cfg, tr.step))
    b = tr.buffer.next_batch()
    dev = tr.pg.device
    x = torch.stack([_std(tr.std_in[j], b.inputs[:, j].to(dev)) for j in range(len(tr.layers))], dim=1)
    y = torch.stack([_std(tr.std_out[j], b.targets[:, j].to(dev)) for j in range(len(tr.layers))], dim=1)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.autocast):
        total, per_layer = tr.objective(x, y)
    total.backward()
    average_gradients_over_dp(tr)
    sync_state(tr, b.n)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = clip_gradients(tr, max_norm)
    loss = float(tr.pg.all_mean(total.detach().float()))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        where = f"the last good checkpoint is {tr.last_good}" if tr.last_good else "no checkpoint was written yet"
        raise TrainingDiverged(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step "
                               f"{tr.step + 1} (loss {loss}, grad norm {grad_norm}); stopping without an optimizer "
                               f"step. {where}")
    lr = tr.schedulers[0].get_last_lr()[0]
    for o in tr.optimizers:
        o.step()
    for s in tr.schedulers:
        s.step()
    for o in tr.optimizers:
        o.zero_grad(set_to_none=True)
    tr.step += 1
    tr.tokens_seen += b.n * tr.par.dp
    return {"step": tr.step, "split": "train", "lr": lr, "loss": loss, "grad_norm": grad_norm,
            "fvu": sum(r["fvu"] for r in per_layer) / len(per_layer), "layers": per_layer,
            "tokens": tr.tokens_seen, "elapsed_s": round(time.time() - tr.t0, 3)}


def log_step(tr: Trainer, rec: dict, bar) -> None:
    cfg = tr.cfg
    if rec["step"] % cfg.log_every == 0 or rec["step"] == cfg.max_steps:
        tr.reporter.log(rec)
    if not tr.pg.main:
        return
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", fvu=f"{rec['fvu']:.3f}", refresh=False)
    elif cfg.progress_bar and (rec["step"] % max(1, cfg.max_steps // 20) == 0 or rec["step"] == cfg.max_steps):
        print(f"step {rec['step']}/{cfg.max_steps}  loss {rec['loss']:.4f}  fvu {rec['fvu']:.4f}  "
              f"lr {rec['lr']:.2e}  {time.time() - tr.t0:.0f}s", flush=True)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
class _ReplacementHooks:
    """Hooks at every chosen layer's input and output points for one model forward: each point's
    value is recorded (raw), and at the layers of ``replace`` (layer positions) the output point
    takes the dictionary's estimate instead. A cross-layer transcoder's estimate at a layer reads the
    earlier chosen layers' inputs in the same forward (the replaced model's, where they are
    replaced too). With one point for both (a sparse autoencoder) the point's value is replaced by
    its reconstruction."""

    def __init__(self, tr: Trainer, replace=(), dictionary: Optional[torch.nn.Module] = None):
        from tckernels.models import find_decoder_layers

        self.tr, self.replace = tr, set(replace)
        self.dictionary = tr.dictionary if dictionary is None else dictionary
        self.decoder = find_decoder_layers(tr.model)
        self.ins, self.outs, self.xs, self.memo = {}, {}, {}, {}

    def _estimate(self, j: int, like: torch.Tensor) -> torch.Tensor:
        y = self.dictionary.replacement(j, self.xs, self.memo)
        return _unstd(self.tr.std_out[j], y).to(like.dtype)

    def _seen(self, j: int, point: str, value: torch.Tensor) -> Optional[torch.Tensor]:
        """Record ``value`` at ``point`` of layer position j; the value to use instead, if any."""
        cfg = self.tr.cfg
        if point == cfg.input_hook:
            self.ins[j] = value
            self.xs[j] = _std(self.tr.std_in[j], value.float())
        if point == cfg.output_hook:
            self.outs[j] = value
            if j in self.replace:
                return self._estimate(j, value)
        return None

    def __enter__(self):
        cfg = self.tr.cfg
        self.handles = []
        for j, i in enumerate(self.tr.layers):
            layer = self.decoder[i]
            for point in dict.fromkeys((cfg.input_hook, cfg.output_hook)):
                module = layer if point.startswith("resid") else layer.mlp
                if point in ("resid_pre", "mlp_in"):  # what the module reads
                    def pre(module, args, kwargs, j=j, point=point):
                        new = self._seen(j, point, first_tensor(args, kwargs))
                        return None if new is None else with_first_tensor(args, kwargs, new)

                    self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                else:  # what it writes
                    def post(module, args, output, j=j, point=point):
                        tup = isinstance(output, (tuple, list))
                        new = self._seen(j, point, output[0] if tup else output)
                        if new is None:
                            return None
                        return (new, *output[1:]) if tup else new

                    self.handles.append(module.register_forward_hook(post))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _kl_top1(orig: torch.Tensor, new: torch.Tensor) -> tuple:
    """(summed KL(orig || new) over positions, number of positions where the argmax agrees)."""
    lp, lq = F.log_softmax(orig, -1), F.log_softmax(new, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    # summed in float64, so the figures do not depend on how the held-out rows are batched
    return float(kl.double().sum()), int((orig.argmax(-1) == new.argmax(-1)).sum())


@torch.no_grad()
def validate(tr: Trainer, dictionary: Optional[torch.nn.Module] = None) -> dict:
    """Per layer FVU and L0 on the raw held-out activations, the dead fraction (training tokens), and
    the replacement model's KL(original || replaced) and top-1 agreement: every chosen layer replaced,
    and each alone. Batch by batch (``val_batch_size`` rows): nothing of the held-out set's size is
    kept but per-layer sums. ``dictionary``: the full one to validate (default ``tr.dictionary``;
    with feature sharding, ``whole_dictionary(tr)``)."""
    d = tr.dictionary if dictionary is None else dictionary
    d.eval()
    n = len(tr.layers)
    dev = tr.pg.device
    err = [0.0] * n
    s1, s2, l0_sum = [0.0] * n, [0.0] * n, [0.0] * n  # Σy, Σy² per dimension (float64), Σ L0
    kl_all, top1_all, kl_one, top1_one = 0.0, 0, [0.0] * n, [0] * n
    n_tok = 0
    for s in range(0, len(tr.val_ids), tr.cfg.val_batch_size):
        ids = tr.val_ids[s:s + tr.cfg.val_batch_size].to(dev)
        with _ReplacementHooks(tr, (), d) as h:
            orig = tr.model(input_ids=ids, use_cache=False).logits.float()
        for j in range(n):
            x, y = h.ins[j].reshape(-1, h.ins[j].shape[-1]), h.outs[j].reshape(-1, h.outs[j].shape[-1]).double()
            y_hat = _unstd(tr.std_out[j], d.replacement(j, h.xs, h.memo)).double()
            err[j] += float((y_hat.reshape(y.shape) - y).pow(2).sum())
            s1[j] = s1[j] + y.sum(0)
            s2[j] = s2[j] + y.pow(2).sum(0)
            codes = d.codes(j, h.xs[j].reshape(-1, h.xs[j].shape[-1]))
            if codes is not None:
                l0_sum[j] += float(M.l0(codes.values)) * x.shape[0]
        n_tok += ids.numel()
        with _ReplacementHooks(tr, range(n), d):
            kl, agree = _kl_top1(orig, tr.model(input_ids=ids, use_cache=False).logits.float())
        kl_all, top1_all = kl_all + kl, top1_all + agree
        for j in range(n):
            with _ReplacementHooks(tr, [j], d):
                kl, agree = _kl_top1(orig, tr.model(input_ids=ids, use_cache=False).logits.float())
            kl_one[j] += kl
            top1_one[j] += agree
    var = [float((b - a * a / n_tok).sum()) for a, b in zip(s1, s2)]  # Σ over dims of Σ(y - ȳ)²
    dead = d.dead_fractions()
    out = {"layers": tr.layers, "n_tokens": n_tok, "fvu": [e / max(v, 1e-30) for e, v in zip(err, var)],
           "kl_all": kl_all / n_tok, "top1_all": top1_all / n_tok,
           "kl_each": [x / n_tok for x in kl_one], "top1_each": [x / n_tok for x in top1_one]}
    if tr.cfg.architecture != "bilinear":
        out["l0"] = [x / n_tok for x in l0_sum]
        out["dead_fraction"] = dead
    return out


def validate_and_log(tr: Trainer, when: str, full: Optional[torch.nn.Module] = None) -> Optional[dict]:
    """Validation on rank 0 (the others wait): its figures, or None on the other processes. With
    feature sharding every process first takes part in gathering the full dictionary (or passes
    ``full``, ``whole_dictionary(tr)``)."""
    full = whole_dictionary(tr) if full is None else full
    v = None
    if tr.pg.main:
        v = validate(tr, full)
        tr.reporter.log({"step": tr.step, "split": "val", "when": when, **v})
    tr.pg.barrier()
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
    try:
        return _run(cfg, pg, t_start)
    finally:
        pg.close()


def _run(cfg: TranscoderRunConfig, pg: Dist, t_start: float) -> dict:
    tr = setup(cfg, pg)
    bar = progress_bar(cfg.max_steps, tr.step, cfg.progress_bar) if pg.main else None
    tr.t0 = time.time()
    halted = False
    try:
        while tr.step < cfg.max_steps:
            rec = train_step(tr)
            log_step(tr, rec, bar)
            if cfg.eval_every and tr.step % cfg.eval_every == 0 and tr.step < cfg.max_steps:
                v = validate_and_log(tr, "periodic")
                if v is not None:
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


def save_transcoders(tr: Trainer, full: Optional[torch.nn.Module] = None) -> dict:
    """The dictionary with its standardisation folded into the weights (copies; the trained modules
    are left as they are), saved with ``save_transcoder`` to output_dir/transcoders/<name>: one
    directory per layer (``layer_<i>``), or ``crosslayer`` for a cross-layer transcoder. ``full``:
    the full dictionary (``whole_dictionary(tr)``; default ``tr.dictionary``), so that feature-sharded
    runs save ordinary transcoders."""
    paths = {}
    for name, module in (tr.dictionary if full is None else full).exported(tr.std_in, tr.std_out).items():
        path = os.path.join(tr.cfg.output_dir, "transcoders", name)
        save_transcoder(module, path)
        paths[name] = path
    return paths


def report(v: dict, where: str = "MLP") -> str:
    lines = ["", "== transcoders: result =="]
    for j, i in enumerate(v["layers"]):
        sparse = (f", L0 {v['l0'][j]:.1f}, dead {100 * v['dead_fraction'][j]:.1f}%" if "l0" in v else "")
        lines.append(f"layer {i}: FVU {v['fvu'][j]:.4f}{sparse}, replaced alone: KL {v['kl_each'][j]:.4f}, "
                     f"top-1 {100 * v['top1_each'][j]:.1f}%")
    lines.append(f"replacement model (every chosen layer's {where} replaced), {v['n_tokens']} held-out tokens: "
                 f"KL(original || replaced) {v['kl_all']:.4f}, top-1 agreement {100 * v['top1_all']:.1f}%")
    return "\n".join(lines)


def finish(tr: Trainer, halted: bool, t_start: float) -> dict:
    cfg = tr.cfg
    stream = tr.buffer.source
    summary = {"steps": tr.step, "total_steps": cfg.max_steps, "train_seconds": round(time.time() - tr.t0, 1),
               "tokens": tr.tokens_seen, "processes": tr.pg.world,
               "feature_shards": tr.par.shards, "dead_after_tokens": cfg.dead_after_tokens,
               "checkpoint": tr.last_good}
    if getattr(stream, "seconds", None) is not None:
        summary["activation_seconds"] = round(stream.seconds, 1)  # this process's model forwards
    if halted:
        if tr.pg.main:
            print(f"halted after step {tr.step} of {cfg.max_steps} (halt_at_step); checkpoint {tr.last_good}",
                  flush=True)
        summary["halted"] = True
        tr.reporter.close()
        return summary
    full = whole_dictionary(tr)  # collective: before the main process alone goes on
    summary["final"] = validate_and_log(tr, "end", full)
    if tr.pg.main:
        summary["transcoders"] = save_transcoders(tr, full) if tr.par.sharded else save_transcoders(tr)
        summary["total_seconds"] = round(time.time() - t_start, 1)
        with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        where = "MLP" if (cfg.input_hook, cfg.output_hook) == ("mlp_in", "mlp_out") else cfg.output_hook
        print(report(summary["final"], where), flush=True)
        print(f"(transcoders: {os.path.join(cfg.output_dir, 'transcoders')}; metrics: {tr.reporter.path}; "
              f"{summary['total_seconds']:.0f} s in all)", flush=True)
    tr.pg.barrier()
    tr.reporter.close()
    return summary


def main(argv=None) -> int:
    # ValueError: the activation stream or cache refusing the data, model or layers (before training)
    return loop.main(argv, TranscoderRunConfig, DEFAULT_CONFIG, lambda cfg: run(cfg), refused=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
