"""Activations to train transcoders on: text -> packed token sequences -> a causal LM's activations at
chosen layers -> a shuffling token buffer, with an optional on-disk cache of the activations.

    tokenizer = load_tokenizer(model_path)
    sequences = load_sequences("data.jsonl", tokenizer, context_length=1024)    # [n, 1024] token ids
    stream = ActivationStream(model, sequences, layers=[3, 7], cache_dir="acts", data_path="data.jsonl")
    buffer = ActivationBuffer(stream, buffer_tokens=2**19, batch_tokens=4096, seed=0)
    for batch in buffer:        # Activations(inputs [4096, 2, d_in], outputs [4096, 2, d_out], index [4096])
        ...
    state = buffer.state_dict()         # a fresh buffer's load_state_dict(state) continues exactly here

Five parts, each usable alone:

* **Tokens** (``record_text``, ``pack_sequences``, ``tokenize_records``, ``load_sequences``): records are
  read with ``training.data.load_records``; each becomes one document (``text_field``, else a chat record
  rendered as the adapter loop renders it, else ``prompt`` + ``completion``, else ``text``); documents are
  concatenated with EOS between them and cut into rows of ``context_length`` tokens, the incomplete tail
  dropped. No padding and no shuffling here: the order is the file's.
* **Hooks** (``capture_activations``): forward hooks on each chosen decoder layer read what its MLP reads
  (``mlp_in``) and writes (``mlp_out``), or the layer's own input/output (``resid_pre``/``resid_post``).
  A transcoder pairs ``mlp_in`` with ``mlp_out``; an SAE uses one point for both (``outputs`` is then None:
  the target is the input). The forward runs under ``torch.no_grad`` and stops after the last hook needed.
* **Stream** (``ActivationStream``): the activations of the sequences, a few sequences per forward, in a
  seeded order per epoch, as rows of ``[tokens, layers, d]``; every row carries its place in the token
  stream, so any row can be made again (``rows_at``), which is how a buffer is rebuilt on resume.
* **Buffer** (``ActivationBuffer``): ``buffer_tokens`` rows, yielded in shuffled batches of
  ``batch_tokens``; when half of it has been served, the served half is refilled from the stream and the
  whole is reshuffled, so new rows mix with old ones. Every row that enters is served exactly once.
* **Cache** (``ActivationCache``, ``cache_dir=``): the stream writes each sequence's activations to sharded
  ``.npy`` files as it makes them and reads them back (memory-mapped) instead of running the model. A
  ``metadata.json`` says what made them; opening it for another model, layers, hook points, dtype,
  context length or data is a ValueError naming the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from training.data import DataError, _normalise_messages, chat_segments, load_records

HOOK_POINTS = ("resid_pre", "mlp_in", "mlp_out", "resid_post")  # in the order a layer's forward meets them


# --------------------------------------------------------------------------------------------------
# text -> packed token sequences
# --------------------------------------------------------------------------------------------------
def record_text(record: Any, text_field: str = "text", chat_format: str = "deepseek", append_eos: bool = False,
                where: str = "record") -> str:
    """The document of one record: its ``text_field`` when that is a string; else a chat record
    (``messages`` / ``conversations``) rendered in ``chat_format`` as the adapter loop renders it; else
    ``prompt`` + ``completion``; else ``text``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    value = record.get(text_field)
    if isinstance(value, str):
        return value
    if value is not None:
        raise DataError(f"{where}: `{text_field}` must be a string, got {type(value).__name__}")
    if "messages" in record or "conversations" in record:
        msgs = _normalise_messages(record.get("messages", record.get("conversations")), where)
        return "".join(text for text, _ in chat_segments(msgs, chat_format, append_eos=append_eos))
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return record["prompt"] + record["completion"]
    if isinstance(record.get("text"), str):
        return record["text"]
    wanted = dict.fromkeys([f"`{text_field}`", "`messages`", "`conversations`", "`prompt`+`completion`", "`text`"])
    raise DataError(f"{where}: none of the fields {', '.join(wanted)} (fields: {sorted(record)})")


def pack_sequences(documents: Iterable[Sequence[int]], context_length: int, eos_token_id: int,
                   max_sequences: Optional[int] = None, name: str = "dataset") -> Tensor:
    """``[n, context_length]`` int64: the documents' tokens concatenated with ``eos_token_id`` between
    consecutive documents, cut into rows; the incomplete tail is dropped (as is everything past
    ``max_sequences`` rows). Empty documents are skipped. Raises :class:`DataError` when not one row fills."""
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive int, got {context_length!r}")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be positive or None, got {max_sequences!r}")
    limit = None if max_sequences is None else max_sequences * context_length
    pieces: list[Tensor] = []
    total = n_docs = 0
    for doc in documents:
        if limit is not None and total >= limit:
            break  # enough rows: the rest would be dropped anyway
        if len(doc) == 0:
            continue
        if n_docs:
            pieces.append(torch.tensor([eos_token_id], dtype=torch.long))
            total += 1
        pieces.append(torch.as_tensor(list(doc), dtype=torch.long))
        total += len(doc)
        n_docs += 1
    n = total // context_length
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise DataError(f"{name}: {total} tokens in {n_docs} non-empty documents, fewer than one sequence of "
                        f"context_length={context_length}")
    return torch.cat(pieces)[: n * context_length].view(n, context_length)


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    if callable(tokenizer):  # an HF tokenizer: one batched call is much faster than one per text
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def tokenize_records(records: Iterable[Any], tokenizer, context_length: int, text_field: str = "text",
                     chat_format: str = "deepseek", append_eos: bool = False, max_sequences: Optional[int] = None,
                     name: str = "dataset") -> Tensor:
    """Records -> documents (:func:`record_text`) -> token ids (no special tokens added) -> packed rows
    (:func:`pack_sequences`, EOS from the tokenizer)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"{name}: the tokenizer has no EOS token to separate documents with")

    def documents():
        batch: list[str] = []
        for i, rec in enumerate(records):
            batch.append(record_text(rec, text_field, chat_format, append_eos, where=f"{name} record {i}"))
            if len(batch) == 1000:
                yield from _encode_all(tokenizer, batch)
                batch = []
        yield from _encode_all(tokenizer, batch)

    return pack_sequences(documents(), context_length, eos, max_sequences, name)


def load_sequences(path: str, tokenizer, context_length: int, split: str = "train", text_field: str = "text",
                   chat_format: str = "deepseek", append_eos: bool = False,
                   max_sequences: Optional[int] = None) -> Tensor:
    """The packed ``[n, context_length]`` token rows of a data file or dataset (``training.data.load_records``)."""
    records = load_records(path, split)
    if not records:
        raise DataError(f"{path}: no records")
    return tokenize_records(records, tokenizer, context_length, text_field, chat_format, append_eos, max_sequences,
                            name=path)


def dataset_identity(path: str) -> dict:
    """What identifies a dataset on disk for the cache's metadata: its path, size and modification time."""
    if os.path.isfile(path):
        st = os.stat(path)
        return {"path": os.path.realpath(path), "bytes": st.st_size, "mtime": st.st_mtime}
    if os.path.isdir(path):  # a saved HF dataset: every file under it
        sizes, mtimes = 0, 0.0
        for root, _, files in os.walk(path):
            for f in files:
                st = os.stat(os.path.join(root, f))
                sizes, mtimes = sizes + st.st_size, max(mtimes, st.st_mtime)
        return {"path": os.path.realpath(path), "bytes": sizes, "mtime": mtimes}
    return {"path": path}  # a hub name


# --------------------------------------------------------------------------------------------------
# hooks: a layer's MLP input and output
# --------------------------------------------------------------------------------------------------
class Activations(NamedTuple):
    """Rows of activations, one per token."""

    inputs: Tensor  # [n, layers, d_in]
    outputs: Optional[Tensor]  # [n, layers, d_out]; None when input and output are one hook point (SAE)
    index: Tensor  # [n] int64: each row's place in the token stream, stream_sequence * context_length + position

    @property
    def targets(self) -> Tensor:
        """What a transcoder predicts: the outputs, or the inputs themselves in SAE mode."""
        return self.inputs if self.outputs is None else self.outputs

    @property
    def n(self) -> int:
        return self.inputs.shape[0]


class _StopForward(Exception):
    """Raised by the last hook needed: the rest of the forward would be wasted."""


def first_tensor(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a decoder layer or MLP is called with (positional, or ``hidden_states=``)."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"]
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Tensor):
            return v
    raise RuntimeError("a hooked module was called without a tensor argument")


def with_first_tensor(args: tuple, kwargs: dict, x: Tensor) -> tuple:
    """``(args, kwargs)`` of a module call with the hidden states :func:`first_tensor` reads replaced by ``x``."""
    if args and isinstance(args[0], Tensor):
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class _Hooks:
    """Where to hook a model, checked once: decoder layers, layer indices and hook points."""

    def __init__(self, model: nn.Module, layers, input_hook: str, output_hook: str):
        for what, point in (("input_hook", input_hook), ("output_hook", output_hook)):
            if point not in HOOK_POINTS:
                raise ValueError(f"{what} {point!r}: unknown hook point; expected one of {list(HOOK_POINTS)}")
        from tckernels.models import find_decoder_layers

        try:
            self.decoder = find_decoder_layers(model)
        except ValueError as e:
            raise ValueError(f"cannot hook {type(model).__name__}'s MLPs: {e} (supported: decoders whose layers "
                             f"have an .mlp module, e.g. Qwen2, Llama, GPT-NeoX)") from None
        n = len(self.decoder)
        if layers is None:
            layers = list(range(n))
        elif isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("layers: no layer chosen")
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"layers must be int layer indices, got {i!r}")
            if not 0 <= i < n:
                raise ValueError(f"layers: no layer {i}; {type(model).__name__} has layers 0..{n - 1}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers: {layers} names a layer twice")
        self.layers = layers
        self.points = (input_hook,) if input_hook == output_hook else (input_hook, output_hook)
        # the hook that fires last in the forward; the layers above it are not needed
        self.last = (max(layers), max(self.points, key=HOOK_POINTS.index))

    def run(self, model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], dtype: torch.dtype,
            stop_early: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        seen: dict[tuple[int, str], Tensor] = {}
        last = self.last if stop_early else None

        def keep(key, x):
            seen[key] = x.detach()
            if key == last:
                raise _StopForward

        handles = []
        try:
            for i in self.layers:
                layer = self.decoder[i]
                for point in self.points:
                    module = layer if point.startswith("resid") else layer.mlp
                    key = (i, point)
                    if point in ("resid_pre", "mlp_in"):  # what the module reads: its first argument
                        h = module.register_forward_pre_hook(
                            lambda m, args, kwargs, key=key: keep(key, first_tensor(args, kwargs)), with_kwargs=True)
                    else:  # what it writes: its output (the first element of a tuple)
                        h = module.register_forward_hook(
                            lambda m, args, out, key=key: keep(key, out[0] if isinstance(out, (tuple, list)) else out))
                    handles.append(h)
            with torch.no_grad():
                try:
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        missing = [k for k in ((i, p) for i in self.layers for p in self.points) if k not in seen]
        if missing:
            raise RuntimeError(f"{type(model).__name__}: the forward never reached the hooks at (layer, point) "
                               f"{missing}")

        def rows(point):
            x = torch.stack([seen[(i, point)] for i in self.layers], dim=-2)  # [B, T, layers, d]
            x = x.reshape(-1, *x.shape[-2:]) if attention_mask is None else x[attention_mask.bool()]
            return x.to(dtype)

        return rows(self.points[0]), (rows(self.points[1]) if len(self.points) == 2 else None)


def capture_activations(model: nn.Module, input_ids: Tensor, layers=None, input_hook: str = "mlp_in",
                        output_hook: str = "mlp_out", attention_mask: Optional[Tensor] = None,
                        stop_early: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``(inputs [n, layers, d_in], outputs [n, layers, d_out] or None)`` at ``layers`` (None: all) for the
    real tokens of ``input_ids`` (``attention_mask`` 0 marks padding, which is left out), row-major over
    (sequence, position), in the model's dtype. ``outputs`` is None when both hooks are one point."""
    hooks = _Hooks(model, layers, input_hook, output_hook)
    device = _model_device(model)
    mask = None if attention_mask is None else attention_mask.to(device)
    return hooks.run(model, input_ids.to(device), mask, _model_dtype(model), stop_early)


# --------------------------------------------------------------------------------------------------
# the cache: sharded .npy files of one epoch's activations, indexed by sequence
# --------------------------------------------------------------------------------------------------
# Compared on reuse, in this order; the first that differs is named (the dtype before the weights: a model
# cast to another dtype has other weights too). The layout fields (d_in, shards) follow from these.
IDENTITY_FIELDS = ("format", "model", "model_config", "dtype", "model_weights", "layers", "input_hook",
                   "output_hook", "context_length", "dataset", "n_tokens")
_FORMAT = 1
# numpy has no bfloat16: its bytes are kept as int16 and viewed back
_STORAGE = {"float32": "float32", "float16": "float16", "bfloat16": "int16", "float64": "float64"}


def _config_hash(config) -> str:
    if config is None:
        return ""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash",
              "_attn_implementation", "_attn_implementation_autoset"):
        d.pop(k, None)  # where it was loaded from, and how: not what it computes
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weights_fingerprint(model: nn.Module, per_tensor: int = 64) -> str:
    """A hash of an evenly spaced sample of every parameter: tells a fine-tune from its base, which share
    a config, without reading every weight."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].float().cpu()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _tokens_hash(sequences: Tensor) -> str:
    return hashlib.sha256(sequences.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


class ActivationCache:
    """One epoch of a stream's activations on disk, written as they are made and memory-mapped on reuse.

    ``directory`` holds ``metadata.json``, ``written.npy`` (one byte per sequence: its rows are on disk)
    and shards ``inputs-00000.npy`` (``outputs-00000.npy`` too unless SAE mode) of ``[rows, layers, d]``,
    each row of sequence ``i`` (in the data's order) at ``i * context_length + position`` of the whole.
    The files are made on the first write, when the activations' widths are known. Opening a directory
    whose metadata differs in an identity field raises a ValueError naming it.
    """

    METADATA = "metadata.json"

    def __init__(self, directory: str, metadata: dict, shard_tokens: int = 2**20):
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            raise ImportError("the activation cache needs numpy: pip install numpy") from None
        self._np = np
        self.directory = directory
        self.meta = dict(metadata)
        self.meta.setdefault("shard_sequences", max(1, shard_tokens // metadata["context_length"]))
        self._written = None
        self._shards: list[tuple[Any, Any]] = []
        if os.path.isfile(os.path.join(directory, self.METADATA)):
            self._load_existing()

    # ---- identity ------------------------------------------------------------------------------------
    def _check(self, stored: dict, wanted: dict) -> None:
        def key(field, d):
            v = d.get(field)
            return v.get("tokens_sha256") if field == "dataset" and isinstance(v, dict) else v

        for field in IDENTITY_FIELDS:
            if key(field, stored) != key(field, wanted):
                raise ValueError(f"activation cache {self.directory} was made with a different {field}: "
                                 f"cache {stored.get(field)!r}, this run {wanted.get(field)!r} (give another "
                                 f"cache_dir, or delete this one)")

    # ---- files ---------------------------------------------------------------------------------------
    def _shard_rows(self, k: int) -> int:
        sps, n = self.meta["shard_sequences"], self.meta["n_sequences"]
        return (min(sps, n - k * sps)) * self.meta["context_length"]

    def _file(self, kind: str, k: int) -> str:
        return os.path.join(self.directory, f"{kind}-{k:05d}.npy")

    @property
    def _kinds(self) -> tuple[str, ...]:
        return ("inputs",) if self.meta["d_out"] is None else ("inputs", "outputs")

    def _create(self, d_in: int, d_out: Optional[int]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        # Several processes (ranks) may reach their first write together: one makes the files, the
        # others wait for its metadata, since a second open_memmap(mode="w+") would truncate them.
        lock = os.path.join(self.directory, "creating.lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            self._wait_for_metadata(lock)
            return
        try:
            if os.path.isfile(os.path.join(self.directory, self.METADATA)):
                self._load_existing()  # another process made it after this one looked
            else:
                self._create_files(d_in, d_out)
        finally:
            os.close(fd)
            os.remove(lock)

    def _wait_for_metadata(self, lock: str, timeout_s: float = 600.0) -> None:
        path = os.path.join(self.directory, self.METADATA)
        deadline = time.monotonic() + timeout_s
        while not os.path.isfile(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"activation cache {self.directory}: waited {timeout_s:.0f} s for another process "
                                   f"to create it; remove {lock} if none is")
            time.sleep(0.2)
        self._load_existing()

    def _load_existing(self) -> None:
        with open(os.path.join(self.directory, self.METADATA), encoding="utf-8") as f:
            stored = json.load(f)
        self._check(stored, self.meta)
        self.meta = stored
        self._open()

    def _create_files(self, d_in: int, d_out: Optional[int]) -> None:
        np = self._np
        self.meta.update(d_in=d_in, d_out=d_out, storage=_STORAGE[self.meta["dtype"]])
        n_shards = math.ceil(self.meta["n_sequences"] / self.meta["shard_sequences"])
        self.meta["n_shards"] = n_shards
        L = len(self.meta["layers"])
        for k in range(n_shards):
            for kind in self._kinds:
                d = d_in if kind == "inputs" else d_out
                np.lib.format.open_memmap(self._file(kind, k), mode="w+", dtype=self.meta["storage"],
                                          shape=(self._shard_rows(k), L, d)).flush()
        np.lib.format.open_memmap(os.path.join(self.directory, "written.npy"), mode="w+", dtype=np.uint8,
                                  shape=(self.meta["n_sequences"],)).flush()
        # the metadata last (atomically): its presence means every file is there
        tmp = os.path.join(self.directory, self.METADATA + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.meta, f, indent=1)
        os.replace(tmp, os.path.join(self.directory, self.METADATA))
        self._open()

    def _open(self) -> None:
        np = self._np
        try:
            self._written = np.load(os.path.join(self.directory, "written.npy"), mmap_mode="r+")
            mode = "r" if bool(self._written.all()) else "r+"  # a complete cache is only read
            self._shards = [tuple(np.load(self._file(kind, k), mmap_mode=mode) for kind in self._kinds)
                            for k in range(self.meta["n_shards"])]
        except (OSError, ValueError) as e:
            raise ValueError(f"activation cache {self.directory} is damaged ({type(e).__name__}: {e}); "
                             f"delete it to start a new one") from None

    # ---- rows ----------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._written is not None and bool(self._written.all())

    def has(self, sequence_ids: Tensor) -> bool:
        return self._written is not None and bool(self._written[sequence_ids.numpy()].all())

    def _slices(self, i: int):
        T, sps = self.meta["context_length"], self.meta["shard_sequences"]
        k, local = divmod(int(i), sps)
        return self._shards[k], slice(local * T, (local + 1) * T)

    def read(self, sequence_ids: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The rows of these sequences, in this order, as CPU tensors in the cache's dtype."""
        dtype = getattr(torch, self.meta["dtype"])
        per_kind: list[list] = [[] for _ in self._kinds]
        for i in sequence_ids.tolist():
            arrays, sl = self._slices(i)
            for j, a in enumerate(arrays):
                per_kind[j].append(a[sl])
        out = [torch.from_numpy(self._np.concatenate(parts)).view(dtype) for parts in per_kind]
        return out[0], (out[1] if len(out) == 2 else None)

    def write(self, sequence_ids: Tensor, inputs: Tensor, outputs: Optional[Tensor]) -> None:
        """Store the rows of these sequences (``len(sequence_ids) * context_length`` rows, in order)."""
        if self._written is None:
            self._create(inputs.shape[-1], None if outputs is None else outputs.shape[-1])
        T = self.meta["context_length"]
        tensors = [inputs] if outputs is None else [inputs, outputs]
        host = [t.detach().cpu().contiguous() for t in tensors]
        host = [(t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy() for t in host]
        for r, i in enumerate(sequence_ids.tolist()):
            arrays, sl = self._slices(i)
            for a, h in zip(arrays, host):
                a[sl] = h[r * T:(r + 1) * T]
        self._written[sequence_ids.numpy()] = 1  # after the rows: a crash in between only costs a recompute

    def flush(self) -> None:
        if self._written is None:
            return
        for arrays in self._shards:
            for a in arrays:
                if a.mode != "r":
                    a.flush()
        self._written.flush()


# --------------------------------------------------------------------------------------------------
# the stream: a model's activations over the sequences, epoch after epoch
# --------------------------------------------------------------------------------------------------
class ActivationStream:
    """Rows of activations of ``model`` over ``sequences`` ([n, context_length] token ids, no padding).

    The token stream is epoch after epoch of the sequences, each epoch in the order of a permutation
    drawn from ``seed + epoch`` (the data's order with ``shuffle=False``); ``epochs=None`` never ends.
    Stream sequence ``s`` goes to the model in forward ``s // forward_batch_size``; with ``world_size`` > 1
    process ``rank`` runs forwards ``rank, rank + world_size, ...`` only, so the processes share the stream
    without overlap. A row's ``index`` is ``s * context_length + position``. Recomputing a forward runs the
    same sequences together, so it gives the same values (``rows_at``).

    ``take`` hands out the rows in stream order; ``state_dict`` is the position (the forward and the rows
    of it already taken). With ``cache_dir`` every sequence's rows are written to an
    :class:`ActivationCache` when first made and read from it afterwards, in this run or a later one:
    a forward whose sequences are all on disk does not run the model. ``forwards`` counts those that did;
    ``seconds`` is the host time spent making rows (model forwards, cache reads and writes), for
    telling how much of a training step goes to the activations. It is not part of ``state_dict``.

    The model is put in eval mode (no dropout); its parameters are not touched otherwise.
    """

    def __init__(self, model: nn.Module, sequences: Tensor, layers=None, input_hook: str = "mlp_in",
                 output_hook: str = "mlp_out", *, forward_batch_size: int = 8, epochs: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 cache_dir: Optional[str] = None, data_path: Optional[str] = None, shard_tokens: int = 2**20,
                 stop_early: bool = True):
        if not isinstance(sequences, Tensor) or sequences.dim() != 2 or sequences.is_floating_point():
            raise ValueError("sequences must be a 2-D tensor of token ids [n, context_length]")
        if sequences.shape[0] == 0 or sequences.shape[1] == 0:
            raise ValueError(f"sequences is empty (shape {tuple(sequences.shape)}): no tokens to run the model on")
        for what, v, low in (("forward_batch_size", forward_batch_size, 1), ("world_size", world_size, 1),
                             ("shard_tokens", shard_tokens, 1)):
            if not isinstance(v, int) or v < low:
                raise ValueError(f"{what} must be an int >= {low}, got {v!r}")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be a positive int or None (endless), got {epochs!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        low, high = int(sequences.min()), int(sequences.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise ValueError(f"token ids span {low}..{high}, outside the model's vocabulary of {vocab} tokens: "
                             f"is the tokenizer the model's?")
        self._hooks = _Hooks(model, layers, input_hook, output_hook)
        self.model = model.eval()
        self.sequences = sequences.to(torch.long).cpu()
        self.layers = self._hooks.layers
        self.input_hook, self.output_hook = input_hook, output_hook
        self.context_length = self.sequences.shape[1]
        self.n_sequences = self.sequences.shape[0]
        self.forward_batch_size, self.epochs, self.shuffle, self.seed = forward_batch_size, epochs, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.stop_early = stop_early
        self.dtype = _model_dtype(model)
        self.device = _model_device(model)
        self.forwards = 0
        self.seconds = 0.0
        self._perms: dict[int, Tensor] = {}
        self._widths: Optional[tuple[int, Optional[int]]] = None
        self.cache = None
        if cache_dir is not None:
            self.cache = ActivationCache(cache_dir, self._metadata(data_path), shard_tokens)
            if self.cache.meta.get("d_in") is not None:
                self._widths = (self.cache.meta["d_in"], self.cache.meta["d_out"])
        # position: forward number `_step` of this process, of which `_offset` rows are taken
        self._step, self._offset, self._rows = 0, 0, None
        self.tokens_read = 0

    # ---- identity of the activations, for the cache ------------------------------------------------
    def _metadata(self, data_path: Optional[str]) -> dict:
        config = getattr(self.model, "config", None)
        name = getattr(config, "_name_or_path", "") or type(self.model).__name__
        if os.path.isdir(name):
            name = os.path.realpath(name)
        dataset = {"tokens_sha256": _tokens_hash(self.sequences)}
        if data_path is not None:
            dataset.update(dataset_identity(data_path))
        return {"format": _FORMAT, "model": name, "model_config": _config_hash(config),
                "model_weights": _weights_fingerprint(self.model), "layers": list(self.layers),
                "input_hook": self.input_hook, "output_hook": self.output_hook,
                "dtype": str(self.dtype).replace("torch.", ""), "context_length": self.context_length,
                "dataset": dataset, "n_sequences": self.n_sequences,
                "n_tokens": self.n_sequences * self.context_length}

    # ---- shapes --------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def _probe_widths(self) -> tuple[int, Optional[int]]:
        if self._widths is None:  # one token through the model
            t0 = time.perf_counter()
            x, y = self._hooks.run(self.model, self.sequences[:1, :1].to(self.device), None, self.dtype,
                                   self.stop_early)
            self.seconds += time.perf_counter() - t0
            self.forwards += 1
            self._widths = (x.shape[-1], None if y is None else y.shape[-1])
        return self._widths

    @property
    def d_in(self) -> int:
        return self._probe_widths()[0]

    @property
    def d_out(self) -> int:
        """The output width (the input's in SAE mode)."""
        d_in, d_out = self._probe_widths()
        return d_in if d_out is None else d_out

    @property
    def tokens_per_epoch(self) -> int:
        return self.n_sequences * self.context_length

    # ---- which sequences a forward runs -------------------------------------------------------------
    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # keep the current and the previous epoch's
                self._perms.pop(min(self._perms))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perms[epoch] = torch.randperm(self.n_sequences, generator=g)
            else:
                self._perms[epoch] = torch.arange(self.n_sequences)
        return self._perms[epoch]

    def _sequence_ids(self, start: int, stop: int) -> Tensor:
        """The data indices of stream sequences ``start..stop-1``."""
        return torch.stack([self._perm(s // self.n_sequences)[s % self.n_sequences] for s in range(start, stop)])

    def _forward_rows(self, f: int) -> Optional[Activations]:
        """The rows of global forward ``f`` (None past the end of the stream)."""
        start = f * self.forward_batch_size
        end = math.inf if self.epochs is None else self.epochs * self.n_sequences
        if start >= end:
            return None
        stop = int(min(start + self.forward_batch_size, end))
        ids = self._sequence_ids(start, stop)
        t0 = time.perf_counter()
        if self.cache is not None and self.cache.has(ids):
            inputs, outputs = self.cache.read(ids)  # rows on the model's device, as the model makes them
            inputs = inputs.to(self.device)
            outputs = None if outputs is None else outputs.to(self.device)
        else:
            inputs, outputs = self._hooks.run(self.model, self.sequences[ids].to(self.device), None, self.dtype,
                                              self.stop_early)
            self.forwards += 1
            self._widths = (inputs.shape[-1], None if outputs is None else outputs.shape[-1])
            if self.cache is not None:
                self.cache.write(ids, inputs, outputs)
        self.seconds += time.perf_counter() - t0
        T = self.context_length
        return Activations(inputs, outputs, torch.arange(start * T, stop * T))

    # ---- the source interface of ActivationBuffer ---------------------------------------------------
    def take(self, n: int) -> Optional[Activations]:
        """The next 1..n rows of this process's stream (fewer at the end of a forward), or None at its end."""
        if self._rows is None:
            self._rows = self._forward_rows(self._step * self.world_size + self.rank)
            if self._rows is None:
                return None
        a, b = self._offset, min(self._offset + n, self._rows.n)
        r = self._rows
        piece = Activations(r.inputs[a:b], None if r.outputs is None else r.outputs[a:b], r.index[a:b])
        self._offset = b
        if b == r.n:
            self._step, self._offset, self._rows = self._step + 1, 0, None
        self.tokens_read += piece.n
        return piece

    def rows_at(self, index: Tensor) -> Activations:
        """The rows at these stream indices (``Activations.index``), in this order: read from the cache or
        made again by the forwards that made them."""
        index = index.to(torch.long).cpu()
        T, bs = self.context_length, self.forward_batch_size
        forward_of = index // T // bs
        inputs = outputs = None
        for f in torch.unique(forward_of).tolist():
            rows = self._forward_rows(f)
            if rows is None:
                raise ValueError(f"stream index {int(index[forward_of == f][0])} is past the end of the stream")
            where = (forward_of == f).nonzero().squeeze(1)
            local = index[where] - f * bs * T
            if inputs is None:
                inputs = rows.inputs.new_empty((len(index), *rows.inputs.shape[1:]))
                if rows.outputs is not None:
                    outputs = rows.outputs.new_empty((len(index), *rows.outputs.shape[1:]))
            w = where.to(inputs.device)
            inputs[w] = rows.inputs[local.to(rows.inputs.device)]
            if outputs is not None:
                outputs[w] = rows.outputs[local.to(rows.outputs.device)]
        if inputs is None:
            raise ValueError("rows_at: no indices given")
        return Activations(inputs, outputs, index)

    def _settings(self) -> dict:
        return {"n_sequences": self.n_sequences, "context_length": self.context_length, "layers": list(self.layers),
                "input_hook": self.input_hook, "output_hook": self.output_hook,
                "forward_batch_size": self.forward_batch_size, "epochs": self.epochs, "shuffle": self.shuffle,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def state_dict(self) -> dict:
        if self.cache is not None:
            self.cache.flush()  # a checkpoint's position never runs ahead of the rows on disk
        return {"step": self._step, "offset": self._offset, "tokens_read": self.tokens_read,
                "settings": self._settings()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._settings()
        for k, v in state["settings"].items():
            if mine.get(k) != v:
                raise ValueError(f"cannot resume this activation stream: {k} was {v!r}, now {mine.get(k)!r}")
        self._step, self._offset, self._rows = int(state["step"]), int(state["offset"]), None
        self.tokens_read = int(state["tokens_read"])


# --------------------------------------------------------------------------------------------------
# the shuffling buffer
# --------------------------------------------------------------------------------------------------
class ActivationBuffer:
    """Shuffled batches of ``batch_tokens`` rows from a buffer of ``buffer_tokens`` rows.

    ``source`` has ``take(n)`` (1..n rows as :class:`Activations`, None at its end), ``rows_at(index)``
    (the rows at those stream indices again), ``state_dict()`` and ``load_state_dict()``, as
    :class:`ActivationStream` has. The buffer is filled, shuffled, and served from; once half of it has
    been served (at most half remains), the served slots are refilled from the source and all unserved
    rows are shuffled together. Each row that enters is served exactly once; when the source ends, the
    rest is served, the last batch possibly shorter, then iteration stops. The shuffles draw from a
    ``torch.Generator`` seeded with ``seed``.

    ``state_dict()`` holds the generator, the source's position and the unserved rows' stream indices
    (their values too with ``include_contents=True``); ``load_state_dict`` on a fresh buffer over an equal
    source reads the rows back from the state or has the source make them again (``rows_at``), and then
    yields exactly the batches the saved buffer would have. Rows live on ``device`` (default: where the
    source's rows are).
    """

    def __init__(self, source, buffer_tokens: int, batch_tokens: int, seed: int = 0,
                 device: Optional[torch.device | str] = None):
        if not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        if not isinstance(buffer_tokens, int) or buffer_tokens < 2 * batch_tokens:
            raise ValueError(f"buffer_tokens ({buffer_tokens!r}) must be at least 2 x batch_tokens ({batch_tokens}): "
                             f"the buffer refills when half empty and serves a whole batch from the other half")
        self.source = source
        self.capacity, self.batch_tokens = buffer_tokens, batch_tokens
        self.device = None if device is None else torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self._inputs: Optional[Tensor] = None
        self._outputs: Optional[Tensor] = None
        self._index = torch.zeros(buffer_tokens, dtype=torch.long)  # each slot's stream index
        self._order = torch.zeros(0, dtype=torch.long)  # slots in serving order; [_pos:] are unserved
        self._pos = 0
        self._exhausted = False
        self.tokens_served = 0

    @property
    def remaining(self) -> int:
        """Rows in the buffer not yet served."""
        return len(self._order) - self._pos

    def _store(self, slots: Tensor, rows: Activations) -> None:
        if self._inputs is None:  # the first rows give the shapes
            device = self.device or rows.inputs.device
            self._inputs = rows.inputs.new_empty((self.capacity, *rows.inputs.shape[1:]), device=device)
            if rows.outputs is not None:
                self._outputs = rows.outputs.new_empty((self.capacity, *rows.outputs.shape[1:]), device=device)
        s = slots.to(self._inputs.device)
        self._inputs[s] = rows.inputs.to(self._inputs.device)
        if self._outputs is not None:
            self._outputs[s] = rows.outputs.to(self._outputs.device)
        self._index[slots] = rows.index.cpu()

    def _refill(self) -> None:
        unserved = self._order[self._pos:]
        free = torch.ones(self.capacity, dtype=torch.bool)
        free[unserved] = False
        slots = free.nonzero().squeeze(1)
        filled = 0
        while filled < len(slots):
            rows = self.source.take(len(slots) - filled)
            if rows is None:
                self._exhausted = True
                break
            self._store(slots[filled:filled + rows.n], rows)
            filled += rows.n
        pool = torch.cat([unserved, slots[:filled]])
        self._order = pool[torch.randperm(len(pool), generator=self.generator)]
        self._pos = 0

    def next_batch(self) -> Activations:
        if not self._exhausted and self.remaining <= self.capacity // 2:
            self._refill()
        if self.remaining == 0:
            raise StopIteration
        take = self._order[self._pos:self._pos + self.batch_tokens]
        self._pos += len(take)
        self.tokens_served += len(take)
        t = take.to(self._inputs.device)
        return Activations(self._inputs[t], None if self._outputs is None else self._outputs[t], self._index[take])

    def __iter__(self):
        return self

    def __next__(self) -> Activations:
        return self.next_batch()

    def state_dict(self, include_contents: bool = False) -> dict:
        unserved = self._order[self._pos:].clone()
        state = {"buffer_tokens": self.capacity, "batch_tokens": self.batch_tokens,
                 "generator": self.generator.get_state(), "slots": unserved, "index": self._index[unserved].clone(),
                 "exhausted": self._exhausted, "tokens_served": self.tokens_served,
                 "source": self.source.state_dict()}
        if include_contents and len(unserved):
            s = unserved.to(self._inputs.device)
            state["inputs"] = self._inputs[s].cpu()
            state["outputs"] = None if self._outputs is None else self._outputs[s].cpu()
        return state

    def load_state_dict(self, state: dict) -> None:
        for k in ("buffer_tokens", "batch_tokens"):
            if state[k] != getattr(self, "capacity" if k == "buffer_tokens" else k):
                raise ValueError(f"cannot resume this activation buffer: {k} was {state[k]}, now "
                                 f"{self.capacity if k == 'buffer_tokens' else self.batch_tokens}")
        self.generator.set_state(state["generator"])
        self.source.load_state_dict(state["source"])
        slots, index = state["slots"], state["index"]
        if len(slots):
            if "inputs" in state:
                rows = Activations(state["inputs"], state["outputs"], index)
            else:
                rows = self.source.rows_at(index)
            self._store(slots, rows)
        self._order, self._pos = slots.clone(), 0
        self._exhausted = bool(state["exhausted"])
        self.tokens_served = int(state["tokens_served"])


__all__ = [
    "HOOK_POINTS", "IDENTITY_FIELDS", "Activations", "ActivationBuffer", "ActivationCache", "ActivationStream",
    "capture_activations", "dataset_identity", "load_sequences", "pack_sequences", "record_text",
    "tokenize_records",
]
