"""Checkpoints that resume exactly, written atomically.

A checkpoint is a directory ``<output_dir>/checkpoints/step_<N>/`` with

* ``weights.safetensors``: the trained weights: the adapter parameters under the model's state-dict
  names (the adapter loop), or whatever ``{name: tensor}`` the loop passes (the transcoder loop's
  dictionary, ``layer_<i>.<name>`` or ``crosslayer.<name>``). Checkpoints written before this name
  call it ``adapters.safetensors``; they are read as before;
* ``trainer.pt``: optimizer, scheduler, step, data position, every process's RNG states and the
  adapters' dead-feature counters (``training.train.trainer_state``);
* ``config.json``: the run's configuration (for people; resuming uses the current configuration).

A sharded run (``fsdp``) writes ``sharded/`` instead of the weights file: the adapter parameters and
their AdamW state through ``torch.distributed.checkpoint``, each process its own shards, so nothing
is gathered onto one process; it is read back on any number of processes (one included), each
taking the pieces its own shards need. ``trainer.pt`` then holds no optimizer state.

It is written to a temporary directory that is renamed into place only when complete, so a crash
while saving never leaves a half-written checkpoint under a real name; ``checkpoints/latest`` (a
one-line file, replaced atomically) names the newest one. Older checkpoints beyond
``keep_checkpoints`` are removed after a new one is in place.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

WEIGHTS = "weights.safetensors"
LEGACY_WEIGHTS = "adapters.safetensors"  # the name in checkpoints written before WEIGHTS
TRAINER = "trainer.pt"
SHARDED = "sharded"  # the torch.distributed.checkpoint directory of a sharded run's checkpoint
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    s = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if np is not None:
        s["numpy"] = np.random.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if np is not None and "numpy" in s:
        np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# --------------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------------
def adapter_state(model: torch.nn.Module) -> dict:
    """``{state-dict name: tensor}`` of the trainable (adapter) parameters, contiguous, on CPU."""
    from tckernels.models import adapter_parameters

    ids = {id(p) for p in adapter_parameters(model)}
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if id(p) in ids}


@torch.no_grad()
def load_adapter_state(model: torch.nn.Module, state: dict) -> None:
    from tckernels.models import adapter_parameters

    ids = {id(p) for p in adapter_parameters(model)}
    params = {n: p for n, p in model.named_parameters() if id(p) in ids}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint's adapters do not match the model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]} (different n_features, layers or backbone?)")
    for n, p in params.items():
        t = state[n]
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{n}: checkpoint shape {tuple(t.shape)} vs model {tuple(p.shape)}")
        p.copy_(t.to(device=p.device, dtype=p.dtype))  # in place: keeps the decoder's memory layout


# --------------------------------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------------------------------
def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoint directories, oldest first."""
    d = checkpoints_dir(output_dir)
    if not os.path.isdir(d):
        return []
    found = []
    for name in os.listdir(d):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(d, name, TRAINER)):
            found.append((int(m.group(1)), os.path.join(d, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    d = checkpoints_dir(output_dir)
    pointer = os.path.join(d, "latest")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(d, name)
        if os.path.isfile(os.path.join(path, TRAINER)):
            return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str, step: int, model, trainer_state: dict, config: dict,
                    keep: int = 2) -> str:
    """Write checkpoint ``step`` atomically (call on one process only); returns its directory.
    ``model``: the adapted model (its adapter parameters are saved) or a ``{name: tensor}`` dict."""
    from safetensors.torch import save_file

    root = checkpoints_dir(output_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    weights = ({n: t.detach().to("cpu").contiguous() for n, t in model.items()} if isinstance(model, dict)
               else adapter_state(model))
    save_file(weights, os.path.join(tmp, WEIGHTS), metadata={"step": str(step)})
    _write_trainer_files(tmp, trainer_state, config)
    return _commit(output_dir, name, tmp, keep)


def _write_trainer_files(tmp: str, trainer_state: dict, config: dict) -> None:
    torch.save(trainer_state, os.path.join(tmp, TRAINER))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=1, default=str)


def _fsync_tree(path: str) -> None:
    for d, _, files in os.walk(path):
        for fn in files:
            with open(os.path.join(d, fn), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(d)


def _commit(output_dir: str, name: str, tmp: str, keep: int) -> str:
    """Rename the complete checkpoint ``tmp`` into place as ``name``, point ``latest`` at it and
    remove the checkpoints beyond the newest ``keep``; returns its directory."""
    root = checkpoints_dir(output_dir)
    final = os.path.join(root, name)
    _fsync_tree(tmp)
    if os.path.exists(final):  # the same step saved again (e.g. after a resume): swap it out
        old = os.path.join(root, f".{name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(os.path.join(root, "latest"), name + "\n")
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        if os.path.abspath(old) != os.path.abspath(final):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _state_dicts(model, optimizer) -> dict:
    """The adapter parameters and the optimizer state, as ``torch.distributed.checkpoint`` saves
    and loads them (sharded tensors stay sharded)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded_checkpoint(output_dir: str, step: int, model, optimizer, trainer_state: Optional[dict],
                            config: dict, keep: int, main: bool, barrier) -> str:
    """Write checkpoint ``step`` of a sharded run atomically; every process calls it. Each process
    writes its shards of the adapters and of their optimizer state; ``main`` (with the
    ``trainer_state``) writes the rest and commits. ``barrier``: waits for every process."""
    import torch.distributed.checkpoint as dcp

    root = checkpoints_dir(output_dir)
    name = f"step_{step:08d}"
    tmp = os.path.join(root, f".{name}.tmp")  # one name for every process
    if main:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    dcp.save(_state_dicts(model, optimizer), checkpoint_id=os.path.join(tmp, SHARDED))
    if main:
        _write_trainer_files(tmp, trainer_state, config)
    barrier()  # every process's shards are written
    if main:
        _commit(output_dir, name, tmp, keep)
    barrier()
    return os.path.join(root, name)


def is_sharded(path: str) -> bool:
    """Whether checkpoint directory ``path`` was written by a sharded run."""
    return os.path.isdir(os.path.join(path, SHARDED))


def load_sharded_checkpoint(path: str, model, optimizer) -> dict:
    """Load a sharded run's checkpoint into the adapters of ``model`` and ``optimizer`` (sharded or
    not, on any number of processes; every process calls it); returns the trainer state."""
    import torch.distributed
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    where = os.path.join(path, SHARDED)
    states = _state_dicts(model, optimizer)
    try:
        dcp.load(states, checkpoint_id=where, no_dist=not torch.distributed.is_initialized())
    except Exception as e:
        raise CheckpointError(f"{where}: cannot read the sharded adapters and optimizer state "
                              f"({type(e).__name__}: {str(e)[:500]}){_other_checkpoints(path)}") from None
    set_model_state_dict(model, states["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, states["optimizer"])
    return _read_trainer_state(path)


def weights_file(path: str) -> str:
    """The weights file of checkpoint directory ``path`` (its older name where that is what it holds)."""
    new = os.path.join(path, WEIGHTS)
    old = os.path.join(path, LEGACY_WEIGHTS)
    return old if not os.path.exists(new) and os.path.exists(old) else new


def resolve_resume(resume_from: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint directory that ``resume_from`` names (``"latest"``: the newest in output_dir)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise CheckpointError(f"--resume_from latest: no checkpoint in {checkpoints_dir(output_dir)} to resume "
                                  f"from; to start a new run there, drop --resume_from (and add "
                                  f"--overwrite_output_dir if output_dir holds an earlier run)")
        return path
    path = resume_from
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, TRAINER)):
        inner = latest_checkpoint(path) or (latest_checkpoint(os.path.dirname(path))
                                            if os.path.basename(path) == "checkpoints" else None)
        if inner is not None:
            return inner
    if not os.path.isfile(os.path.join(path, TRAINER)) or not (os.path.isfile(weights_file(path))
                                                               or is_sharded(path)):
        raise CheckpointError(f"--resume_from {path!r}: not a checkpoint directory "
                              f"(expected {WEIGHTS} or {SHARDED}/, and {TRAINER} in it)")
    return path


def load_checkpoint(path: str, model) -> dict:
    """Load the adapters into ``model`` and return the trainer state. A file that cannot be read is
    named in the error (which file of which checkpoint is damaged is what the user needs to know).
    ``model`` may instead be a function that takes the ``{name: tensor}`` weights (raising
    CheckpointError when they do not fit)."""
    from safetensors.torch import load_file

    adapters, trainer = weights_file(path), os.path.join(path, TRAINER)
    try:
        weights = load_file(adapters)
    except Exception as e:
        raise CheckpointError(f"{adapters}: cannot read the weights ({type(e).__name__}: {e})"
                              f"{_other_checkpoints(path)}") from None
    try:
        if isinstance(model, torch.nn.Module):
            load_adapter_state(model, weights)
        else:
            model(weights)
    except CheckpointError as e:
        raise CheckpointError(f"{adapters}: {e}") from None
    return _read_trainer_state(path)


def _read_trainer_state(path: str) -> dict:
    trainer = os.path.join(path, TRAINER)
    try:
        state = torch.load(trainer, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{trainer}: cannot read the training state ({type(e).__name__}: {e})"
                              f"{_other_checkpoints(path)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{trainer}: expected the training state (a dict), got {type(state).__name__}")
    return state


def _other_checkpoints(path: str) -> str:
    """'; other checkpoints to resume from: ...' for the directory holding checkpoint ``path``."""
    others = [p for p in list_checkpoints(os.path.dirname(os.path.dirname(os.path.abspath(path))))
              if os.path.abspath(p) != os.path.abspath(path)]
    return f"; other checkpoints to resume from: {', '.join(others)}" if others else ""
