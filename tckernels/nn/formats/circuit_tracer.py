"""circuit-tracer's transcoder formats: export and import, so features trained here can be traced there.

What was verified, and where (public sources of ``safety-research/circuit-tracer`` as stored in
the code index; commit hashes are those of the stored file versions):

Per-layer transcoders ("transcoder set"):

* ``circuit_tracer/transcoder/single_layer_transcoder.py`` (commit 196e2ce):
  ``SingleLayerTranscoder`` has ``W_enc [d_transcoder, d_model]``, ``W_dec [d_transcoder, d_model]``,
  ``b_enc [d_transcoder]``, ``b_dec [d_model]``, optional ``W_skip [d_model, d_model]`` and
  ``activation_function`` (a ``JumpReLU`` module holding ``threshold``, ``F.relu`` or ``TopK(k)``).
  Forward: ``pre = F.linear(x.to(W_enc.dtype), W_enc, b_enc)``; ``acts = activation(pre)``;
  ``y = acts @ W_dec + b_dec`` plus ``x @ W_skipᵀ`` when there is a skip. ``to_safetensors`` writes
  one file per layer with keys ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, and optionally
  ``activation_function.threshold``, ``W_skip`` (and ``k`` for TopK); ``TranscoderSet.to_safetensors``
  names them ``layer_{i}.safetensors``. ``load_transcoder`` reads every key of a file into
  ``load_state_dict`` (strict), takes ``d_transcoder`` from ``b_enc`` and ``d_model`` from ``b_dec``,
  picks JumpReLU when ``activation_function.threshold`` is present, else ReLU, unless the config
  names an activation. ``load_transcoder_set`` maps ``activation: topk`` (with ``k``) and
  ``activation: relu`` from the config to ``TopK(k)`` / ``F.relu``. Its test
  ``tests/transcoder/test_single_layer_transcoder.py`` (commit b00048e) writes files with
  ``W_enc`` and ``W_dec`` both ``[d_sae, d_model]``. (So ``W_enc [d_model, d_transcoder]`` is the
  Gemma-Scope ``.npz`` orientation, which circuit-tracer transposes on load, not its own files'.)
* ``circuit_tracer/transcoder/activation_functions.py`` (commit b00048e): ``JumpReLU`` forward is
  ``x * (x > threshold)``; ``TopK(k)`` keeps the k largest pre-activations with **no ReLU**
  (``x * gate``); ReLU is ``F.relu``.
* ``circuit_tracer/utils/hf_utils.py`` (commit 196e2ce): ``config.yaml`` has ``model_kind``
  (``transcoder_set`` or ``cross_layer_transcoder``), ``feature_input_hook``,
  ``feature_output_hook``, optional ``activation`` and ``k``, and either ``transcoders`` (a list of
  per-layer paths, layer = list position) or, without it, the files ``layer_{i}.safetensors``
  beside the config. ``circuit_tracer/utils/caching.py`` (commit b00048e): a local directory with
  ``config.yaml`` + ``layer_{i}.safetensors`` is loaded the same way (``scan_name`` optional).
* Older layout, ``single_layer_transcoder.py`` at commit 33777f6 (``load_relu_transcoder``): the
  file's ``W_dec`` was ``[d_model, d_transcoder]`` (transposed on load); ``W_enc`` was already
  ``[d_transcoder, d_model]``. Gemma-Scope ``.npz`` params store ``W_enc [d_model, d_transcoder]``.
  The importer accepts these by shape when ``d_model != d_transcoder``.

Cross-layer transcoders (``circuit_tracer/transcoder/cross_layer_transcoder.py``, commit b00048e):
``W_enc_{i}.safetensors`` holds ``W_enc_{i} [d_transcoder, d_model]``, ``b_enc_{i}``, ``b_dec_{i}``
and, for JumpReLU, ``threshold_{i} [d_transcoder]``; ``W_dec_{i}.safetensors`` holds
``W_dec_{i} [d_transcoder, n_layers − i, d_model]``. The output at layer j is
``Σ_{i ≤ j} acts_i @ W_dec_i[:, j − i] + b_dec_j``. Activations: ``relu`` or ``jump_relu`` only
(anything else raises there); ``n_layers`` is the number of ``W_enc_*.safetensors`` files; its
loader never reads a skip connection from these files.

Exporting from tckernels, and what is exact:

* ``relu`` and ``jumprelu`` transcoders, and ``batchtopk`` ones after training (their inference rule
  ``s > threshold`` is a JumpReLU with that threshold for every feature), map exactly.
* ``topk`` exports as ``activation: topk`` + ``k`` in ``config.yaml`` (no ``k`` key in the weight
  file: circuit-tracer's strict ``load_state_dict`` in ``load_transcoder`` would reject it).
  circuit-tracer's TopK applies no ReLU, so the two agree whenever each token has at least k
  positive pre-activations; with fewer, circuit-tracer also passes some negative values. Its
  hub loader honours ``activation``/``k``; its local-cache loader (``load_transcoders_from_cache``
  at b00048e) does not pass them on and would run such files as ReLU.
* A pre-encoder bias is folded into the encoder bias (``b_enc − W_enc @ b_pre``, computed in
  float64): equal up to rounding. circuit-tracer needs ``d_in == d_out`` (one ``d_model``).

Importing: JumpReLU thresholds become ``log_threshold = log(threshold)`` (tckernels' parameter), so
θ is reproduced to within float rounding (a pre-activation within an ulp of θ may be classified
differently); thresholds must be > 0. TopK imports as tckernels' TopK (ReLU applied; see above).
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

from tckernels.nn.errors import FormatError, MissingKeyError
from tckernels.nn.formats.reading import assign_, check_shape, read_safetensors

__all__ = [
    "save_circuit_tracer",
    "load_circuit_tracer",
    "load_circuit_tracer_file",
    "save_circuit_tracer_clt",
    "load_circuit_tracer_clt",
    "transcoder_to_circuit_tracer",
]

DEFAULT_INPUT_HOOK = "ln2.hook_normalized"
DEFAULT_OUTPUT_HOOK = "hook_mlp_out"

# ------------------------------------------------------------------------------------------------
# config.yaml (plain YAML; PyYAML is used to read it when installed, else a flat-mapping reader)
# ------------------------------------------------------------------------------------------------


def _write_config(path: str, config: dict) -> None:
    lines = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(v)}" for v in value)
        elif isinstance(value, bool):
            lines.append(f"{key}: {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key}: {value}")
        else:
            lines.append(f"{key}: {json.dumps(str(value))}")  # a JSON string is a YAML scalar
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _scalar(text: str):
    text = text.strip()
    if not text or text in ("~", "null"):
        return None
    if text[0] in "\"'":
        if text[0] == '"':
            return json.loads(text)
        return text[1:-1].replace("''", "'")
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _read_config(path: str) -> dict:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise FormatError(f"cannot read ({e})", path=path) from e
    try:
        import yaml  # type: ignore
    except ImportError:
        yaml = None
    if yaml is not None:
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FormatError(f"not valid YAML ({e})", path=path) from e
    else:  # flat "key: value" lines and "- item" lists
        cfg, last = {}, None
        for line in text.splitlines():
            stripped = line.split(" #")[0].rstrip()
            if not stripped.strip() or stripped.lstrip().startswith("#"):
                continue
            if stripped.lstrip().startswith("- ") and last is not None:
                if not isinstance(cfg.get(last), list):
                    cfg[last] = []
                cfg[last].append(_scalar(stripped.lstrip()[2:]))
            elif ":" in stripped:
                key, _, value = stripped.partition(":")
                last = key.strip()
                cfg[last] = _scalar(value)
            else:
                raise FormatError(f"cannot parse line {line!r} (install PyYAML for full YAML)", path=path)
    if not isinstance(cfg, dict):
        raise FormatError(f"expected a mapping, got {type(cfg).__name__}", path=path)
    return cfg


# ------------------------------------------------------------------------------------------------
# per-layer transcoders
# ------------------------------------------------------------------------------------------------


def _export_activation(tc) -> tuple:
    """(activation name for config.yaml or None, k or None, per-feature threshold or None)."""
    act = tc.activation
    if act == "relu":
        return "relu", None, None
    if act == "jumprelu":
        return None, None, tc.log_threshold.detach().exp()
    if act == "topk":
        return "topk", int(tc.k), None
    if act == "batchtopk":
        thr = float(tc.threshold)
        if thr > 0:  # inference rule s > threshold, the same for every feature
            return None, None, torch.full((tc.n_features,), thr, dtype=torch.float64)
        return "topk", int(tc.k), None  # threshold not learned yet: inference is TopK(k)
    raise ValueError(f"cannot export activation {act!r} to circuit-tracer")


def _encoder_weights(tc, dtype) -> tuple:
    W_enc = tc.W_enc.detach()
    b_enc = tc.b_enc.detach()
    if getattr(tc, "b_pre", None) is not None:
        # W_enc (x − b_pre) + b_enc = W_enc x + (b_enc − W_enc b_pre)
        b_enc = (b_enc.double() - W_enc.double() @ tc.b_pre.detach().double()).to(b_enc.dtype)
    return W_enc.to(dtype).contiguous(), b_enc.to(dtype).contiguous()


def transcoder_to_circuit_tracer(tc, dtype: Optional[torch.dtype] = None) -> tuple:
    """One ``Transcoder`` -> (tensors of a circuit-tracer ``layer_{i}.safetensors``, activation, k)."""
    if tc.d_in != tc.d_out:
        raise ValueError(
            f"circuit-tracer transcoders have one d_model for input and output; this one has d_in={tc.d_in}, d_out={tc.d_out}"
        )
    dtype = dtype or tc.W_enc.dtype
    act, k, thr = _export_activation(tc)
    W_enc, b_enc = _encoder_weights(tc, dtype)
    b_dec = tc.b_dec.detach() if tc.b_dec is not None else torch.zeros(tc.d_out, dtype=dtype, device=W_enc.device)
    tensors = {"W_enc": W_enc, "W_dec": tc.W_dec.detach().to(dtype).contiguous(), "b_enc": b_enc, "b_dec": b_dec.to(dtype).contiguous()}
    if thr is not None:
        tensors["activation_function.threshold"] = thr.to(device=W_enc.device, dtype=dtype).contiguous()
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip.detach().to(dtype).contiguous()
    return {key: t.cpu() for key, t in tensors.items()}, act, k


def _as_layer_dict(transcoders) -> Dict[int, object]:
    if isinstance(transcoders, Mapping):
        return {int(i): t for i, t in transcoders.items()}
    return dict(enumerate(transcoders))


def save_circuit_tracer(
    transcoders: Union[Mapping[int, object], Sequence[object]],
    path: Union[str, os.PathLike],
    *,
    feature_input_hook: str = DEFAULT_INPUT_HOOK,
    feature_output_hook: str = DEFAULT_OUTPUT_HOOK,
    model_name: Optional[str] = None,
    scan_name: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Write per-layer transcoders as a circuit-tracer transcoder set: ``path/config.yaml`` and
    ``path/layer_{i}.safetensors`` for layers 0..L−1 (circuit-tracer requires every layer from 0).

    ``transcoders``: ``{layer: Transcoder}`` or a list (index = layer). The hooks name where, in
    circuit-tracer's replacement model, features read (default ``ln2.hook_normalized``, the
    normalised MLP input) and write (default ``hook_mlp_out``). All layers must share one
    activation (and k). See the module docstring for what is exact.
    """
    layers = _as_layer_dict(transcoders)
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ValueError(f"circuit-tracer needs a transcoder for every layer 0..L-1, got layers {sorted(layers)}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    kinds = set()
    files = []
    for i in sorted(layers):
        tensors, act, k = transcoder_to_circuit_tracer(layers[i], dtype)
        kinds.add((act, k))
        files.append((i, tensors))
    if len(kinds) != 1:
        raise ValueError(f"all layers must share one activation (and k) in a circuit-tracer set, got {sorted(kinds, key=str)}")
    (act, k), = kinds
    from safetensors.torch import save_file

    for i, tensors in files:
        save_file(tensors, os.path.join(path, f"layer_{i}.safetensors"))
    config = {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
        "scan_name": scan_name,
        "activation": act,
        "k": k,
    }
    _write_config(os.path.join(path, "config.yaml"), config)


def load_circuit_tracer_file(
    path: Union[str, os.PathLike],
    *,
    activation: Optional[str] = None,
    k: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
):
    """One circuit-tracer ``layer_{i}.safetensors`` -> ``Transcoder``.

    ``activation``: ``"relu"``, ``"topk"`` (with ``k``) or None: JumpReLU when the file has a
    threshold (``activation_function.threshold`` or ``threshold``), else ReLU -- circuit-tracer's
    rule. A ``k`` tensor in the file is used when ``k`` is not given.
    """
    from tckernels.nn.transcoder import Transcoder

    path = os.fspath(path)
    sd = read_safetensors(path)
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if key not in sd:
            raise MissingKeyError(f"missing (file has keys: {', '.join(sorted(sd))})", path=path, key=key)
    b_enc, b_dec = sd["b_enc"], sd["b_dec"]
    if b_enc.dim() != 1:
        raise FormatError(f"expected [d_transcoder], got shape {tuple(b_enc.shape)}", path=path, key="b_enc")
    if b_dec.dim() != 1:
        raise FormatError(f"expected [d_model], got shape {tuple(b_dec.shape)}", path=path, key="b_dec")
    n, d = b_enc.shape[0], b_dec.shape[0]
    W_enc, W_dec = sd["W_enc"], sd["W_dec"]
    if n != d and tuple(W_enc.shape) == (d, n):  # Gemma-Scope npz orientation
        W_enc = W_enc.t()
    if n != d and tuple(W_dec.shape) == (d, n):  # circuit-tracer's older file layout
        W_dec = W_dec.t()
    check_shape(W_enc, (n, d), path, "W_enc", "[d_transcoder, d_model] from b_enc and b_dec")
    check_shape(W_dec, (n, d), path, "W_dec", "[d_transcoder, d_model] from b_enc and b_dec")
    skip = sd.get("W_skip")
    if skip is not None:
        check_shape(skip, (d, d), path, "W_skip", "[d_model, d_model]")
    thr_key = next((key for key in ("activation_function.threshold", "threshold") if key in sd), None)
    if k is None and "k" in sd:
        k = int(sd["k"].reshape(-1)[0])
    if activation is None:
        activation = "jumprelu" if thr_key is not None else "relu"
    elif activation in ("jump_relu", "jumprelu"):
        activation = "jumprelu"
        if thr_key is None:
            raise MissingKeyError("missing (needed for a JumpReLU transcoder)", path=path, key="activation_function.threshold")
    if activation not in ("relu", "jumprelu", "topk"):
        raise ValueError(f"activation must be 'relu', 'topk', 'jumprelu' or None, got {activation!r}")
    if activation == "topk" and k is None:
        raise ValueError(f"{path}: activation 'topk' needs k (from config.yaml or the k argument)")
    dtype = dtype or W_enc.dtype
    tc = Transcoder(
        d, n, d, activation, k=k if activation == "topk" else None, skip=skip is not None,
        dec_bias=True, dtype=dtype, device=device,
    )
    assign_(tc.W_enc, W_enc)
    assign_(tc.W_dec, W_dec)
    assign_(tc.b_enc, check_shape(b_enc, (n,), path, "b_enc"))
    assign_(tc.b_dec, check_shape(b_dec, (d,), path, "b_dec"))
    if skip is not None:
        assign_(tc.W_skip, skip)
    if activation == "jumprelu":
        thr = check_shape(sd[thr_key].reshape(-1) if sd[thr_key].numel() == n else sd[thr_key], (n,), path, thr_key, "[d_transcoder]")
        if not bool((thr > 0).all()):
            raise FormatError(
                "has thresholds <= 0; tckernels' JumpReLU stores log(threshold) and cannot represent them", path=path, key=thr_key
            )
        assign_(tc.log_threshold, thr.double().log())
    return tc


_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")


def load_circuit_tracer(
    path: Union[str, os.PathLike],
    layers: Optional[Iterable[int]] = None,
    *,
    activation: Optional[str] = None,
    k: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
) -> Dict[int, object]:
    """A circuit-tracer transcoder set -> ``{layer: Transcoder}``.

    ``path``: a directory with ``config.yaml`` (its ``activation``/``k`` are used unless given
    here; ``transcoders`` may list local per-layer files, relative paths taken from the
    directory) and/or ``layer_{i}.safetensors`` files; or a single ``.safetensors`` file (layer 0
    unless its name says otherwise). A cross-layer config (``model_kind: cross_layer_transcoder``)
    is refused: use :func:`load_circuit_tracer_clt`.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        m = _LAYER_FILE.match(os.path.basename(path))
        return {int(m.group(1)) if m else 0: load_circuit_tracer_file(path, activation=activation, k=k, dtype=dtype, device=device)}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    cfg_path = os.path.join(path, "config.yaml")
    cfg = _read_config(cfg_path) if os.path.isfile(cfg_path) else {}
    kind = cfg.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise FormatError(f"model_kind is {kind!r}; use load_circuit_tracer_clt for cross-layer transcoders", path=cfg_path, key="model_kind")
    activation = activation if activation is not None else cfg.get("activation")
    k = k if k is not None else cfg.get("k")
    if isinstance(cfg.get("transcoders"), list):
        files = {}
        for i, p in enumerate(cfg["transcoders"]):
            p = str(p)
            if p.startswith("hf://"):
                raise FormatError(f"lists a Hugging Face URI ({p}); download the files first", path=cfg_path, key="transcoders")
            files[i] = p if os.path.isabs(p) else os.path.join(path, p)
    else:
        files = {}
        for name in os.listdir(path):
            m = _LAYER_FILE.match(name)
            if m:
                files[int(m.group(1))] = os.path.join(path, name)
    if not files:
        raise FileNotFoundError(f"{path}: no layer_{{i}}.safetensors files")
    wanted = sorted(files) if layers is None else sorted(set(int(i) for i in layers))
    out = {}
    for i in wanted:
        if i not in files:
            raise FileNotFoundError(f"layer {i}: {os.path.join(path, f'layer_{i}.safetensors')} not found")
        tc = load_circuit_tracer_file(files[i], activation=activation, k=k, dtype=dtype, device=device)
        tc.layer = i
        out[i] = tc
    return out


# ------------------------------------------------------------------------------------------------
# cross-layer transcoders
# ------------------------------------------------------------------------------------------------


def save_circuit_tracer_clt(
    clt,
    path: Union[str, os.PathLike],
    *,
    feature_input_hook: str = DEFAULT_INPUT_HOOK,
    feature_output_hook: str = DEFAULT_OUTPUT_HOOK,
    model_name: Optional[str] = None,
    scan_name: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Write a :class:`~tckernels.nn.crosslayer.CrossLayerTranscoder` in circuit-tracer's CLT layout
    (``W_enc_{i}.safetensors``, ``W_dec_{i}.safetensors``, ``config.yaml`` with
    ``model_kind: cross_layer_transcoder``). circuit-tracer's CLT runs ReLU or JumpReLU only, has
    one ``d_model`` and reads no skip connection from these files; other configurations raise."""
    from safetensors.torch import save_file

    if clt.d_in != clt.d_out:
        raise ValueError(f"circuit-tracer CLTs have one d_model; this one has d_in={clt.d_in}, d_out={clt.d_out}")
    if clt.W_skip is not None:
        raise ValueError("circuit-tracer's CLT loader reads no skip connection from files; cannot export W_skip")
    L, N, d = clt.n_layers, clt.n_features, clt.d_out
    exported = [_export_activation(layer) for layer in clt.layers]
    if any(act == "topk" for act, _, _ in exported):
        raise ValueError("circuit-tracer's cross-layer transcoder supports ReLU and JumpReLU only, not TopK")
    has_thr = [thr is not None for _, _, thr in exported]
    if any(has_thr) and not all(has_thr):
        raise ValueError("all layers must share one activation")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for i, layer in enumerate(clt.layers):
        dt = dtype or layer.W_enc.dtype
        W_enc, b_enc = _encoder_weights(layer, dt)
        b_dec = clt.b_dec[i].detach() if clt.b_dec is not None else torch.zeros(d, dtype=dt)
        enc = {f"W_enc_{i}": W_enc, f"b_enc_{i}": b_enc, f"b_dec_{i}": b_dec.to(dt).contiguous()}
        thr = exported[i][2]
        if thr is not None:
            enc[f"threshold_{i}"] = thr.to(device=W_enc.device, dtype=dt).contiguous()
        save_file({key: t.cpu() for key, t in enc.items()}, os.path.join(path, f"W_enc_{i}.safetensors"))
        W_dec = layer.W_dec.detach().reshape(N, L - i, d).to(dt).contiguous().cpu()
        save_file({f"W_dec_{i}": W_dec}, os.path.join(path, f"W_dec_{i}.safetensors"))
    config = {
        "model_kind": "cross_layer_transcoder",
        "model_name": model_name,
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
        "scan_name": scan_name,
    }
    _write_config(os.path.join(path, "config.yaml"), config)


def load_circuit_tracer_clt(path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, device=None):
    """circuit-tracer CLT directory -> :class:`~tckernels.nn.crosslayer.CrossLayerTranscoder`
    (JumpReLU when ``threshold_0`` is present, else ReLU, as circuit-tracer decides)."""
    from tckernels.nn.crosslayer import CrossLayerTranscoder

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not a directory: {path}")
    idx = sorted(int(m.group(1)) for m in (re.match(r"^W_enc_(\d+)\.safetensors$", n) for n in os.listdir(path)) if m)
    if not idx:
        raise FileNotFoundError(f"{path}: no W_enc_{{i}}.safetensors files")
    L = len(idx)
    if idx != list(range(L)):
        missing = sorted(set(range(max(idx) + 1)) - set(idx))
        raise FileNotFoundError(f"{path}: W_enc_{{i}}.safetensors missing for layers {missing}")
    enc0_path = os.path.join(path, "W_enc_0.safetensors")
    enc0 = read_safetensors(enc0_path)
    if "W_enc_0" not in enc0:
        raise MissingKeyError("missing", path=enc0_path, key="W_enc_0")
    W0 = enc0["W_enc_0"]
    if W0.dim() != 2:
        raise FormatError(f"expected [d_transcoder, d_model], got shape {tuple(W0.shape)}", path=enc0_path, key="W_enc_0")
    N, d = W0.shape
    jump = "threshold_0" in enc0
    dtype = dtype or W0.dtype
    clt = CrossLayerTranscoder(L, d, N, d, "jumprelu" if jump else "relu", dec_bias=True, dtype=dtype, device=device)
    for i in range(L):
        enc_path = os.path.join(path, f"W_enc_{i}.safetensors")
        dec_path = os.path.join(path, f"W_dec_{i}.safetensors")
        keys = [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"] + ([f"threshold_{i}"] if jump else [])
        enc = read_safetensors(enc_path, keys)
        dec = read_safetensors(dec_path, [f"W_dec_{i}"])
        layer = clt.layers[i]
        assign_(layer.W_enc, check_shape(enc[f"W_enc_{i}"], (N, d), enc_path, f"W_enc_{i}", "[d_transcoder, d_model]"))
        assign_(layer.b_enc, check_shape(enc[f"b_enc_{i}"], (N,), enc_path, f"b_enc_{i}", "[d_transcoder]"))
        assign_(clt.b_dec[i], check_shape(enc[f"b_dec_{i}"], (d,), enc_path, f"b_dec_{i}", "[d_model]"))
        W_dec = check_shape(dec[f"W_dec_{i}"], (N, L - i, d), dec_path, f"W_dec_{i}", "[d_transcoder, n_layers - i, d_model]")
        assign_(layer.W_dec, W_dec.reshape(N, (L - i) * d))
        if jump:
            thr = enc[f"threshold_{i}"]
            thr = check_shape(thr.reshape(-1) if thr.numel() == N else thr, (N,), enc_path, f"threshold_{i}", "[d_transcoder]")
            if not bool((thr > 0).all()):
                raise FormatError("has thresholds <= 0, which log_threshold cannot represent", path=enc_path, key=f"threshold_{i}")
            assign_(layer.log_threshold, thr.double().log())
    return clt
