"""Data: load records, format them as token ids with a loss mask, and batch them resumably.

Sources (``load_records``): a local ``.jsonl`` / ``.json`` file, a ``.parquet`` file (needs pyarrow or
pandas), a dataset saved with ``datasets.Dataset.save_to_disk`` (needs ``datasets``), or a hub dataset
name (needs ``datasets`` and a reachable hub). Nothing is downloaded unless a hub name is given.

Records (``tokenize_record``), the first of these fields that is present wins:

* ``messages``: ``[{"role": ..., "content": ...}, ...]`` (roles ``system``/``user``/``assistant``);
* ``conversations``: ``[{"from": "human"|"gpt"|"system", "value": ...}, ...]`` (OpenThoughts style);
* ``prompt`` and ``completion``: two strings, used as they are (no chat format);
* ``text``: one string, every token a target.

Chat records are rendered as the original transcoder-adapter code renders them: in the DeepSeek
(R1-Distill) format ``<｜begin▁of▁sentence｜><｜User｜>prompt<｜Assistant｜>response`` with nothing after
the response (``append_eos`` adds ``<｜end▁of▁sentence｜>``, as DeepSeek's chat template does), or in
ChatML (Qwen) with ``<|im_end|>\\n`` after each turn; a response starting ``"<think> "`` starts
``"<think>\\n"``; the whole text is tokenized at once. Loss positions: the loss at position ``t``
compares next-token distributions, so position ``t`` is scored when token ``t+1`` is a target: an
assistant token (its content and what closes its turn), or with ``loss_on_prompt`` any token.
Padding is never scored.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from training.tokenizer import FILE_NAME as CHAR_TOKENIZER_FILE, CharTokenizer


class DataError(ValueError):
    """A data file or record that cannot be used; raised before training starts."""


# --------------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------------
def load_tokenizer(path: str):
    """The character tokenizer when ``path`` holds one (the embedded tiny models), else the model's HF
    tokenizer."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CHAR_TOKENIZER_FILE)):
        file = os.path.join(path, CHAR_TOKENIZER_FILE)
        try:
            return CharTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as e:  # json errors are ValueErrors
            raise DataError(f"{file}: not a readable character tokenizer ({type(e).__name__}: {e})") from None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------------------------------
# chat formats: each turn is a list of (text, is_target) segments
# --------------------------------------------------------------------------------------------------
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system", "model": "assistant"}
CHAT_FORMATS = ("deepseek", "chatml")


def _normalise_messages(raw: Any, where: str) -> list[dict]:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DataError(f"{where}: the messages must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in _ROLE_ALIASES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {sorted(_ROLE_ALIASES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} has no text content")
        out.append({"role": _ROLE_ALIASES[role], "content": content})
    return out


def _think_newline(content: str) -> str:
    """OpenThoughts responses start ``"<think> "``; DeepSeek's format (and the original) expects
    ``"<think>\\n"``."""
    return "<think>\n" + content[len("<think> "):] if content.startswith("<think> ") else content


def chat_segments(messages: Sequence[dict], fmt: str, add_generation_prompt: bool = False,
                  append_eos: bool = False) -> list[tuple[str, bool]]:
    """Render ``messages`` as ``(text, is_target)`` segments in chat format ``fmt``. An assistant turn's
    target is its content and what closes it: ``<|im_end|>\\n`` in ChatML; in the DeepSeek format
    ``<｜end▁of▁sentence｜>``, except after the last message without ``append_eos`` (the original's
    rendering of a prompt and its response)."""
    segs: list[tuple[str, bool]] = []
    if fmt == "deepseek":
        segs.append(("<｜begin▁of▁sentence｜>", False))
        for j, m in enumerate(messages):
            if m["role"] == "system":
                segs.append((m["content"], False))
            elif m["role"] == "user":
                segs.append(("<｜User｜>" + m["content"], False))
            else:
                close = append_eos or j < len(messages) - 1  # a turn followed by more is always closed
                segs.append(("<｜Assistant｜>", False))
                segs.append((_think_newline(m["content"]) + ("<｜end▁of▁sentence｜>" if close else ""), True))
        if add_generation_prompt:
            segs.append(("<｜Assistant｜>", False))
    elif fmt == "chatml":
        for m in messages:
            if m["role"] == "assistant":
                segs.append(("<|im_start|>assistant\n", False))
                segs.append((_think_newline(m["content"]) + "<|im_end|>\n", True))
            else:
                segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
        if add_generation_prompt:
            segs.append(("<|im_start|>assistant\n", False))
    else:
        raise DataError(f"unknown chat format {fmt!r}; expected one of {list(CHAT_FORMATS)}")
    return segs


def encode_segments(tokenizer, segs: Sequence[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """``(ids, is_target)``: the whole text tokenized at once (as a chat template's text is), and each
    token's flag from the segment it falls in, the segment ends found by tokenizing each prefix."""
    ids = _encode(tokenizer, "".join(t for t, _ in segs))
    target: list[int] = []
    prefix = ""
    for i, (text, is_target) in enumerate(segs):
        prefix += text
        end = len(ids) if i == len(segs) - 1 else min(len(ids), len(_encode(tokenizer, prefix)))
        target += [int(is_target)] * max(0, end - len(target))
    return ids, target


def prompt_messages(record: dict, where: str = "record") -> list[dict]:
    """The messages of a chat record up to (not including) its last assistant turn."""
    msgs = _normalise_messages(record.get("messages", record.get("conversations")), where)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise DataError(f"{where}: no prompt before the assistant turn")
    return msgs


def prompt_ids(record: dict, fmt: str, tokenizer, where: str = "record") -> list[int]:
    """Token ids of a record's prompt, ending with the assistant header (for generation)."""
    if "prompt" in record and "messages" not in record and "conversations" not in record:
        return _encode(tokenizer, record["prompt"])
    segs = chat_segments(prompt_messages(record, where), fmt, add_generation_prompt=True)
    return _encode(tokenizer, "".join(t for t, _ in segs))


# --------------------------------------------------------------------------------------------------
# records -> (input_ids, loss_mask)
# --------------------------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # per position: 1 when the prediction made there is scored


def tokenize_record(record: Any, tokenizer, fmt: str, loss_on_prompt: bool, where: str = "record",
                    append_eos: bool = False) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    segs: list[tuple[str, bool]]
    if "messages" in record or "conversations" in record:
        msgs = _normalise_messages(record.get("messages", record.get("conversations")), where)
        segs = chat_segments(msgs, fmt, append_eos=append_eos)
    elif "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise DataError(f"{where}: `prompt` and `completion` must be strings")
        segs = [(record["prompt"], False), (record["completion"], True)]
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: `text` must be a string")
        segs = [(record["text"], True)]
    else:
        raise DataError(f"{where}: no `messages`, `conversations`, `prompt`+`completion` or `text` field "
                        f"(fields: {sorted(record)})")
    ids, target = encode_segments(tokenizer, segs)
    if loss_on_prompt:
        target = [1] * len(ids)
    # position t is scored when token t+1 is a target
    mask = target[1:] + [0]
    return Example(ids, mask)


def prepare_examples(records: Iterable[Any], tokenizer, fmt: str, loss_on_prompt: bool, max_seq_len: int,
                     truncation: str = "truncate", vocab_size: int | None = None,
                     name: str = "dataset", append_eos: bool = False) -> list[Example]:
    """Tokenize, truncate (keep the first ``max_seq_len`` tokens) or drop over-long records, and drop
    records with no scored position. Raises :class:`DataError` when nothing is left."""
    if truncation not in ("truncate", "drop"):
        raise DataError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    out, n, n_long, n_empty = [], 0, 0, 0
    for i, rec in enumerate(records):
        n += 1
        ex = tokenize_record(rec, tokenizer, fmt, loss_on_prompt, where=f"{name} record {i}", append_eos=append_eos)
        if len(ex.input_ids) > max_seq_len:
            n_long += 1
            if truncation == "drop":
                continue
            ex = Example(ex.input_ids[:max_seq_len], ex.loss_mask[:max_seq_len])
            ex.loss_mask[-1] = 0  # the last kept position has no next token in the sequence
        if vocab_size is not None and ex.input_ids and max(ex.input_ids) >= vocab_size:
            raise DataError(f"{name} record {i}: token id {max(ex.input_ids)} >= the model's vocabulary "
                            f"size {vocab_size}: is the tokenizer the model's?")
        if sum(ex.loss_mask) == 0:
            n_empty += 1
            continue
        out.append(ex)
    if not out:
        raise DataError(f"{name}: no usable examples ({n} records, {n_long} over max_seq_len={max_seq_len}, "
                        f"{n_empty} with nothing to score)")
    return out


# --------------------------------------------------------------------------------------------------
# loading records
# --------------------------------------------------------------------------------------------------
def _read_jsonl(path: str) -> list[Any]:
    records = []
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None
            if isinstance(data, list):
                return data
            lines = text.splitlines()
        else:
            lines = f
        for ln, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: not valid JSON ({e.msg})") from None
    return records


def _read_parquet(path: str) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    try:
        if pq is not None:
            return pq.read_table(path).to_pylist()
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow or pandas: pip install 'tckernels[train]'") from None
    except Exception as e:  # a damaged file: pyarrow's message does not name it
        raise DataError(f"{path}: cannot read it as parquet ({type(e).__name__}: {e})") from None


def _is_saved_dataset(path: str) -> bool:
    names = ("dataset_info.json", "state.json", "dataset_dict.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def load_records(path: str, split: str = "train") -> list[Any]:
    """Records of a local file, a saved HF dataset or (when ``datasets`` is installed) a hub dataset."""
    if not path:
        raise DataError("no dataset path given")
    if os.path.isfile(path):
        try:
            if path.endswith(".parquet"):
                return _read_parquet(path)
            if path.endswith((".jsonl", ".json")):
                return _read_jsonl(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        raise DataError(f"{path}: unknown data file type (expected .jsonl, .json or .parquet)")
    try:
        import datasets
    except ImportError:
        datasets = None
    if _is_saved_dataset(path):
        if datasets is None:
            raise DataError(f"{path}: a saved HF dataset needs the `datasets` package: pip install 'tckernels[train]'")
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"{path}: cannot load the saved HF dataset ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
        return list(ds)
    if os.path.exists(path):
        raise DataError(f"{path}: not a .jsonl/.json/.parquet file or a saved HF dataset directory")
    looks_like_hub = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if datasets is None or not looks_like_hub:
        raise DataError(f"{path}: no such file or directory" + (
            " (a hub dataset name needs the `datasets` package)" if looks_like_hub else ""))
    try:
        return list(datasets.load_dataset(path, split=split))
    except Exception as e:  # network, missing split, ...
        raise DataError(f"{path}: could not load the hub dataset split {split!r}: {e}") from None


# --------------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------------
def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. ``attention_mask`` marks real tokens; ``loss_mask`` the
    scored positions (never padding)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    loss = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attn[b, :n] = 1
        loss[b, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


class ResumableBatches:
    """Shuffled micro-batches for one rank, with a position that can be saved and restored.

    Each epoch is a permutation of the examples drawn from ``seed + epoch``. A global micro-step takes
    ``world_size * micro_batch_size`` examples from the permutation; rank ``r`` gets its slice. An
    epoch ends when fewer than a global micro-step remain (those are skipped), so every rank always
    gets the same number of micro-batches. The state is ``{"epoch", "offset"}``.
    """

    def __init__(self, examples: Sequence[Example], micro_batch_size: int, pad_token_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.examples = examples
        self.mb = micro_batch_size
        self.pad = pad_token_id
        self.seed, self.rank, self.world = seed, rank, world_size
        self.shuffle = shuffle
        self.global_mb = micro_batch_size * world_size
        if len(examples) < self.global_mb:
            raise DataError(f"the dataset has {len(examples)} examples, fewer than one global micro-batch "
                            f"(micro_batch_size {micro_batch_size} x {world_size} processes)")
        self.epoch, self.offset = 0, 0
        self._order = None

    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.examples) // self.global_mb

    def _perm(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                order = torch.randperm(len(self.examples), generator=g).tolist()
            else:
                order = list(range(len(self.examples)))
            self._order = (self.epoch, order)
        return self._order[1]

    def next(self) -> dict[str, torch.Tensor]:
        if self.offset + self.global_mb > len(self.examples):
            self.epoch, self.offset = self.epoch + 1, 0
        order = self._perm()
        start = self.offset + self.rank * self.mb
        idx = order[start:start + self.mb]
        self.offset += self.global_mb
        return collate([self.examples[i] for i in idx], self.pad)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = None


def iterate_batches(examples: Sequence[Example], batch_size: int, pad_token_id: int):
    """In-order batches (validation)."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_token_id)
