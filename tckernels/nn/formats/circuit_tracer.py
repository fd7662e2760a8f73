"""circuit-tracer's transcoder formats: export and import, so features trained here can be traced there.

The target is the released circuit-tracer 0.5.0 (the version the package registry serves); every
fact below was read in its installed source (paths relative to the ``circuit_tracer`` package),
and ``tests/nn/formats/test_circuit_tracer_release.py`` runs the files through that package.

Per-layer transcoders ("transcoder set"):

* ``transcoder/single_layer_transcoder.py``: ``SingleLayerTranscoder`` has ``W_enc`` and ``W_dec``
  both ``[d_transcoder, d_model]``, ``b_enc [d_transcoder]``, ``b_dec [d_model]``, optional
  ``W_skip [d_model, d_model]``. Forward: ``pre = F.linear(x, W_enc, b_enc)``,
  ``acts = activation_function(pre)``, ``acts @ W_dec + b_dec`` plus ``x @ W_skipᵀ``.
  ``load_relu_transcoder`` (the loader of every non-Gemma-Scope file) reads all keys of the file
  into a strict ``load_state_dict`` (an unexpected key fails), takes ``d_transcoder`` from
  ``b_enc`` and ``d_model`` from ``b_dec``, and picks ``JumpReLU`` when the file has
  ``activation_function.threshold``, else ``F.relu`` -- nothing else. ``load_transcoder_set`` walks
  layers ``0..len(paths)−1`` and asserts every layer from 0 is present; ``TranscoderSet`` asserts
  one ``d_transcoder``. ``to_safetensors`` writes exactly those keys; ``TranscoderSet.to_safetensors``
  names the files ``layer_{i}.safetensors``.
* ``transcoder/activation_functions.py``: ``JumpReLU`` is ``x * (x > threshold)``. A ``TopK``
  class exists, but no loader of 0.5.0 builds it: ``utils/hf_utils.py`` (``load_transcoders``),
  ``utils/caching.py`` (``load_transcoders_from_cache``) and the loaders above never read
  ``activation`` or ``k``. So a TopK transcoder has no 0.5.0 file form: it would run there as ReLU.
* ``utils/hf_utils.py`` ``load_transcoder_from_hub(ref)`` first asks ``utils/caching.py``
  ``is_cached``: ``Path(cache_dir) / ref`` is ``ref`` itself for an absolute path, so a local
  directory holding ``config.yaml`` loads through ``load_transcoders_from_cache``, which reads
  ``config["model_kind"]``, ``config["feature_input_hook"]``, ``config["feature_output_hook"]``
  (required) and ``config.get("scan")``, and globs ``layer_*.safetensors`` (per-layer) or hands the
  directory to ``load_clt``. The key is ``scan``; nothing reads ``scan_name``.

Hook names (``replacement_model/replacement_model_transformerlens.py`` and
``replacement_model/replacement_model_nnsight.py`` with ``utils/tl_nnsight_mapping.py``): the
TransformerLens backend resolves the hooks as attribute paths inside each block and wraps every
``block.mlp`` in a module with ``hook_in`` (the MLP's input) and ``hook_out`` (its output); its
``ln2.hook_normalized`` is ``x / scale`` *before* the norm's weight (TransformerLens'
``LayerNorm``/``RMSNorm``, and circuit-tracer loads models with ``fold_ln=False``), so not what an
MLP reads. The nnsight backend looks the names up in a per-architecture table: ``mlp.hook_in`` /
``mlp.hook_out`` are the MLP's input and output for Llama, Qwen3, GPT-OSS and Gemma 3 (Gemma 2 has
only ``ln2.hook_normalized``, ``hook_resid_mid``, ``hook_mlp_out``; Qwen3 has no ``hook_mlp_out``,
no architecture but Gemma has ``ln2.hook_normalized``). tckernels' transcoders read the MLP's input
and write its output (``training``'s ``mlp_in`` → ``mlp_out``), hence the defaults
``mlp.hook_in`` → ``mlp.hook_out``: the same points in both backends.

Cross-layer transcoders (``transcoder/cross_layer_transcoder.py``): ``W_enc_{i}.safetensors`` holds
``W_enc_{i} [d_transcoder, d_model]``, ``b_enc_{i}``, ``b_dec_{i}`` and, for JumpReLU,
``threshold_{i} [d_transcoder]``; ``W_dec_{i}.safetensors`` holds
``W_dec_{i} [d_transcoder, n_layers − i, d_model]``. The output at layer j is
``Σ_{i ≤ j} acts_i @ W_dec_i[:, j − i] + b_dec_j``. ``load_clt`` counts the ``W_enc_*`` files for
``n_layers``, chooses JumpReLU when ``W_enc_0`` has ``threshold_0`` (else ReLU, the only two), and
reads only the keys named above (it never reads a skip connection).

Exporting from tckernels, and what is exact:

* ``relu`` and ``jumprelu`` transcoders, and ``batchtopk`` ones with a learned threshold (their
  inference rule ``s > threshold`` is a JumpReLU with that threshold for every feature), map
  exactly. ``topk`` (and ``batchtopk`` before its threshold is learned, whose inference is TopK)
  raise: 0.5.0 has no way to be told about them.
* A pre-encoder bias is folded into the encoder bias (``b_enc − W_enc @ b_pre``, computed in
  float64): equal up to rounding. circuit-tracer needs ``d_in == d_out`` (one ``d_model``).

Importing is as strict as 0.5.0: every layer from 0, only its keys, its shapes. JumpReLU
thresholds become ``log_threshold = log(threshold)`` (tckernels' parameter), so θ is reproduced to
within float rounding; thresholds must be > 0.
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

DEFAULT_INPUT_HOOK = "mlp.hook_in"
DEFAULT_OUTPUT_HOOK = "mlp.hook_out"
RELEASE = "circuit-tracer 0.5.0"

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

# everything circuit-tracer's strict load_state_dict accepts in a layer file
LAYER_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "activation_function.threshold")
_REQUIRED_LAYER_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


def _threshold_for_export(tc) -> Optional[torch.Tensor]:
    """The per-feature JumpReLU threshold that makes ``tc`` run the same in circuit-tracer 0.5.0,
    None for ReLU; ValueError for what 0.5.0 cannot run (its loaders know ReLU and JumpReLU only)."""
    act = tc.activation
    if act == "relu":
        return None
    if act == "jumprelu":
        return tc.log_threshold.detach().exp()
    if act == "batchtopk":
        thr = float(tc.threshold)
        if thr > 0:  # inference rule s > threshold, the same for every feature
            return torch.full((tc.n_features,), thr, dtype=torch.float64)
        raise ValueError(
            f"this BatchTopK transcoder has no learned threshold yet, so its inference is TopK(k={tc.k}), which "
            f"{RELEASE} cannot run (its loaders build ReLU or JumpReLU only and read no activation or k): "
            "train it (model.train() forward passes learn the threshold), then export; it exports as a JumpReLU"
        )
    if act == "topk":
        raise ValueError(
            f"{RELEASE} cannot run a TopK transcoder: its loaders build ReLU, or JumpReLU when the file has "
            "'activation_function.threshold', and read no 'activation' or 'k', so the export would run there as "
            "plain ReLU. Train with activation='jumprelu', 'relu' or 'batchtopk' (whose learned threshold exports "
            "exactly as a JumpReLU) to use circuit-tracer, or keep this one in tckernels' own format"
        )
    raise ValueError(f"{RELEASE} cannot run activation {act!r}; it runs ReLU and JumpReLU")


def _encoder_weights(tc, dtype) -> tuple:
    W_enc = tc.W_enc.detach()
    b_enc = tc.b_enc.detach()
    if getattr(tc, "b_pre", None) is not None:
        # W_enc (x − b_pre) + b_enc = W_enc x + (b_enc − W_enc b_pre)
        b_enc = (b_enc.double() - W_enc.double() @ tc.b_pre.detach().double()).to(b_enc.dtype)
    return W_enc.to(dtype).contiguous(), b_enc.to(dtype).contiguous()


def transcoder_to_circuit_tracer(tc, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """One ``Transcoder`` -> the tensors of a circuit-tracer ``layer_{i}.safetensors``."""
    if tc.d_in != tc.d_out:
        raise ValueError(
            f"circuit-tracer transcoders have one d_model for input and output; this one has d_in={tc.d_in}, d_out={tc.d_out}"
        )
    dtype = dtype or tc.W_enc.dtype
    thr = _threshold_for_export(tc)
    W_enc, b_enc = _encoder_weights(tc, dtype)
    b_dec = tc.b_dec.detach() if tc.b_dec is not None else torch.zeros(tc.d_out, dtype=dtype, device=W_enc.device)
    tensors = {"W_enc": W_enc, "W_dec": tc.W_dec.detach().to(dtype).contiguous(), "b_enc": b_enc, "b_dec": b_dec.to(dtype).contiguous()}
    if thr is not None:
        tensors["activation_function.threshold"] = thr.to(device=W_enc.device, dtype=dtype).contiguous()
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip.detach().to(dtype).contiguous()
    return {key: t.cpu() for key, t in tensors.items()}


def _as_layer_dict(transcoders) -> Dict[int, object]:
    if isinstance(transcoders, Mapping):
        return {int(i): t for i, t in transcoders.items()}
    return dict(enumerate(transcoders))


def _config(kind, feature_input_hook, feature_output_hook, model_name, scan) -> dict:
    return {
        "model_kind": kind,
        "model_name": model_name,  # not read by circuit-tracer: says which model the features are of
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
        "scan": scan,
    }


def save_circuit_tracer(
    transcoders,
    path: Union[str, os.PathLike],
    *,
    feature_input_hook: str = DEFAULT_INPUT_HOOK,
    feature_output_hook: str = DEFAULT_OUTPUT_HOOK,
    model_name: Optional[str] = None,
    scan: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Write transcoders for circuit-tracer 0.5.0: per-layer ones as a transcoder set
    (``path/config.yaml`` and ``path/layer_{i}.safetensors`` for layers 0..L−1, every layer from 0),
    a :class:`~tckernels.nn.crosslayer.CrossLayerTranscoder` in the cross-layer layout (see
    :func:`save_circuit_tracer_clt`). Load the directory there with
    ``ReplacementModel.from_pretrained(model, "/absolute/path")``.

    ``transcoders``: ``{layer: Transcoder}``, a list (index = layer) or a ``CrossLayerTranscoder``.
    The hooks name where features read and write in circuit-tracer's replacement model; the
    defaults ``mlp.hook_in`` → ``mlp.hook_out`` (the MLP's input and output, what tckernels trains
    on) resolve in both its TransformerLens and nnsight backends (nnsight on Gemma 2 knows only
    ``ln2.hook_normalized`` / ``hook_mlp_out``). ``scan`` names the feature visualisation.
    Activations 0.5.0 cannot run (TopK, BatchTopK without a learned threshold) raise ValueError
    rather than write a file that would run differently there.
    """
    from tckernels.nn.crosslayer import CrossLayerTranscoder

    if isinstance(transcoders, CrossLayerTranscoder):
        return save_circuit_tracer_clt(
            transcoders, path, feature_input_hook=feature_input_hook, feature_output_hook=feature_output_hook,
            model_name=model_name, scan=scan, dtype=dtype,
        )
    layers = _as_layer_dict(transcoders)
    if not layers or sorted(layers) != list(range(len(layers))):
        raise ValueError(f"circuit-tracer needs a transcoder for every layer 0..L-1, got layers {sorted(layers)}")
    files = [(i, transcoder_to_circuit_tracer(layers[i], dtype)) for i in sorted(layers)]  # every check before any write
    widths = {tensors["b_enc"].shape[0] for _, tensors in files}
    if len(widths) != 1:
        raise ValueError(f"circuit-tracer's TranscoderSet needs one d_transcoder for all layers, got {sorted(widths)}")
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for i, tensors in files:
        save_file(tensors, os.path.join(path, f"layer_{i}.safetensors"))
    _write_config(os.path.join(path, "config.yaml"),
                  _config("transcoder_set", feature_input_hook, feature_output_hook, model_name, scan))


def _check_config(cfg: dict, cfg_path: str, kind: str) -> None:
    for key in ("model_kind", "feature_input_hook", "feature_output_hook"):  # circuit-tracer indexes these
        if key not in cfg:
            raise MissingKeyError(f"missing (circuit-tracer requires it; has keys: {', '.join(sorted(cfg))})",
                                  path=cfg_path, key=key)
    if cfg["model_kind"] != kind:
        other = "load_circuit_tracer_clt" if kind == "transcoder_set" else "load_circuit_tracer"
        raise FormatError(f"model_kind is {cfg['model_kind']!r}, not {kind!r}; use {other}", path=cfg_path, key="model_kind")


def load_circuit_tracer_file(
    path: Union[str, os.PathLike],
    *,
    activation: Optional[str] = None,
    k: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
):
    """One circuit-tracer ``layer_{i}.safetensors`` -> ``Transcoder``, run as 0.5.0 runs it:
    JumpReLU when the file has ``activation_function.threshold``, else ReLU.

    Only circuit-tracer's keys (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, optional ``W_skip``,
    ``activation_function.threshold``) in its shapes are accepted, as its strict loader does.
    ``activation="topk"`` with ``k`` deliberately reads the weights as a TopK transcoder instead
    (files written for a circuit-tracer that knows TopK; 0.5.0 would run them as ReLU).
    """
    from tckernels.nn.transcoder import Transcoder

    path = os.fspath(path)
    sd = read_safetensors(path)
    for key in sorted(sd):
        if key not in LAYER_KEYS:
            raise FormatError(
                f"unexpected key; {RELEASE}'s loader (a strict load_state_dict) accepts only {', '.join(LAYER_KEYS)}",
                path=path, key=key)
    for key in _REQUIRED_LAYER_KEYS:
        if key not in sd:
            raise MissingKeyError(f"missing (file has keys: {', '.join(sorted(sd))})", path=path, key=key)
    b_enc, b_dec = sd["b_enc"], sd["b_dec"]
    if b_enc.dim() != 1:
        raise FormatError(f"expected [d_transcoder], got shape {tuple(b_enc.shape)}", path=path, key="b_enc")
    if b_dec.dim() != 1:
        raise FormatError(f"expected [d_model], got shape {tuple(b_dec.shape)}", path=path, key="b_dec")
    n, d = b_enc.shape[0], b_dec.shape[0]
    W_enc = check_shape(sd["W_enc"], (n, d), path, "W_enc", "[d_transcoder, d_model] from b_enc and b_dec")
    W_dec = check_shape(sd["W_dec"], (n, d), path, "W_dec", "[d_transcoder, d_model] from b_enc and b_dec")
    skip = sd.get("W_skip")
    if skip is not None:
        check_shape(skip, (d, d), path, "W_skip", "[d_model, d_model]")
    thr_key = "activation_function.threshold"
    has_thr = thr_key in sd
    if activation is None:
        activation = "jumprelu" if has_thr else "relu"
    elif activation in ("jump_relu", "jumprelu"):
        activation = "jumprelu"
        if not has_thr:
            raise MissingKeyError("missing (needed for a JumpReLU transcoder)", path=path, key=thr_key)
    elif activation == "relu" and has_thr:
        raise FormatError(f"has a threshold, so {RELEASE} runs this file as JumpReLU, not ReLU", path=path, key=thr_key)
    if activation not in ("relu", "jumprelu", "topk"):
        raise ValueError(f"activation must be 'relu', 'jumprelu', 'topk' or None, got {activation!r}")
    if activation == "topk" and k is None:
        raise ValueError(f"{path}: activation 'topk' needs k")
    dtype = dtype or W_enc.dtype
    tc = Transcoder(
        d, n, d, activation, k=k if activation == "topk" else None, skip=skip is not None,
        dec_bias=True, dtype=dtype, device=device,
    )
    assign_(tc.W_enc, W_enc)
    assign_(tc.W_dec, W_dec)
    assign_(tc.b_enc, b_enc)
    assign_(tc.b_dec, b_dec)
    if skip is not None:
        assign_(tc.W_skip, skip)
    if activation == "jumprelu":
        thr = sd[thr_key]
        thr = check_shape(thr.reshape(-1) if thr.numel() == n else thr, (n,), path, thr_key, "[d_transcoder]")
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
    """A circuit-tracer transcoder set -> ``{layer: Transcoder}``, refusing what 0.5.0 refuses.

    ``path``: a directory of ``layer_{i}.safetensors`` for every layer from 0, with or without
    ``config.yaml`` (when present it must name ``model_kind: transcoder_set`` and both hooks; its
    ``transcoders`` may list local per-layer files instead, relative paths taken from the
    directory); or a single ``.safetensors`` file (layer 0 unless its name says otherwise).
    ``layers`` picks some of them (all are checked). A cross-layer directory is refused: use
    :func:`load_circuit_tracer_clt`. ``activation``/``k``: see :func:`load_circuit_tracer_file`;
    a config naming an ``activation`` 0.5.0 would not run (it reads none) is refused unless the
    argument says what to do.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        m = _LAYER_FILE.match(os.path.basename(path))
        return {int(m.group(1)) if m else 0: load_circuit_tracer_file(path, activation=activation, k=k, dtype=dtype, device=device)}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    cfg_path = os.path.join(path, "config.yaml")
    cfg = {}
    if os.path.isfile(cfg_path):
        cfg = _read_config(cfg_path)
        _check_config(cfg, cfg_path, "transcoder_set")
    if activation is None and cfg.get("activation") not in (None, "relu", "jump_relu", "jumprelu"):
        raise FormatError(
            f"names activation {cfg['activation']!r}, which {RELEASE} does not read (it runs each file as ReLU, or "
            "JumpReLU with a threshold); pass activation= (and k=) to load it as that anyway",
            path=cfg_path, key="activation")
    if activation == "topk" and k is None:
        k = cfg.get("k")
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
    missing = sorted(set(range(max(files) + 1)) - set(files))
    if missing:
        raise FormatError(
            f"has layers {sorted(files)} but not {missing}; circuit-tracer needs a transcoder for every layer from 0",
            path=os.path.join(path, f"layer_{missing[0]}.safetensors"))
    wanted = sorted(files) if layers is None else sorted(set(int(i) for i in layers))
    unknown = [i for i in wanted if i not in files]
    if unknown:
        raise FileNotFoundError(f"{path}: no layer {unknown} (it has layers 0..{max(files)})")
    for i, f in files.items():
        if not os.path.isfile(f):
            raise FileNotFoundError(f"layer {i}: {f} not found")
    out, widths = {}, {}
    for i in sorted(files):
        if i in wanted:
            tc = load_circuit_tracer_file(files[i], activation=activation, k=k, dtype=dtype, device=device)
            tc.layer = i
            out[i] = tc
            widths[i] = tc.n_features
        else:
            widths[i] = read_safetensors(files[i], ["b_enc"])["b_enc"].shape[0]
    if len(set(widths.values())) != 1:
        i = next(i for i in sorted(widths) if widths[i] != widths[0])
        raise FormatError(f"has d_transcoder {widths[i]} but layer 0 has {widths[0]}; circuit-tracer's TranscoderSet "
                          "needs one for all layers", path=files[i], key="b_enc")
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
    scan: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Write a :class:`~tckernels.nn.crosslayer.CrossLayerTranscoder` in circuit-tracer's CLT layout
    (``W_enc_{i}.safetensors``, ``W_dec_{i}.safetensors``, ``config.yaml`` with
    ``model_kind: cross_layer_transcoder``); :func:`save_circuit_tracer` does the same for a CLT.
    circuit-tracer's CLT runs ReLU or JumpReLU only, has one ``d_model`` and reads no skip
    connection from these files; other configurations raise."""
    from safetensors.torch import save_file

    if clt.d_in != clt.d_out:
        raise ValueError(f"circuit-tracer CLTs have one d_model; this one has d_in={clt.d_in}, d_out={clt.d_out}")
    if clt.W_skip is not None:
        raise ValueError(f"{RELEASE}'s CLT loader reads no skip connection from files; cannot export W_skip")
    L, N, d = clt.n_layers, clt.n_features, clt.d_out
    thresholds = [_threshold_for_export(layer) for layer in clt.layers]
    has_thr = [thr is not None for thr in thresholds]
    if any(has_thr) and not all(has_thr):  # 0.5.0 decides ReLU/JumpReLU once, from threshold_0
        raise ValueError("all layers must share one activation")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for i, layer in enumerate(clt.layers):
        dt = dtype or layer.W_enc.dtype
        W_enc, b_enc = _encoder_weights(layer, dt)
        b_dec = clt.b_dec[i].detach() if clt.b_dec is not None else torch.zeros(d, dtype=dt)
        enc = {f"W_enc_{i}": W_enc, f"b_enc_{i}": b_enc, f"b_dec_{i}": b_dec.to(dt).contiguous()}
        if thresholds[i] is not None:
            enc[f"threshold_{i}"] = thresholds[i].to(device=W_enc.device, dtype=dt).contiguous()
        save_file({key: t.cpu() for key, t in enc.items()}, os.path.join(path, f"W_enc_{i}.safetensors"))
        W_dec = layer.W_dec.detach().reshape(N, L - i, d).to(dt).contiguous().cpu()
        save_file({f"W_dec_{i}": W_dec}, os.path.join(path, f"W_dec_{i}.safetensors"))
    _write_config(os.path.join(path, "config.yaml"),
                  _config("cross_layer_transcoder", feature_input_hook, feature_output_hook, model_name, scan))


def load_circuit_tracer_clt(path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, device=None):
    """circuit-tracer CLT directory -> :class:`~tckernels.nn.crosslayer.CrossLayerTranscoder`
    (JumpReLU when ``threshold_0`` is present, else ReLU, as circuit-tracer decides). A
    ``config.yaml``, when present, must say ``model_kind: cross_layer_transcoder`` and name both
    hooks; a tensor circuit-tracer would not read (it would silently drop it) is refused."""
    from tckernels.nn.crosslayer import CrossLayerTranscoder

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not a directory: {path}")
    cfg_path = os.path.join(path, "config.yaml")
    if os.path.isfile(cfg_path):
        _check_config(_read_config(cfg_path), cfg_path, "cross_layer_transcoder")
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
        enc = read_safetensors(enc_path)
        dec = read_safetensors(dec_path)
        for file, tensors, known in ((enc_path, enc, keys), (dec_path, dec, [f"W_dec_{i}"])):
            for key in sorted(tensors):
                if key not in known:
                    raise FormatError(f"unexpected key; {RELEASE}'s load_clt reads only {', '.join(known)} here "
                                      "(threshold_{i} only when W_enc_0 has threshold_0) and would drop it",
                                      path=file, key=key)
            for key in known:
                if key not in tensors:
                    raise MissingKeyError(f"missing (file has keys: {', '.join(sorted(tensors))})", path=file, key=key)
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
