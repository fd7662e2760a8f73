"""What both training loops (``training/train.py``, ``training/transcoders.py``) share around their
steps: the errors that stop a run, the processes and device (torchrun), the model loading, the
output_dir rules, the learning-rate schedule and the command line.

A loop's configuration is a dataclass with at least ``device``, ``dtype``, ``attn_implementation``,
``output_dir``, ``resume_from`` and ``overwrite_output_dir`` (``training.config`` reads it).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist

from training import checkpoint as ckpt
from training import config as config_lib
from training.config import ConfigError
from training.data import DataError


class SetupError(RuntimeError):
    """Models, devices or logging backends that cannot be used; raised before training starts."""


class TrainingDiverged(RuntimeError):
    """A NaN or infinite loss or gradient."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}




# --------------------------------------------------------------------------------------------------
# processes and devices
# --------------------------------------------------------------------------------------------------
class Dist:
    def __init__(self, cfg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        want = cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise SetupError(f"device {cfg.device!r}: CUDA is not available")
            self.device = torch.device(f"cuda:{self.local}" if want == "cuda" else want)
            torch.cuda.set_device(self.device)
        elif want == "cpu":
            self.device = torch.device("cpu")
        else:
            raise SetupError(f"device {cfg.device!r}: expected auto, cpu, cuda or cuda:N")
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
        self.main = self.rank == 0

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def all_any(self, t: torch.Tensor) -> torch.Tensor:
        """A bool tensor, True where it is True on any process."""
        if self.enabled:
            t = t.to(torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            t = t.bool()
        return t

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()




def check_model_path(name: str, path: str) -> None:
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SetupError(f"{name} {path!r}: no config.json in it (not a Hugging Face model directory)")
        return
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise SetupError(f"{name} {path!r}: no such directory (and not a hub id like 'org/name')")




def load_model(name: str, path: str, cfg, device):
    from transformers import AutoModelForCausalLM

    kw = {"dtype": DTYPES[cfg.dtype]}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except Exception as e:
        raise SetupError(f"{name} {path!r}: cannot load the model ({type(e).__name__}: {e})") from None
    model.to(device)
    model.eval()
    return model

# what a run writes into output_dir; any of them there means the directory holds an earlier run
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "summary.json", "final_model", "tensorboard")


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory + os.sep)


def check_output_dir(cfg, resume_path: Optional[str], outputs=RUN_OUTPUTS) -> list:
    """Refuse to write over an earlier run in ``output_dir`` unless told: resuming from one of its own
    checkpoints continues it; ``overwrite_output_dir`` replaces it. Returns the earlier run's outputs
    that ``clear_earlier_run`` is to delete (none unless overwriting)."""
    out = cfg.output_dir
    found = [n for n in outputs if os.path.lexists(os.path.join(out, n))]
    if not found:
        return []
    continuing = resume_path is not None and _inside(resume_path, ckpt.checkpoints_dir(out))
    if continuing and cfg.overwrite_output_dir:
        raise SetupError(f"resume_from {cfg.resume_from!r} is a checkpoint in output_dir {out!r}, which "
                         f"overwrite_output_dir would delete; choose one of them")
    if continuing:
        return []
    if not cfg.overwrite_output_dir:
        why = (f"and resume_from {cfg.resume_from!r} is not one of its checkpoints"
               if resume_path is not None else "and this run would overwrite it")
        raise SetupError(
            f"output_dir {out!r} holds an earlier run ({', '.join(found)}), {why}. To continue that run, "
            f"add --resume_from latest; to delete it and start afresh, add --overwrite_output_dir; "
            f"or choose another --output_dir")
    return found


def clear_earlier_run(cfg, found: list) -> None:
    """Delete the earlier run's outputs ``found`` in output_dir (what ``overwrite_output_dir`` asked
    for), so its checkpoints, metrics and final model cannot be mistaken for this run's. Other files
    there are left alone."""
    for n in found:
        p = os.path.join(cfg.output_dir, n)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
        except OSError as e:
            raise SetupError(f"overwrite_output_dir: cannot delete {p!r} ({e})") from None
    if found:
        print(f"overwrite_output_dir: deleted the earlier run's {', '.join(found)} in {cfg.output_dir}", flush=True)


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """The learning-rate factor of optimizer step ``step`` (from 0): Hugging Face's cosine schedule
    with linear warmup (``get_cosine_schedule_with_warmup``, the original's), so the first step has
    factor 0, over ``int(warmup_ratio * total_steps)`` warmup steps; the cosine then decays to
    ``min_lr_ratio`` (0 in Hugging Face's)."""
    warmup = int(warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * max(0.0, 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    return f


# --------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------
def main(argv, schema, default_config: str, run: Callable, refused: tuple = ()) -> int:
    """A loop's command line: ``--help`` (the defaults of ``--config FILE`` when given), or the
    configuration read and ``run``. Exit 0 when it finished; 2 when something was refused before
    training (configuration, data, setup, checkpoint, or ``refused``); 1 when training diverged."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if "-h" in argv or "--help" in argv:
            print(config_lib.help_text(config_lib.config_path_of(argv), schema, default_config))
            return 0
        run(config_lib.load_config(argv, default_config, schema=schema))
    except (ConfigError, DataError, SetupError, ckpt.CheckpointError, *refused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
