"""Standardised activations for transcoder training, and folding them back into the weights.

Transcoders are often trained on standardised activations, ``x' = (x − μ_in)/σ_in`` in and
``y' = (y − μ_out)/σ_out`` as the target, so that one learning rate and one sparsity coefficient
fit layers of very different scales. The saved transcoder should run on the RAW activations, so
after training :func:`fold_standardization_` rewrites its weights in place such that

    folded(x) = σ_out ⊙ trained((x − μ_in)/σ_in) + μ_out

exactly, up to floating-point rounding, with identical pre-activations (so TopK, BatchTopK and
JumpReLU select the same features).

Estimation (:class:`Standardizer`): feed it the first batches of activations; it keeps a
streaming mean and sum of squared deviations per dimension in float64, merging each batch's
own two-pass statistics with Chan et al.'s pairwise update (no ``E[x²] − E[x]²`` cancellation,
which loses everything for activations with large means). Two kinds of σ:

- ``scale="dim"``: one σ per dimension, the population standard deviation (``correction=0``).
- ``scale="layer"``: one scalar σ for the layer, the RMS over tokens AND dimensions of the
  values centred by their per-dimension mean: ``σ² = mean_j Var(x_j)``. This keeps the relative
  scale of the dimensions (their geometry) and only fixes the overall size.

``center=False`` sets μ = 0 and measures spread about zero instead (the RMS of the raw values).
Every σ is clamped to at least ``eps`` (absolute, in the activations' units), so a constant
dimension standardises to 0 instead of dividing by zero.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from tckernels.nn.bilinear import BilinearMLP, BilinearTranscoder
from tckernels.nn.crosslayer import CrossLayerTranscoder
from tckernels.nn.transcoder import Transcoder

__all__ = ["Standardization", "Standardizer", "fold_standardization_"]

F64 = torch.float64
SCALES = ("dim", "layer")


# eq=False: tensors have no single truth value, so field-wise == would not work anyway
@dataclass(frozen=True, eq=False)
class Standardization:
    """``x' = (x − mean)/std``: ``mean [d]``; ``std [d]`` (per dimension) or ``[]`` (one per layer).

    Both are stored in float64. :meth:`transform` and :meth:`inverse` compute in float32 (float64
    for float64 inputs) on the input's device and return the input's dtype.
    """

    mean: Tensor
    std: Tensor

    def __post_init__(self):
        mean, std = self.mean, self.std
        if not isinstance(mean, Tensor) or not isinstance(std, Tensor):
            raise TypeError("Standardization: mean and std must be torch.Tensors")
        if mean.dim() != 1 or mean.numel() == 0:
            raise ValueError(f"Standardization: mean must be 1-D [d], got shape {tuple(mean.shape)}")
        if std.dim() != 0 and tuple(std.shape) != tuple(mean.shape):
            raise ValueError(
                f"Standardization: std must be a scalar or have mean's shape {tuple(mean.shape)}, got {tuple(std.shape)}"
            )
        mean, std = mean.detach().to(F64), std.detach().to(F64)
        if not bool(torch.isfinite(mean).all()):
            raise ValueError("Standardization: mean must be finite")
        if not bool((torch.isfinite(std) & (std > 0)).all()):
            raise ValueError("Standardization: std must be finite and > 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def per_layer(self) -> bool:
        """True when σ is one scalar for the whole layer."""
        return self.std.dim() == 0

    def _params(self, x: Tensor, name: str) -> Tuple[Tensor, Tensor, torch.dtype]:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have last dimension d = {self.dim}, got shape {tuple(x.shape)}")
        dt = torch.promote_types(x.dtype, torch.float32)
        return self.mean.to(x.device, dt), self.std.to(x.device, dt), dt

    def transform(self, x: Tensor) -> Tensor:
        """Raw ``x [..., d]`` -> standardised ``(x − mean)/std``."""
        mean, std, dt = self._params(x, "x")
        return ((x.to(dt) - mean) / std).to(x.dtype)

    def inverse(self, y: Tensor) -> Tensor:
        """Standardised ``y [..., d]`` -> raw ``y·std + mean``."""
        mean, std, dt = self._params(y, "y")
        return (y.to(dt) * std + mean).to(y.dtype)

    def to_vectors(self, device=None) -> Tuple[Tensor, Tensor]:
        """``(mean [d], std [d])`` in float64, a per-layer σ broadcast over the dimensions."""
        return self.mean.to(device), self.std.to(device).expand(self.dim).clone()


class Standardizer:
    """Streaming estimate of a :class:`Standardization` from batches ``[..., d]``; see the module
    docstring for ``scale`` ("dim" | "layer"), ``center`` and ``eps``.

    Usage::

        st = Standardizer(d)
        for x in first_batches:
            st.update(x)  # or update(x, mask): padding tokens do not count
        norm = st.compute()  # a Standardization; train on norm.transform(x)
    """

    def __init__(self, d: int, *, scale: str = "dim", center: bool = True, eps: float = 1e-6):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d must be a positive int, got {d!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.d, self.scale, self.center, self.eps = d, scale, bool(center), float(eps)
        self.n_tokens = 0
        self._mean: Optional[Tensor] = None  # [d] float64, running mean
        self._m2: Optional[Tensor] = None  # [d] float64, running sum of squared deviations from it

    @torch.no_grad()
    def update(self, x: Tensor, mask: Optional[Tensor] = None) -> "Standardizer":
        """Add the tokens of ``x [..., d]`` (those where the bool ``mask [...]`` is True). Returns self."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point torch.Tensor")
        if x.dim() < 1 or x.shape[-1] != self.d:
            raise ValueError(f"x must have last dimension d = {self.d}, got shape {tuple(x.shape)}")
        x2 = x.detach().reshape(-1, self.d)
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool of shape {tuple(x.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}")
            x2 = x2[mask.reshape(-1).to(x2.device)]
        n_b = x2.shape[0]
        if n_b == 0:
            return self
        x2 = x2.to(F64)
        mean_b = x2.mean(0)
        m2_b = (x2 - mean_b).square().sum(0)  # two-pass within the batch
        if self._mean is None:
            self._mean, self._m2 = mean_b, m2_b
        else:
            # Chan et al.: merge (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b)
            mean_b, m2_b = mean_b.to(self._mean.device), m2_b.to(self._mean.device)
            n_a, n = self.n_tokens, self.n_tokens + n_b
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (n_b / n)
            self._m2 = self._m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.n_tokens += n_b
        return self

    def compute(self) -> Standardization:
        """The :class:`Standardization` of the tokens seen so far."""
        if self.n_tokens == 0:
            raise ValueError("Standardizer.compute: no tokens seen yet (call update first)")
        n = self.n_tokens
        var = self._m2 / n  # population variance per dimension
        if self.center:
            mean = self._mean
        else:
            # spread about zero: E[x²] = Var + mean², a sum of non-negative terms (no cancellation)
            var = var + self._mean.square()
            mean = torch.zeros_like(self._mean)
        if self.scale == "layer":
            var = var.mean()
        return Standardization(mean.cpu(), var.sqrt().clamp_min(self.eps).cpu())


# -------------------------------------------------------------------------------------------------
# folding
# -------------------------------------------------------------------------------------------------


def _vectors(s: Optional[Standardization], d: int, device, what: str) -> Tuple[Tensor, Tensor]:
    """``(mean [d], std [d])`` float64 on ``device``; identity (0, 1) for None."""
    if s is None:
        return torch.zeros(d, dtype=F64, device=device), torch.ones(d, dtype=F64, device=device)
    if not isinstance(s, Standardization):
        raise TypeError(f"{what} must be a Standardization or None, got {type(s).__name__}")
    if s.dim != d:
        raise ValueError(f"{what} has d = {s.dim} but the module's dimension there is {d}")
    return s.to_vectors(device)


def _per_layer(s, n_layers: int, what: str) -> List[Optional[Standardization]]:
    if s is None:
        return [None] * n_layers
    if isinstance(s, Standardization) or not isinstance(s, Sequence):
        raise TypeError(f"{what} must be a sequence of {n_layers} Standardizations (or None), got {type(s).__name__}")
    s = list(s)
    if len(s) != n_layers:
        raise ValueError(f"{what} must hold one Standardization per layer ({n_layers}), got {len(s)}")
    return s


def _f64(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(F64)


def _fold_encoder(W_enc: Tensor, b_enc: Tensor, b_pre: Optional[Tensor], mu: Tensor, sd: Tensor):
    """New ``(W_enc, b_enc, b_pre)`` (float64) for raw inputs, with the same pre-activations.

    s = W_enc·((x − μ)/σ − b_pre) + b_enc = (W_enc/σ)·(x − (μ + σ⊙b_pre)) + b_enc, so with a
    pre-encoder bias the mean moves into it (the subtraction then happens in input space, before
    the GEMM); without one it moves into b_enc: b_enc − (W_enc/σ)·μ.
    """
    W = _f64(W_enc) / sd
    if b_pre is not None:
        return W, _f64(b_enc), mu + sd * _f64(b_pre)
    return W, _f64(b_enc) - W @ mu, None


def _no_bias_check(const: Tensor, where: str) -> None:
    if bool((const != 0).any()):
        raise ValueError(
            f"{where} has no output bias, but the folded map needs the constant "
            "μ_out + σ_out⊙(bias) − σ_out⊙W_skip·(μ_in/σ_in), which is nonzero here "
            f"(max |·| = {float(const.abs().max()):.3g}). Train with an output bias (dec_bias=True / bias=True), "
            "or standardise without centring (Standardizer(center=False)) on that side."
        )


@torch.no_grad()
def _copy_(dst: Tensor, src: Tensor) -> None:
    dst.copy_(src.to(dst.dtype))


def _without_decoder_norm(tc: Transcoder) -> None:
    # The folded decoder rows are σ_out⊙w_i, no longer unit norm. Record that in the config (which
    # save_transcoder writes), so that nothing takes normalize_decoder=True as a promise about them.
    if tc._cfg.normalize_decoder:
        tc._cfg = dataclasses.replace(tc._cfg, normalize_decoder=False)


@torch.no_grad()
def _fold_transcoder_(tc: Transcoder, inp, out) -> Transcoder:
    dev = tc.W_enc.device
    mu_i, sd_i = _vectors(inp, tc.d_in, dev, "input")
    mu_o, sd_o = _vectors(out, tc.d_out, dev, "output")
    W_enc, b_enc, b_pre = _fold_encoder(tc.W_enc, tc.b_enc, tc.b_pre, mu_i, sd_i)
    # y = σ_out⊙(W_decᵀf + b_dec + W_skip·(x − μ_in)/σ_in) + μ_out
    W_dec = _f64(tc.W_dec) * sd_o
    const = mu_o.clone()
    if tc.b_dec is not None:
        const += sd_o * _f64(tc.b_dec)
    W_skip = None
    if tc.W_skip is not None:
        W_skip = sd_o[:, None] * _f64(tc.W_skip) / sd_i
        const -= W_skip @ mu_i
    if tc.b_dec is None:
        _no_bias_check(const, "this Transcoder (dec_bias=False)")
    # every check passed: now write (a failed fold leaves the module untouched)
    _copy_(tc.W_enc, W_enc)
    _copy_(tc.b_enc, b_enc)
    if b_pre is not None:
        _copy_(tc.b_pre, b_pre)
    if out is not None:
        _copy_(tc.W_dec, W_dec)
        _without_decoder_norm(tc)
    if tc.b_dec is not None:
        _copy_(tc.b_dec, const)
    if W_skip is not None:
        _copy_(tc.W_skip, W_skip)
    return tc


@torch.no_grad()
def _fold_clt_(clt: CrossLayerTranscoder, inp, out) -> CrossLayerTranscoder:
    L, d_in, d_out = clt.n_layers, clt.d_in, clt.d_out
    dev = clt.layers[0].W_enc.device
    ins = [_vectors(s, d_in, dev, f"input[{i}]") for i, s in enumerate(_per_layer(inp, L, "input"))]
    outs = [_vectors(s, d_out, dev, f"output[{j}]") for j, s in enumerate(_per_layer(out, L, "output"))]
    # encoders: source layer ℓ reads x_ℓ, standardised by input[ℓ]
    enc = [_fold_encoder(layer.W_enc, layer.b_enc, layer.b_pre, *ins[src]) for src, layer in enumerate(clt.layers)]
    # decoders: the block of source ℓ for target j (columns (j − ℓ)·d_out ...) is scaled by σ_out[j]
    dec = [
        _f64(layer.W_dec) * torch.cat([outs[j][1] for j in range(src, L)])
        for src, layer in enumerate(clt.layers)
    ]
    const = torch.stack([mu for mu, _ in outs])  # [L, d_out]
    sd_o = torch.stack([sd for _, sd in outs])
    if clt.b_dec is not None:
        const += sd_o * _f64(clt.b_dec)
    W_skip = None
    if clt.W_skip is not None:  # target j's skip reads x_j
        W_skip = torch.stack([sd_o[j][:, None] * _f64(clt.W_skip[j]) / ins[j][1] for j in range(L)])
        const -= torch.stack([W_skip[j] @ ins[j][0] for j in range(L)])
    if clt.b_dec is None:
        _no_bias_check(const, "this CrossLayerTranscoder (dec_bias=False)")
    for layer, (W_enc, b_enc, b_pre), W_dec in zip(clt.layers, enc, dec):
        _copy_(layer.W_enc, W_enc)
        _copy_(layer.b_enc, b_enc)
        if b_pre is not None:
            _copy_(layer.b_pre, b_pre)
        if out is not None:
            _copy_(layer.W_dec, W_dec)
            _without_decoder_norm(layer)
    if clt.b_dec is not None:
        _copy_(clt.b_dec, const)
    if W_skip is not None:
        _copy_(clt.W_skip, W_skip)
    return clt


def _fold_head(lin: nn.Linear, out, where: str):
    """New ``(weight, bias)`` of an output Linear for σ_out⊙lin(h) + μ_out (not yet written)."""
    mu_o, sd_o = _vectors(out, lin.out_features, lin.weight.device, "output")
    W = _f64(lin.weight) * sd_o[:, None]
    const = mu_o + (0 if lin.bias is None else sd_o * _f64(lin.bias))
    if lin.bias is None:
        _no_bias_check(const, where)
    return W, const


@torch.no_grad()
def _fold_bilinear_transcoder_(m: BilinearTranscoder, inp, out) -> BilinearTranscoder:
    scale = None
    if inp is not None:
        mu, sd = _vectors(inp, m.n_inputs, m.W_right.weight.device, "input")
        # hidden(x') = (Σ_i x'_i)·W_right x'. The sum weights every input by 1 and W_right has no
        # bias, so (x − μ)/σ folds in only when μ = 0 and σ is one scalar: hidden(x/σ) = hidden(x)/σ².
        if bool((mu != 0).any()) or bool((sd != sd[0]).any()):
            raise NotImplementedError(
                "BilinearTranscoder computes (Σ_i x_i)·W_right x: its input sum has fixed unit weights "
                "and W_right no bias, so an input standardisation folds in exactly only with mean 0 and "
                "one scalar std (Standardizer(scale='layer', center=False)); got "
                + ("a nonzero mean" if bool((mu != 0).any()) else "a per-dimension std")
            )
        scale = float(sd[0])
    W_left, b_left = _fold_head(m.W_left, out, "this BilinearTranscoder (bias=False)")
    if scale is not None:
        _copy_(m.W_right.weight, _f64(m.W_right.weight) / scale**2)
    _copy_(m.W_left.weight, W_left)
    if m.W_left.bias is not None:
        _copy_(m.W_left.bias, b_left)
    return m


@torch.no_grad()
def _fold_bilinear_mlp_(m: BilinearMLP, inp, out) -> BilinearMLP:
    mu, sd = _vectors(inp, m.n_inputs, m.left.weight.device, "input")
    # left((x − μ)/σ) = (W/σ)·x + (b − (W/σ)·μ), the same for right: exact given biases (or μ = 0)
    new = []
    for lin, name in ((m.left, "left"), (m.right, "right")):
        W = _f64(lin.weight) / sd
        b = -(W @ mu) + (0 if lin.bias is None else _f64(lin.bias))
        if lin.bias is None and bool((b != 0).any()):
            raise ValueError(
                f"this BilinearMLP's {name} layer has no bias, so a centred input standardisation (mean ≠ 0) "
                "cannot be folded into it; use bias=True or Standardizer(center=False)"
            )
        new.append((lin, W, b))
    W_head, b_head = _fold_head(m.head, out, "this BilinearMLP's head (head_bias=False)")
    for lin, W, b in new:
        _copy_(lin.weight, W)
        if lin.bias is not None:
            _copy_(lin.bias, b)
    _copy_(m.head.weight, W_head)
    if m.head.bias is not None:
        _copy_(m.head.bias, b_head)
    return m


def fold_standardization_(module: nn.Module, input=None, output=None) -> nn.Module:
    """Rewrite ``module``, trained on standardised activations, to run on raw ones (in place;
    returns it): afterwards ``module(x) = output.inverse(trained(input.transform(x)))``.

    ``input`` / ``output``: a :class:`Standardization` (None: that side was not standardised); for
    a :class:`~tckernels.nn.CrossLayerTranscoder` a sequence with one per layer (``input[ℓ]`` for
    source layer ℓ's input, ``output[j]`` for target layer j). Supported:

    - :class:`~tckernels.nn.Transcoder` (every activation; ``pre_bias``, ``skip``, ``dec_bias``):
      ``W_enc ← W_enc/σ_in``; then ``b_pre ← μ_in + σ_in⊙b_pre`` if there is a pre-encoder bias,
      else ``b_enc ← b_enc − (W_enc/σ_in)·μ_in``; ``W_dec ← W_dec⊙σ_out`` (each row);
      ``W_skip ← diag(σ_out)·W_skip·diag(1/σ_in)``;
      ``b_dec ← σ_out⊙b_dec + μ_out − W_skip_new·μ_in``. The pre-activations are unchanged, so the
      JumpReLU thresholds, the BatchTopK threshold and every TopK selection stay valid as they are.
      Without ``b_dec`` that last constant must be zero (μ_out = 0, and μ_in = 0 with a skip),
      else ValueError.
    - :class:`~tckernels.nn.CrossLayerTranscoder`: the same per source layer (encoder) and target
      layer (its decoder blocks, ``b_dec[j]``, ``W_skip[j]``).
    - :class:`~tckernels.nn.BilinearMLP`: input into ``left``/``right`` (their biases needed when
      μ_in ≠ 0), output into ``head``.
    - :class:`~tckernels.nn.BilinearTranscoder`: output into ``W_left``; input only when μ_in = 0
      and σ_in is one scalar (``W_right ← W_right/σ_in²``), else NotImplementedError: its hidden
      layer ``(Σ_i x_i)·W_right x`` cannot absorb a shift or a per-dimension scale.

    Decoder norm: folding ``σ_out`` in leaves decoder rows of norm ``‖σ_out⊙w_i‖``, not 1. A
    (cross-layer) transcoder configured with ``normalize_decoder=True`` therefore comes back with
    ``normalize_decoder=False`` in its config (and so in what ``save_transcoder`` writes): the
    folded module is for inference on raw activations; do not call ``normalize_decoder_()`` or
    decoder-norm hooks on it (that would undo the fold). To train further with a unit-norm
    decoder, keep training the unfolded module on standardised data and fold again at the end.

    Raises before writing anything, so a failed call leaves ``module`` untouched.
    """
    if isinstance(module, Transcoder):
        return _fold_transcoder_(module, input, output)
    if isinstance(module, CrossLayerTranscoder):
        return _fold_clt_(module, input, output)
    if isinstance(module, BilinearTranscoder):
        return _fold_bilinear_transcoder_(module, input, output)
    if isinstance(module, BilinearMLP):
        return _fold_bilinear_mlp_(module, input, output)
    raise TypeError(
        "fold_standardization_ supports Transcoder, CrossLayerTranscoder, BilinearTranscoder and "
        f"BilinearMLP, got {type(module).__name__}"
    )
