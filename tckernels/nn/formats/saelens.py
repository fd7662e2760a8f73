"""SAELens' on-disk SAE and transcoder format (sae-lens 6.x), read into and written from ``Transcoder``.

A SAELens checkpoint is a folder with ``cfg.json`` and ``sae_weights.safetensors`` (and optionally
``sparsity.safetensors``). What was verified in the sources of sae-lens 6.54.12 (the released wheel;
paths inside the ``sae_lens`` package):

* ``saes/sae.py``: ``SAEConfig`` fields ``d_in``, ``d_sae``, ``dtype`` (default ``"float32"``),
  ``device``, ``apply_b_dec_to_input`` (default True), ``normalize_activations`` (``"none"``,
  ``"expected_average_only_in"``, ``"constant_norm_rescale"``, ``"layer_norm"``,
  ``"covariance_whitening"``), ``reshape_activations`` (``"none"`` | ``"hook_z"``) and ``metadata``
  (free-form; ``hook_name``, ``hook_name_out``, ``model_name``, ``sae_lens_version``, ...).
  ``to_dict`` adds ``architecture``. ``process_sae_in`` computes ``x.to(dtype) − b_dec ·
  apply_b_dec_to_input``. ``save_model`` writes ``state_dict()`` to ``sae_weights.safetensors`` and
  ``cfg.to_dict()`` to ``cfg.json``; ``load_from_disk`` rebuilds the class named by
  ``architecture`` and calls ``load_state_dict(state_dict, assign=True)`` (strict: an extra or
  missing key fails there). Config keys that are not fields of the architecture's config class
  are dropped (``filter_valid_dataclass_fields``); ``TrainingSAE.save_model`` therefore writes
  training-only fields (``l1_coefficient``, ``jumprelu_bandwidth``, ...) that inference ignores.
* ``loading/pretrained_sae_loaders.py``: ``read_sae_components_from_disk`` casts every tensor to
  ``cfg["dtype"]``; a ``scaling_factor`` tensor of all ones is dropped, any other one is kept
  under a name the v6 classes do not have. ``handle_config_defaulting`` treats a config without
  ``sae_lens_version`` (top level or in ``metadata``) at >= 6 as a pre-6 config and rewrites it.
* ``saes/standard_sae.py`` (``"standard"``): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``; ``f = relu(process_sae_in(x) @ W_enc + b_enc)``,
  ``y = f @ W_dec + b_dec``.
* ``saes/topk_sae.py`` (``"topk"``): fields ``k`` (default 100) and ``rescale_acts_by_decoder_norm``
  (default False for inference, True for training). ``TopK`` takes the k largest pre-activations
  and applies ReLU to them. With rescale: pre-activations are multiplied by ``‖W_dec[i]‖`` before
  the top-k, and activations divided by it again before the decoder.
* ``saes/jumprelu_sae.py`` (``"jumprelu"``): extra parameter ``threshold [d_sae]`` (initialised to 0);
  ``f = relu(h) · (h > threshold)``. The training class stores ``threshold`` directly too.
* ``saes/transcoder.py``: ``"transcoder"`` (ReLU), ``"skip_transcoder"``, ``"jumprelu_transcoder"``,
  ``"jumprelu_skip_transcoder"``; field ``d_out`` (default 768), ``W_dec [d_sae, d_out]``,
  ``b_dec [d_out]``; ``apply_b_dec_to_input`` must be False (its ``__post_init__`` raises); the
  input is never shifted and the output is not de-normalised; skip variants add
  ``x @ W_skipᵀ`` with ``W_skip [d_out, d_in]``. There is no TopK transcoder.
* ``saes/batchtopk_sae.py``: BatchTopK is a training architecture only, saved for inference as
  ``"jumprelu"`` with every threshold equal to the learned scalar threshold.
* ``__init__.py`` registers for inference: standard, gated, topk, abstopk, jumprelu, the four
  transcoders, temporal and matching_pursuit.

How the formats map (``Transcoder(d_in, d_sae, d_out)``, weights row per feature):

* ``W_enc = W_encᵀ``, ``W_dec = W_dec``, ``b_enc``, ``b_dec``, ``W_skip`` copied as they are (bit-exact).
* ``apply_b_dec_to_input=True`` (SAEs only) is a pre-encoder bias: ``pre_bias=True`` with
  ``b_pre = b_dec``, so the encoder reads ``x − b_pre``, the same subtraction. The two are separate
  parameters in tckernels (only their values are tied), so training afterwards may untie them.
  On export, ``b_pre`` bit-equal to ``b_dec`` is written as ``apply_b_dec_to_input=True``; any other
  ``b_pre`` is folded into the encoder bias (``b_enc − W_enc b_pre`` in float64), equal up to rounding.
* JumpReLU: tckernels compares ``s > exp(log_threshold)``. Exporting writes
  ``threshold = exp(log_threshold)`` (that same θ). Loading sets ``log_threshold = log(threshold)``,
  picking among the neighbouring floats the one whose ``exp`` is nearest the file's threshold:
  that is the threshold bit for bit whenever some float's ``exp`` is (always for files written
  here); otherwise (about a third of arbitrary float32 thresholds below e⁻¹, where ``exp`` skips
  floats) θ is off by at most about ``|log θ|`` ulps, and only a pre-activation that close to θ can
  be gated differently. A threshold <= 0 gates exactly like 0 (``relu(h)·(h > t)`` is
  ``relu(h)``), which is ``log_threshold = −inf``. A round trip reproduces θ and every other
  tensor bit for bit; ``log_threshold`` itself may come back as another float with the same
  ``exp`` (several floats near 0 share one).
* TopK with ``rescale_acts_by_decoder_norm=True`` is loaded with the norms folded in (``W_enc·n``,
  ``b_enc·n``, ``W_dec/n`` in float64, as SAELens' own ``fold_W_dec_norm``): the same function up
  to rounding. Exports never set it. tckernels' TopK (``relu`` then the k largest) keeps the same
  positive activations as SAELens' (the k largest, then ``relu``); the two may name different
  features among those that come out 0.
* ``batchtopk`` exports as ``"jumprelu"`` with its learned threshold for every feature (as SAELens
  saves its own), or as ``"topk"`` before a threshold was learned (tckernels' eval rule then).

Refused, with a :class:`FormatError` (a ``ValueError``) naming the file and field: any
``normalize_activations`` other than ``"none"`` (the runtime modes rescale each input, and
``expected_average_only_in`` depends on a factor stored outside the folder), ``reshape_activations``
``"hook_z"``, unknown ``architecture`` or config fields, configs from before SAELens 6, tensors
missing, extra, of the wrong shape or not floating point, and truncated files. Nothing is unpickled.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from tckernels.nn.errors import FormatError, MissingKeyError
from tckernels.nn.formats.reading import assign_, check_shape, read_safetensors

__all__ = ["load_saelens", "save_saelens", "read_saelens_sparsity", "SAELENS_VERSION"]

#: The sae-lens release whose format is written (``metadata.sae_lens_version``).
SAELENS_VERSION = "6.54.12"

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"

_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "torch.float32": torch.float32, "torch.float64": torch.float64, "torch.float16": torch.float16,
    "torch.bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# architecture -> (tckernels activation, is a transcoder, has W_skip)
_ARCHITECTURES = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
_COMMON_FIELDS = {
    "architecture", "metadata", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
    "normalize_activations", "reshape_activations",
}
# Fields of each architecture's inference config, plus those of its training config, which
# TrainingSAE.save_model writes and SAELens' inference loader drops: none changes the forward.
_ARCH_FIELDS = {
    "standard": {"decoder_init_norm", "l1_coefficient", "lp_norm", "l1_warm_up_steps"},
    "topk": {"k", "rescale_acts_by_decoder_norm", "decoder_init_norm", "use_sparse_activations", "aux_loss_coefficient"},
    "jumprelu": {
        "decoder_init_norm", "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode",
        "l0_coefficient", "l0_warm_up_steps", "pre_act_loss_coefficient", "jumprelu_tanh_scale",
        "jumprelu_ste_to_input", "target_l0",
    },
}
for _a in ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
    _ARCH_FIELDS[_a] = {"d_out"}
# handle_config_defaulting reads the version at the top level too
_TOP_LEVEL_VERSION_FIELDS = {"sae_lens_version", "sae_lens_training_version"}


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


def _read_cfg(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"SAELens config not found: {path}") from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise FormatError(f"not readable JSON ({e})", path=path) from e
    if not isinstance(cfg, dict):
        raise FormatError(f"expected a JSON object, got {type(cfg).__name__}", path=path)
    return cfg


def _version_tuple(text: Any) -> Optional[tuple]:
    if not isinstance(text, str):
        return None
    parts = []
    for piece in text.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) if parts else None


def _pos_int(cfg: dict, name: str, path: str, default=None) -> int:
    v = cfg.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise FormatError(f"must be a positive integer, got {v!r}", path=path, key=name)
    return v


def _bool(cfg: dict, name: str, path: str, default: bool) -> bool:
    v = cfg.get(name, default)
    if not isinstance(v, bool):
        raise FormatError(f"must be true or false, got {v!r}", path=path, key=name)
    return v


def _parse_cfg(cfg: dict, path: str) -> dict:
    """The fields that decide the forward, checked; raises FormatError naming the field."""
    arch = cfg.get("architecture")
    if arch not in _ARCHITECTURES:
        raise FormatError(
            f"architecture {arch!r} is not supported; tckernels reads {', '.join(sorted(_ARCHITECTURES))}",
            path=path, key="architecture",
        )
    metadata = cfg.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FormatError(f"must be a JSON object, got {type(metadata).__name__}", path=path, key="metadata")
    version = cfg.get("sae_lens_version") or metadata.get("sae_lens_version")
    vt = _version_tuple(version)
    if vt is None or vt < (6,):
        raise FormatError(
            f"is {version!r}: configs from before SAELens 6 (which SAELens rewrites on load) are not read",
            path=path, key="metadata.sae_lens_version",
        )
    unknown = sorted(set(cfg) - _COMMON_FIELDS - _ARCH_FIELDS[arch] - _TOP_LEVEL_VERSION_FIELDS)
    if unknown:
        raise FormatError(f"unknown field for architecture {arch!r}", path=path, key=unknown[0])
    activation, is_transcoder, skip = _ARCHITECTURES[arch]
    d_in = _pos_int(cfg, "d_in", path)
    d_sae = _pos_int(cfg, "d_sae", path)
    d_out = _pos_int(cfg, "d_out", path, 768) if is_transcoder else d_in
    dtype_name = cfg.get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise FormatError(f"{dtype_name!r} is not one of {', '.join(_DTYPE_NAMES.values())}", path=path, key="dtype")
    apply_b_dec = _bool(cfg, "apply_b_dec_to_input", path, True)
    if is_transcoder and apply_b_dec:
        raise FormatError("must be false for a transcoder (SAELens refuses it too)", path=path, key="apply_b_dec_to_input")
    norm = cfg.get("normalize_activations", "none")
    if norm != "none":
        raise FormatError(
            f"is {norm!r}; only 'none' is read: the other modes rescale inputs at run time or need a "
            "factor stored outside the checkpoint (fold it into the weights first)",
            path=path, key="normalize_activations",
        )
    reshape = cfg.get("reshape_activations", "none")
    if reshape != "none":
        raise FormatError(
            f"is {reshape!r}; only 'none' is read (flatten the heads and save without it)",
            path=path, key="reshape_activations",
        )
    out = dict(
        architecture=arch, activation=activation, transcoder=is_transcoder, skip=skip, d_in=d_in, d_sae=d_sae,
        d_out=d_out, dtype=_DTYPES[dtype_name], apply_b_dec_to_input=apply_b_dec, metadata=metadata,
        k=None, rescale=False,
    )
    if activation == "topk":
        out["k"] = _pos_int(cfg, "k", path, 100)
        if out["k"] > d_sae:
            raise FormatError(f"k = {out['k']} exceeds d_sae = {d_sae}", path=path, key="k")
        out["rescale"] = _bool(cfg, "rescale_acts_by_decoder_norm", path, False)
    return out


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def _log_threshold(threshold: Tensor) -> Tensor:
    """log(threshold) in threshold's dtype: of the floats next to it, the one whose exp() (on CPU)
    is nearest threshold, so exactly threshold where such a float exists; thresholds <= 0 become −inf."""
    dt = threshold.dtype
    t = threshold.detach().cpu()
    base = t.double().clamp_min(0).log().to(dt)
    if dt in (torch.float16, torch.bfloat16):  # torch.nextafter is not defined for these
        return torch.where(t > 0, base, torch.full_like(base, -math.inf))
    cands = [base]
    up, down = base, base
    for _ in range(3):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        cands += [up, down]
    cands = torch.stack(cands)
    err = (cands.exp().double() - t.double()).abs()
    best = cands.gather(0, err.argmin(0, keepdim=True))[0]  # argmin takes the first: base on a tie
    return torch.where(t > 0, best, torch.full_like(best, -math.inf))


def load_saelens(path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, device=None):
    """Load a SAELens SAE or transcoder folder (``cfg.json`` + ``sae_weights.safetensors``) as a
    ``Transcoder`` whose forward equals SAELens' ``decode(encode(x))`` (plus the skip term).

    An SAE gives ``d_out = d_in`` (its target is its input); transcoders give their ``d_out`` and,
    for the skip variants, ``W_skip``. ``dtype``: parameter dtype, default the config's ``dtype``
    (SAELens casts the file's tensors to it too). The returned module has ``saelens_cfg`` (the
    config as read) and ``saelens_metadata`` (its ``metadata``: ``hook_name``, ...). See the module
    docstring for what maps to what and what is refused.
    """
    from tckernels.nn.transcoder import Transcoder

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not a SAELens checkpoint folder: {path}")
    cfg_path = os.path.join(path, CFG_FILENAME)
    w_path = os.path.join(path, WEIGHTS_FILENAME)
    raw = _read_cfg(cfg_path)
    c = _parse_cfg(raw, cfg_path)
    if not os.path.isfile(w_path):
        raise FileNotFoundError(f"SAELens weights not found: {w_path}")
    sd = read_safetensors(w_path)
    d_in, n, d_out = c["d_in"], c["d_sae"], c["d_out"]
    shapes = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
    if c["activation"] == "jumprelu":
        shapes["threshold"] = (n,)
    if c["skip"]:
        shapes["W_skip"] = (d_out, d_in)
    for key in shapes:
        if key not in sd:
            raise MissingKeyError(
                f"missing (architecture {c['architecture']!r} needs {', '.join(shapes)})", path=w_path, key=key
            )
    for key in sorted(set(sd) - set(shapes)):
        t = sd[key]
        if key == "scaling_factor" and isinstance(t, Tensor) and t.is_floating_point() and bool((t == 1).all()):
            continue  # SAELens drops an all-ones scaling factor before loading
        raise FormatError(
            f"is not a parameter of SAELens' {c['architecture']!r} class (its strict load_state_dict rejects it)",
            path=w_path, key=key,
        )
    target = dtype or c["dtype"]
    # cast first, as SAELens does on read, so the copies below are bit-exact against its weights
    w = {}
    for key, shape in shapes.items():
        what = {"W_enc": "[d_in, d_sae]", "W_dec": "[d_sae, d_out]", "W_skip": "[d_out, d_in]"}.get(key, "")
        w[key] = check_shape(sd[key], shape, w_path, key, what).to(target)
    if "threshold" in w and bool(w["threshold"].isnan().any()):
        raise FormatError("has NaN entries", path=w_path, key="threshold")
    W_enc, b_enc, W_dec = w["W_enc"].t(), w["b_enc"], w["W_dec"]
    if c["rescale"]:
        norms = W_dec.double().norm(dim=-1)
        if bool((norms == 0).any()):
            raise FormatError(
                "has an all-zero row; with rescale_acts_by_decoder_norm SAELens divides by its norm",
                path=w_path, key="W_dec",
            )
        W_enc = (W_enc.double() * norms[:, None]).to(target)
        b_enc = (b_enc.double() * norms).to(target)
        W_dec = (W_dec.double() / norms[:, None]).to(target)
    tc = Transcoder(
        d_in, n, d_out, c["activation"], k=c["k"], skip=c["skip"], pre_bias=c["apply_b_dec_to_input"],
        dec_bias=True, dtype=target, device=device, init=False,
    )
    assign_(tc.W_enc, W_enc)
    assign_(tc.b_enc, b_enc)
    assign_(tc.W_dec, W_dec)
    assign_(tc.b_dec, w["b_dec"])
    if tc.b_pre is not None:
        assign_(tc.b_pre, w["b_dec"])
    if tc.W_skip is not None:
        assign_(tc.W_skip, w["W_skip"])
    if tc.log_threshold is not None:
        assign_(tc.log_threshold, _log_threshold(w["threshold"]))
    tc.eval()
    tc.saelens_cfg = raw
    tc.saelens_metadata = dict(c["metadata"])
    return tc


def read_saelens_sparsity(path: Union[str, os.PathLike]) -> Optional[Tensor]:
    """The ``sparsity`` tensor ``[d_sae]`` (log10 feature firing rates) of a SAELens folder's
    ``sparsity.safetensors``, or None when the folder has none."""
    f = os.path.join(os.fspath(path), SPARSITY_FILENAME)
    if not os.path.isfile(f):
        return None
    t = read_safetensors(f, ["sparsity"])["sparsity"]
    if not t.is_floating_point() or t.dim() != 1:
        raise FormatError(f"expected a 1-D floating tensor, got {t.dtype} of shape {tuple(t.shape)}", path=f, key="sparsity")
    return t


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------


def _export_activation(tc) -> tuple:
    """(SAE architecture family, k, threshold tensor or None) for SAELens."""
    act = tc.activation
    if act == "relu":
        return "standard", None, None
    if act == "topk":
        return "topk", int(tc.k), None
    if act == "jumprelu":
        return "jumprelu", None, tc.log_threshold.detach().exp()
    if act == "batchtopk":
        thr = float(tc.threshold)
        if thr > 0:  # the eval rule s > threshold, one threshold for every feature
            return "jumprelu", None, torch.full((tc.n_features,), thr, dtype=torch.float32, device=tc.W_enc.device)
        return "topk", int(tc.k), None  # no threshold learned yet: eval runs TopK(k)
    raise ValueError(f"activation: {act!r} has no SAELens architecture")


def save_saelens(
    transcoder,
    path: Union[str, os.PathLike],
    *,
    hook_name: Optional[str] = None,
    hook_name_out: Optional[str] = None,
    model_name: Optional[str] = None,
    kind: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    sparsity: Optional[Tensor] = None,
) -> None:
    """Write ``transcoder`` as a SAELens folder that ``SAE.load_from_disk`` (sae-lens 6.x) loads.

    ``kind``: ``"sae"`` (needs ``d_out == d_in`` and no skip) or ``"transcoder"``; default
    ``"transcoder"`` when ``d_out != d_in``, there is a skip or ``hook_name_out`` is given, else
    ``"sae"``. ``hook_name`` (and for transcoders ``hook_name_out``), ``model_name`` and any other
    ``metadata`` go to ``cfg.json``'s ``metadata``; ``hook_name`` is required (here or in
    ``metadata``). ``dtype``: dtype written (default the transcoder's; float32/64/16 or bfloat16).
    ``sparsity``: optional ``[d_sae]`` log10 firing rates, written to ``sparsity.safetensors``.
    Raises ``ValueError`` naming the field for anything SAELens cannot represent (a TopK
    transcoder, an SAE with ``d_out != d_in``, another dtype). See the module docstring.
    """
    tc = transcoder
    d_in, n, d_out = tc.d_in, tc.n_features, tc.d_out
    skip = getattr(tc, "W_skip", None) is not None
    if kind is None:
        kind = "transcoder" if (d_out != d_in or skip or hook_name_out is not None) else "sae"
    if kind not in ("sae", "transcoder"):
        raise ValueError(f"kind must be 'sae', 'transcoder' or None, got {kind!r}")
    if kind == "sae" and (d_out != d_in or skip):
        raise ValueError(
            f"kind: a SAELens SAE reconstructs its input (d_out == d_in, no skip); this one has d_in={d_in}, "
            f"d_out={d_out}, skip={skip}; use kind='transcoder'"
        )
    family, k, threshold = _export_activation(tc)
    if kind == "sae":
        architecture = family
    elif family == "topk":
        raise ValueError(
            f"activation: SAELens {SAELENS_VERSION} has no TopK transcoder architecture (only ReLU and JumpReLU, "
            "with or without skip)"
        )
    else:
        architecture = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[family]
        if skip:
            architecture = architecture.replace("transcoder", "skip_transcoder")
    dtype = dtype or tc.W_enc.dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype: SAELens stores {', '.join(_DTYPE_NAMES.values())}, not {dtype}")

    meta: Dict[str, Any] = dict(metadata or {})
    for key, value in (("hook_name", hook_name), ("hook_name_out", hook_name_out), ("model_name", model_name)):
        if value is not None:
            meta[key] = value
    if not isinstance(meta.get("hook_name"), str) or not meta["hook_name"]:
        raise ValueError("hook_name: SAELens configs name the hook the SAE reads (pass hook_name=...)")
    meta["sae_lens_version"] = SAELENS_VERSION
    meta.setdefault("sae_lens_training_version", SAELENS_VERSION)

    W_enc, b_enc = tc.W_enc.detach(), tc.b_enc.detach()
    b_dec = tc.b_dec.detach() if tc.b_dec is not None else torch.zeros(d_out, dtype=W_enc.dtype, device=W_enc.device)
    b_pre = tc.b_pre.detach() if getattr(tc, "b_pre", None) is not None else None
    apply_b_dec = False
    if b_pre is not None:
        if kind == "sae" and tc.b_dec is not None and torch.equal(b_pre, b_dec):
            apply_b_dec = True  # the same subtraction SAELens makes
        else:
            # W_enc (x − b_pre) + b_enc = W_enc x + (b_enc − W_enc b_pre)
            b_enc = (b_enc.double() - W_enc.double() @ b_pre.double()).to(b_enc.dtype)
    tensors = {
        "W_enc": W_enc.t().to(dtype),
        "b_enc": b_enc.to(dtype),
        "W_dec": tc.W_dec.detach().to(dtype),
        "b_dec": b_dec.to(dtype),
    }
    if threshold is not None:
        tensors["threshold"] = threshold.to(dtype)
    if skip:
        tensors["W_skip"] = tc.W_skip.detach().to(dtype)
    tensors = {key: t.contiguous().cpu() for key, t in tensors.items()}

    cfg: Dict[str, Any] = {
        "d_in": d_in,
        "d_sae": n,
        "dtype": _DTYPE_NAMES[dtype],
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "architecture": architecture,
    }
    if family == "topk":
        cfg["k"] = k
        cfg["rescale_acts_by_decoder_norm"] = False
    if kind == "transcoder":
        cfg["d_out"] = d_out
    if sparsity is not None:
        if not isinstance(sparsity, Tensor) or tuple(sparsity.shape) != (n,) or not sparsity.is_floating_point():
            raise ValueError(f"sparsity: expected a floating tensor of shape ({n},)")

    try:
        cfg_text = json.dumps(cfg)  # before anything is written: a metadata value JSON cannot hold
    except TypeError as e:
        raise ValueError(f"metadata: not JSON-serialisable ({e})") from None

    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILENAME))
    with open(os.path.join(path, CFG_FILENAME), "w") as f:
        f.write(cfg_text)
    if sparsity is not None:
        save_file({"sparsity": sparsity.detach().contiguous().cpu()}, os.path.join(path, SPARSITY_FILENAME))
