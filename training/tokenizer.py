"""A character-level tokenizer for the embedded tiny models.

One token per character (newline and printable ASCII), plus whole-string special tokens for the
DeepSeek and ChatML chat formats and, optionally, whole-word tokens (``words``: ordinary text that
is one token, as a BPE vocabulary has a token for a common word such as "Wait"). It offers the small
part of the Hugging Face tokenizer interface that the training loop uses (``encode``, ``decode``, ``convert_tokens_to_ids``, the special token
ids, ``save_pretrained`` / ``from_pretrained``), so the loop treats it and an HF tokenizer alike.
Real models keep their own HF tokenizer; see :func:`training.data.load_tokenizer`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable

FILE_NAME = "char_tokenizer.json"

ENDOFTEXT = "<|endoftext|>"
UNK = "<unk>"
SPECIAL_TOKENS = [
    ENDOFTEXT,
    UNK,
    "<|im_start|>",
    "<|im_end|>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
]
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]


def _whole_strings(strings) -> "re.Pattern":
    """A splitting pattern that captures any of ``strings``, longest first (so none is cut by a
    shorter one that is its prefix)."""
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True)) + ")")


class CharTokenizer:
    """Characters are tokens; the special tokens, then the words, are matched as whole strings
    (longest first) before splitting the rest into characters. Words come last in the vocabulary, so
    a tokenizer with words gives every character the id it has without them."""

    def __init__(self, special_tokens: Iterable[str] = SPECIAL_TOKENS,
                 characters: Iterable[str] = CHARACTERS,
                 bos_token: str = "<｜begin▁of▁sentence｜>",
                 eos_token: str = "<｜end▁of▁sentence｜>",
                 pad_token: str = ENDOFTEXT,
                 words: Iterable[str] = ()):
        self.special_tokens = list(special_tokens)
        self.characters = list(characters)
        self.words = list(words)
        vocab = self.special_tokens + self.characters + self.words
        if any(len(c) != 1 for c in self.characters):
            raise ValueError("CharTokenizer: every entry of `characters` must be one character")
        if any(len(w) < 2 for w in self.words):
            raise ValueError("CharTokenizer: every entry of `words` must be at least two characters")
        missing = sorted({ch for w in self.words for ch in w} - set(self.characters))
        if missing:
            raise ValueError(f"CharTokenizer: `words` use characters not in the vocabulary: {missing}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("CharTokenizer: duplicate entries in the vocabulary")
        self._id = {t: i for i, t in enumerate(vocab)}
        self._token = vocab
        for name, tok in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if tok not in self._id:
                raise ValueError(f"CharTokenizer: {name} {tok!r} is not a special token")
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.unk_token_id = self._id.get(UNK)
        self._split = _whole_strings(self.special_tokens)
        self._word_set = set(self.words)
        self._words = _whole_strings(self.words) if self.words else None

    # ---- the HF-like interface -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._token)

    def __len__(self) -> int:
        return len(self._token)

    @property
    def bos_token_id(self) -> int:
        return self._id[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self._id[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self._id[self.pad_token]

    def convert_tokens_to_ids(self, token: str) -> int:
        return self._id.get(token, self.unk_token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece in self._id and piece in self.special_tokens:
                ids.append(self._id[piece])
                continue
            for part in (self._words.split(piece) if self._words else (piece,)):
                if part in self._word_set:
                    ids.append(self._id[part])
                    continue
                for ch in part:
                    i = self._id.get(ch)
                    if i is None:
                        if self.unk_token_id is None:
                            raise ValueError(f"CharTokenizer: character {ch!r} is not in the vocabulary")
                        i = self.unk_token_id
                    ids.append(i)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._token):
                raise ValueError(f"CharTokenizer: token id {i} is outside the vocabulary (0..{len(self._token) - 1})")
            tok = self._token[i]
            if skip_special_tokens and tok in self.special_tokens:
                continue
            out.append(tok)
        return "".join(out)

    # ---- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILE_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "char", "special_tokens": self.special_tokens, "characters": self.characters,
                       "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                       "words": self.words},
                      f, ensure_ascii=False, indent=1)
        return path

    @classmethod
    def from_pretrained(cls, directory: str) -> "CharTokenizer":
        path = os.path.join(directory, FILE_NAME) if os.path.isdir(directory) else directory
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("type") != "char":
            raise ValueError(f"{path}: not a character tokenizer file")
        return cls(d["special_tokens"], d["characters"], d["bos_token"], d["eos_token"], d["pad_token"],
                   d.get("words", ()))
