"""EleutherAI sparsify (PyPI ``eai-sparsify``) checkpoints: TopK SAEs and transcoders, both ways.

What sparsify 1.3.3 does, as read in its released source (``sparsify/`` in the wheel):

* A saved sparse coder is a folder with ``cfg.json`` and ``sae.safetensors``
  (``SparseCoder.save_to_disk``, ``sparse_coder.py``). ``cfg.json`` is ``SparseCoderConfig.to_dict()``
  plus ``"d_in"``; the config's fields (``config.py``) are ``activation`` (``"topk"`` or
  ``"groupmax"``), ``expansion_factor`` (32), ``normalize_decoder`` (true), ``num_latents`` (0:
  use ``d_in · expansion_factor``), ``k`` (32), ``multi_topk`` (false), ``skip_connection`` (false)
  and ``transcode`` (false), defaults in brackets; ``load_from_disk`` fills absent fields with
  those defaults and drops unknown ones.
* ``sae.safetensors`` is the module's state dict (safetensors ``save_model``):
  ``encoder.weight [N, d_in]`` and ``encoder.bias [N]`` (an ``nn.Linear``), ``W_dec [N, d_in]``
  (row per latent, as tckernels stores it), ``b_dec [d_in]`` and, with ``skip_connection``,
  ``W_skip [d_in, d_in]``. The output width is always ``d_in``. ``load_from_disk`` builds the
  module in the dtype of the file's first tensor and loads with ``strict=True``.
* ``encode``: an SAE (``transcode`` false) subtracts ``b_dec`` from the input first; a transcoder
  does not. Then ``relu(x @ encoder.weightᵀ + encoder.bias)`` and the ``k`` largest of it
  (``fused_encoder.py``: ReLU *before* the top-k, so every kept value is >= 0; there is no signed
  TopK in 1.3.3 -- the older ``EleutherAI/sae`` package had a ``signed`` option, top-k by
  absolute value without ReLU). ``groupmax`` takes the maximum of each of ``k`` contiguous groups.
* ``decode``: ``Σ_j acts_j · W_dec[idx_j] + b_dec``; ``forward`` adds ``x @ W_skipᵀ`` when there is
  a skip connection (on the raw input, for SAEs too).
* ``normalize_decoder`` is a training rule (the trainer renormalises ``W_dec`` rows after each
  step); the forward does not use it. ``multi_topk`` is a training loss; with it set,
  ``SparseCoder.forward`` returns as ``sae_out``, ``latent_acts`` and ``latent_indices`` those of
  the ``4k`` largest latents (``decode`` of them: ``b_dec`` added, no ``W_skip`` term), while
  ``encode``/``decode`` keep using ``k``.
* A training run saves ``<save_dir>/<run_name>/<hookpoint>/`` (``<hookpoint>/seed<N>/`` with several
  seeds) beside ``config.json``, ``state.pt``, ``optimizer_*.pt``, ``lr_scheduler_*.pt`` and a
  ``best/`` folder (``trainer.py``, ``Trainer._checkpoint``); ``SparseCoder.load_many(local=True)``
  loads each subfolder by name.

How it maps onto :class:`~tckernels.nn.Transcoder`, and why the outputs are equal:

* ``Transcoder(d_in, N, d_in, "topk", k=k, skip=skip_connection, pre_bias=not transcode)`` with
  ``W_enc = encoder.weight``, ``b_enc = encoder.bias``, ``W_dec = W_dec``, ``b_dec = b_dec``,
  ``W_skip = W_skip``, every tensor copied bit for bit.
* An SAE's ``x − b_dec`` is tckernels' pre-encoder bias: ``b_pre`` is set to a copy of ``b_dec``,
  so ``x − b_pre`` is bit-identical to sparsify's ``x − b_dec``. (The two are separate parameters
  here: training the loaded module does not keep them tied.)
* tckernels' TopK is also "the k largest of ``relu(pre)``", so the selected values are equal and
  the indices equal wherever the k-th and (k+1)-th values differ; where a token has fewer than
  k positive pre-activations both pad with zeros, whose indices are arbitrary in both and add
  nothing. The decoder sum and the skip GEMM agree up to floating-point summation order.
* ``normalize_decoder`` is carried to the tckernels config (the same training rule). ``multi_topk``
  is ignored on load (the model is the k-latent one ``encode`` uses); pass ``k=4 * cfg["k"]`` to
  reproduce what ``forward`` returns for such a file without a skip connection.

Refused, with the field named: ``activation: "groupmax"`` (no group-max activation here), a
``signed`` TopK and the newer repository fields ``embed_skip``/``gram_lookup`` when set (their
forward needs inputs or tables this format does not hold), any other unknown field, and in
:func:`save_sparsify` everything sparsify cannot run the same way: activations other than
``"topk"`` (ReLU, JumpReLU, BatchTopK), ``d_out != d_in``, and a ``b_pre`` that is not equal
to ``b_dec`` (sparsify's only pre-encoder shift is an SAE's ``b_dec``). A transcoder with
``b_pre == b_dec`` is written with ``transcode: false`` and one without ``b_pre`` with
``transcode: true``: that flag is what selects sparsify's encoder input. A module without a
decoder bias is written with ``b_dec = 0``.

Bad files -- a missing or unexpected tensor, a wrong shape or dtype (all tensors must share one
floating dtype, as sparsify's own files do), a truncated safetensors file, a bad ``cfg.json``
field -- raise :class:`~tckernels.nn.errors.FormatError` naming the file and the key or field.
Only JSON and safetensors are read; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch

from tckernels.nn.errors import FormatError
from tckernels.nn.formats.reading import assign_, check_shape, read_safetensors, safetensors_keys
from tckernels.nn.formats.tckernels_transcoder import write_safetensors
from tckernels.nn.transcoder import Transcoder

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "load_sparsify",
    "load_sparsify_dir",
    "save_sparsify",
    "save_sparsify_dir",
]

CONFIG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"

PathLike = Union[str, os.PathLike]

#: SparseCoderConfig of sparsify 1.3.3: field -> default (what sparsify assumes when it is absent).
_DEFAULTS: Dict[str, Any] = {
    "activation": "topk",
    "expansion_factor": 32,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 32,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
}
_INT_FIELDS = ("expansion_factor", "num_latents", "k")
_BOOL_FIELDS = ("normalize_decoder", "multi_topk", "skip_connection", "transcode")

#: Fields of other sparsify / EleutherAI ``sae`` versions: accepted only at the value that leaves
#: the forward as 1.3.3 computes it (None: any value; they do not touch the forward).
_OTHER_VERSION_FIELDS: Dict[str, Any] = {
    "signed": False,  # EleutherAI/sae: top-k by |pre| without ReLU
    "embed_skip": False,  # later sparsify: a skip from the embedding activations
    "gram_lookup": False,  # later sparsify: subtracts an n-gram mean table
    "lookup_max_order": None,
    "gram_table_hash": None,
    "naive_decoder": None,  # EleutherAI/sae: which decoder kernel
    "d_sae": None,  # EleutherAI/sae: checked against the tensors below
}

_SEED_DIR = re.compile(r"^seed\d+$")


# ------------------------------------------------------------------------------------------------
# cfg.json
# ------------------------------------------------------------------------------------------------


def _read_cfg(file: Path) -> dict:
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"not valid JSON ({e})", path=file) from e
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"cannot read ({e})", path=file) from e
    if not isinstance(raw, dict):
        raise FormatError(f"expected a JSON object, got {type(raw).__name__}", path=file)
    return raw


def _field_error(file: Path, field: str, message: str) -> FormatError:
    return FormatError(f"field {field!r}: {message}", path=file)


def _parse_cfg(raw: dict, file: Path) -> dict:
    """The 1.3.3 config with defaults filled in, plus ``d_in``; refuses what its forward lacks."""
    known = set(_DEFAULTS) | {"d_in"} | set(_OTHER_VERSION_FIELDS)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _field_error(file, unknown[0], f"unknown sparsify config field (fields here: {sorted(raw)})")
    for field, neutral in _OTHER_VERSION_FIELDS.items():
        if field in raw and neutral is not None and raw[field] != neutral:
            raise _field_error(
                file, field, f"is {raw[field]!r}; only {neutral!r} runs like sparsify 1.3.3's TopK coder"
            )
    if "d_in" not in raw:
        raise _field_error(file, "d_in", "missing")
    cfg = {**_DEFAULTS, **{k: v for k, v in raw.items() if k in _DEFAULTS}, "d_in": raw["d_in"]}
    for field in (*_INT_FIELDS, "d_in"):
        v = cfg[field]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _field_error(file, field, f"must be an int >= 0, got {v!r}")
    for field in _BOOL_FIELDS:
        if not isinstance(cfg[field], bool):
            raise _field_error(file, field, f"must be true or false, got {cfg[field]!r}")
    if cfg["activation"] != "topk":
        raise _field_error(
            file, "activation",
            f"is {cfg['activation']!r}; only 'topk' maps onto tckernels ('groupmax' has no counterpart)",
        )
    if cfg["d_in"] < 1:
        raise _field_error(file, "d_in", f"must be >= 1, got {cfg['d_in']}")
    n = cfg["num_latents"] or cfg["d_in"] * cfg["expansion_factor"]
    if n < 1:
        raise _field_error(file, "num_latents", "and expansion_factor give no latents")
    if not 1 <= cfg["k"] <= n:
        raise _field_error(file, "k", f"must be in [1, {n}] (the number of latents), got {cfg['k']}")
    if raw.get("d_sae") is not None and raw["d_sae"] != n:
        raise _field_error(file, "d_sae", f"is {raw['d_sae']!r} but the config gives {n} latents")
    cfg["n_latents"] = n
    return cfg


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def load_sparsify(
    path: PathLike,
    *,
    k: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> Transcoder:
    """Load one sparsify hook-point folder (``cfg.json`` + ``sae.safetensors``) as a ``Transcoder``.

    ``k`` overrides the file's ``k`` (e.g. ``4 * k`` for what a ``multi_topk`` file's ``forward``
    returns); ``dtype``/``device``: of the parameters (default: the file's dtype, CPU). The module
    gets ``.sparsify_cfg``, the config as read (defaults filled in, with ``d_in``).
    """
    folder = Path(path)
    cfg_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_file.is_file():
        hint = ""
        if folder.is_dir() and any((p / CONFIG_NAME).is_file() for p in folder.iterdir() if p.is_dir()):
            hint = "; it holds hook-point folders: use load_sparsify_dir"
        raise FileNotFoundError(f"sparsify config not found: {cfg_file}{hint}")
    cfg = _parse_cfg(_read_cfg(cfg_file), cfg_file)
    d, n = cfg["d_in"], cfg["n_latents"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n):
        raise ValueError(f"k must be an int in [1, {n}], got {k!r}")

    expected = {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}
    if cfg["skip_connection"]:
        expected["W_skip"] = (d, d)
    present = safetensors_keys(weights_file)
    extra = sorted(set(present) - set(expected))
    if extra:
        why = " (skip_connection is false)" if extra == ["W_skip"] else ""
        raise FormatError(f"unexpected tensor{why}; a sparsify coder has {sorted(expected)}", path=weights_file,
                          key=extra[0])
    tensors = read_safetensors(weights_file, expected)
    what = {"encoder.weight": "[num_latents, d_in]", "encoder.bias": "[num_latents]",
            "W_dec": "[num_latents, d_in]", "b_dec": "[d_in]", "W_skip": "[d_in, d_in]"}
    for key, shape in expected.items():
        check_shape(tensors[key], shape, weights_file, key, what[key])
    file_dtype = tensors["encoder.weight"].dtype
    for key, t in tensors.items():
        if t.dtype != file_dtype:
            raise FormatError(f"has dtype {t.dtype} but encoder.weight has {file_dtype}; a sparsify file "
                              "holds one dtype", path=weights_file, key=key)

    tc = Transcoder(
        d, n, d, "topk", k=cfg["k"] if k is None else k, skip=cfg["skip_connection"],
        pre_bias=not cfg["transcode"], dec_bias=True, normalize_decoder=cfg["normalize_decoder"],
        dtype=dtype or file_dtype, device=device, init=False,
    )
    assign_(tc.W_enc, tensors["encoder.weight"])
    assign_(tc.b_enc, tensors["encoder.bias"])
    assign_(tc.W_dec, tensors["W_dec"])
    assign_(tc.b_dec, tensors["b_dec"])
    if tc.b_pre is not None:
        assign_(tc.b_pre, tensors["b_dec"])
    if tc.W_skip is not None:
        assign_(tc.W_skip, tensors["W_skip"])
    tc.sparsify_cfg = {key: v for key, v in cfg.items() if key != "n_latents"}
    return tc


def _hookpoint_dirs(root: Path) -> Dict[str, Path]:
    """Hook-point folders of a run: ``<name>/`` holding ``cfg.json``, or ``<name>/seed<N>/``."""
    found = {}
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if (p / CONFIG_NAME).is_file():
            found[p.name] = p
            continue
        for q in sorted(p.iterdir()):
            if q.is_dir() and _SEED_DIR.match(q.name) and (q / CONFIG_NAME).is_file():
                found[f"{p.name}/{q.name}"] = q
    return found


def load_sparsify_dir(
    path: PathLike, hookpoints: Optional[Iterable[str]] = None, **kwargs
) -> Dict[str, Transcoder]:
    """Load the hook-point folders of a sparsify run (or hub snapshot): ``{hookpoint: Transcoder}``.

    Every subfolder with a ``cfg.json`` is a hook point, named by its folder (``"layers.5.mlp"``);
    a run with several seeds has ``"<hookpoint>/seed<N>"``. The trainer's ``best/`` copy and its
    optimizer state are not read. ``hookpoints`` picks some (a missing one raises
    ``FileNotFoundError``); keyword arguments go to :func:`load_sparsify`.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    if hookpoints is None:
        dirs = _hookpoint_dirs(root)
        if not dirs:
            raise FileNotFoundError(f"no hook-point folders (<name>/{CONFIG_NAME}) in {root}")
    else:
        dirs = {}
        for name in hookpoints:
            p = root / name
            if not (p / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"hook point {name!r}: {p / CONFIG_NAME} not found")
            dirs[name] = p
    return {name: load_sparsify(p, **kwargs) for name, p in dirs.items()}


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------


def _sparsify_tensors_and_cfg(tc: Transcoder, dtype: Optional[torch.dtype]) -> tuple:
    if not isinstance(tc, Transcoder):
        raise TypeError(f"save_sparsify writes a tckernels Transcoder, got {type(tc).__name__}")
    if tc.activation != "topk":
        raise ValueError(
            f"activation: sparsify's coders are TopK (ReLU then the k largest); {tc.activation!r} would run "
            "differently there"
        )
    if tc.d_out != tc.d_in:
        raise ValueError(f"d_out: sparsify's output width is d_in ({tc.d_in}), this transcoder's is {tc.d_out}")
    b_dec = tc.b_dec.detach() if tc.b_dec is not None else torch.zeros_like(tc.W_enc[0]).detach()
    if tc.b_pre is not None:
        if tc.b_dec is None or not torch.equal(tc.b_pre.detach(), tc.b_dec.detach()):
            raise ValueError(
                "pre_bias: sparsify's only pre-encoder shift is an SAE's x - b_dec; this transcoder's b_pre "
                "differs from its b_dec"
            )
        transcode = False
    else:
        transcode = True
    dt = dtype or tc.W_enc.dtype
    if not dt.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dt}")
    tensors = {"encoder.weight": tc.W_enc, "encoder.bias": tc.b_enc, "W_dec": tc.W_dec, "b_dec": b_dec}
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip
    tensors = {key: t.detach().to(dt) for key, t in tensors.items()}
    n, d = tc.n_features, tc.d_in
    cfg = {
        "activation": "topk",
        # num_latents decides the width; expansion_factor is only read when it is 0
        "expansion_factor": n // d if n % d == 0 else _DEFAULTS["expansion_factor"],
        "normalize_decoder": bool(tc.config.normalize_decoder),
        "num_latents": n,
        "k": int(tc.k),
        "multi_topk": False,
        "skip_connection": tc.W_skip is not None,
        "transcode": transcode,
        "d_in": d,
    }
    return tensors, cfg


def _write_json(file: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_sparsify(transcoder: Transcoder, path: PathLike, *, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``transcoder`` as a sparsify 1.3.3 hook-point folder (``cfg.json`` + ``sae.safetensors``)
    that ``SparseCoder.load_from_disk`` loads and runs with the same outputs. Returns the folder.

    ``dtype``: of the saved tensors (default: the transcoder's; then :func:`load_sparsify` gives
    back every parameter bit for bit). Raises ``ValueError`` naming the field for what sparsify
    cannot represent (see the module docstring); nothing is written then.
    """
    tensors, cfg = _sparsify_tensors_and_cfg(transcoder, dtype)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    _write_json(folder / CONFIG_NAME, cfg)
    return folder


def save_sparsify_dir(
    transcoders: Mapping[str, Transcoder], path: PathLike, *, dtype: Optional[torch.dtype] = None
) -> Path:
    """Write ``{hookpoint: Transcoder}`` as a sparsify run folder (``<path>/<hookpoint>/``), which
    ``SparseCoder.load_many(path, local=True)`` and :func:`load_sparsify_dir` read. Every transcoder
    is checked before anything is written."""
    root = Path(path)
    for name in transcoders:
        parts = Path(name).parts if isinstance(name, str) else ()
        if not parts or Path(name).is_absolute() or ".." in parts or len(parts) > 2:
            raise ValueError(f"hook point name {name!r} must be a folder name ('layers.5' or 'layers.5/seed0')")
        try:
            _sparsify_tensors_and_cfg(transcoders[name], dtype)
        except ValueError as e:
            raise ValueError(f"hook point {name!r}: {e}") from None
    for name, tc in transcoders.items():
        save_sparsify(tc, root / name, dtype=dtype)
    return root
