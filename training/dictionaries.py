"""What ``python -m training.transcoders`` trains, behind one interface: per-layer transcoders, one
cross-layer transcoder, or per-layer bilinear transcoders, over the chosen layers of a model.

Each is an ``nn.Module`` whose ``forward(x, y)`` is the training objective on a batch of standardised
activations, ``x [tokens, layers, d_in]`` (every chosen layer's MLP input) and ``y [tokens, layers,
d_out]`` (its MLP output): it returns ``(loss, per_layer)``, the summed objective and one dict of
detached figures per layer. Being ``forward``, it is what DistributedDataParallel wraps.

The rest is what the loop needs around it:

* ``replacement(j, xs, memo)``: layer position ``j``'s MLP-output estimate from the standardised MLP
  inputs ``xs`` seen so far in one forward of the model (``xs[s]`` for positions ``s <= j``). A
  per-layer dictionary reads ``xs[j]`` only; a cross-layer transcoder sums what every source
  ``s <= j`` writes to ``j`` (``memo`` keeps each source's decoded row for the rest of that forward).
* ``codes(j, x)``: layer ``j``'s sparse activations (None for dense bilinear layers), for L0.
* ``counters()`` / ``thresholds()``: the per-feature dead-token counters and BatchTopK thresholds
  (buffers the training forward updates), which data parallel keeps equal on every rank.
* ``weights()`` / ``load_weights()``: the checkpoint's ``{name: tensor}``; ``exported(std_in, std_out)``:
  ``{directory name: module}`` with the standardisation folded in, for ``save_transcoder``.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from tckernels.nn import (BilinearMLP, BilinearTranscoder, CrossLayerTranscoder, Transcoder,
                          fold_standardization_)
from tckernels.nn import metrics as M

ARCHITECTURES = ("per_layer", "crosslayer", "bilinear")
BILINEAR_KINDS = ("transcoder", "mlp")


def _layer_record(fvu: Tensor, l0: Optional[Tensor], dead: Optional[int], losses: dict) -> dict:
    rec = {"fvu": float(fvu)}
    if l0 is not None:
        rec["l0"] = float(l0)
    if dead is not None:
        rec["dead"] = int(dead)
    rec.update({k: float(losses[k].detach()) for k in ("auxk", "sparsity", "pre_act") if k in losses})
    return rec


class _PerLayer(nn.Module):
    """What the per-layer dictionaries share: ``per_layer[j]`` serves chosen layer ``layers[j]`` alone;
    the checkpoint names its tensors ``layer_<i>.<name>`` and each layer is exported to ``layer_<i>``."""

    @property
    def per_layer(self) -> nn.ModuleList:
        raise NotImplementedError

    def replacement(self, j: int, xs: Dict[int, Tensor], memo: dict) -> Tensor:
        return self.per_layer[j](xs[j])

    def weights(self) -> Dict[str, Tensor]:
        return {f"layer_{i}.{k}": v for i, m in zip(self.layers, self.per_layer) for k, v in m.state_dict().items()}

    def load_weights(self, weights: Dict[str, Tensor]) -> None:
        for i, m in zip(self.layers, self.per_layer):
            own = {k[len(f"layer_{i}."):]: v for k, v in weights.items() if k.startswith(f"layer_{i}.")}
            m.load_state_dict(own)  # RuntimeError names what does not fit

    def exported(self, std_in: list, std_out: list) -> Dict[str, nn.Module]:
        return {f"layer_{i}": fold_standardization_(copy.deepcopy(m).cpu(), std_in[j], std_out[j])
                for j, (i, m) in enumerate(zip(self.layers, self.per_layer))}


class PerLayerTranscoders(_PerLayer):
    """One :class:`~tckernels.nn.Transcoder` per chosen layer, trained together from one model forward."""

    def __init__(self, layers: List[int], transcoders: List[Transcoder]):
        super().__init__()
        self.layers = list(layers)
        self.transcoders = nn.ModuleList(transcoders)

    @property
    def per_layer(self) -> nn.ModuleList:
        return self.transcoders

    def forward(self, x: Tensor, y: Tensor):
        total, per_layer = 0.0, []
        for j, tc in enumerate(self.transcoders):
            out = tc.forward_with_aux(x[:, j], y[:, j])  # also counts each feature's tokens since it fired
            total = total + out.losses["loss"]
            per_layer.append(_layer_record(out.metrics["fvu"], out.metrics["l0"], out.metrics["dead_features"],
                                           out.losses))
        return total, per_layer

    def set_l1_coefficient(self, value: float) -> None:
        for tc in self.transcoders:
            tc.l1_coefficient = value

    def codes(self, j: int, x: Tensor):
        return self.transcoders[j].encode(x)

    def dead_fractions(self) -> List[float]:
        return [float(tc.dead_mask().float().mean()) for tc in self.transcoders]

    def counters(self) -> List[Tensor]:
        return [tc.tokens_since_fired for tc in self.transcoders]

    def thresholds(self) -> List[Tensor]:
        return [tc.threshold for tc in self.transcoders if tc.threshold is not None]



class CrossLayer(nn.Module):
    """One :class:`~tckernels.nn.CrossLayerTranscoder` over the chosen layers, in their order: the
    features read at chosen layer ``j`` write to it and to every later chosen layer."""

    def __init__(self, layers: List[int], clt: CrossLayerTranscoder):
        super().__init__()
        self.layers = list(layers)
        self.clt = clt

    def forward(self, x: Tensor, y: Tensor):
        n = len(self.layers)
        xs, ys = [x[:, j] for j in range(n)], [y[:, j] for j in range(n)]
        out = self.clt.forward_with_aux(xs, ys)
        per_layer = []
        for j, src in enumerate(self.clt.layers):
            fvu = M.fvu(out.outputs[j].detach(), ys[j])
            l0 = M.l0(out.acts[j].values.detach())
            dead = M.count_dead(src.tokens_since_fired, src.config.dead_tokens_threshold)
            per_layer.append(_layer_record(fvu, l0, dead, {}))
        # the objective's terms are the whole transcoder's: reported once, on the first layer
        per_layer[0].update({k: float(out.losses[k].detach()) for k in ("auxk", "sparsity", "pre_act")
                             if k in out.losses})
        return out.losses["loss"], per_layer

    def set_l1_coefficient(self, value: float) -> None:
        self.clt.l1_coefficient = value

    def replacement(self, j: int, xs: Dict[int, Tensor], memo: dict) -> Tensor:
        L, d = self.clt.n_layers, self.clt.d_out
        y = None
        for s in range(j + 1):
            if s not in memo:  # source s's decoded row over its targets s..L-1, once per model forward
                src = self.clt.layers[s]
                memo[s] = src.decode(src.encode(xs[s])).unflatten(-1, (L - s, d))
            part = memo[s][..., j - s, :]
            y = part if y is None else y + part
        if self.clt.b_dec is not None:
            y = y + self.clt.b_dec[j]
        if self.clt.W_skip is not None:
            y = y + xs[j] @ self.clt.W_skip[j].t()
        return y

    def codes(self, j: int, x: Tensor):
        return self.clt.layers[j].encode(x)

    def dead_fractions(self) -> List[float]:
        return [float(src.dead_mask().float().mean()) for src in self.clt.layers]

    def counters(self) -> List[Tensor]:
        return [src.tokens_since_fired for src in self.clt.layers]

    def thresholds(self) -> List[Tensor]:
        return [src.threshold for src in self.clt.layers if src.threshold is not None]

    def weights(self) -> Dict[str, Tensor]:
        return {f"crosslayer.{k}": v for k, v in self.clt.state_dict().items()}

    def load_weights(self, weights: Dict[str, Tensor]) -> None:
        self.clt.load_state_dict({k[len("crosslayer."):]: v for k, v in weights.items() if k.startswith("crosslayer.")})

    def exported(self, std_in: list, std_out: list) -> Dict[str, nn.Module]:
        return {"crosslayer": fold_standardization_(copy.deepcopy(self.clt).cpu(), std_in, std_out)}


class PerLayerBilinear(_PerLayer):
    """One dense bilinear layer per chosen layer: :class:`~tckernels.nn.BilinearTranscoder` (the
    published Pythia transcoders' class) or :class:`~tckernels.nn.BilinearMLP` (``head(left(x) ⊙
    right(x))``). The objective is the reconstruction alone (``mse`` or ``fvu``), summed over layers."""

    def __init__(self, layers: List[int], modules: List[nn.Module], reconstruction_loss: str = "mse"):
        super().__init__()
        self.layers = list(layers)
        self.bilinear = nn.ModuleList(modules)
        self.reconstruction_loss = reconstruction_loss

    @property
    def per_layer(self) -> nn.ModuleList:
        return self.bilinear

    def forward(self, x: Tensor, y: Tensor):
        total, per_layer = 0.0, []
        for j, m in enumerate(self.bilinear):
            y_hat = m(x[:, j])
            mse, fvu = M.mse(y_hat, y[:, j]), M.fvu(y_hat, y[:, j])
            total = total + (mse if self.reconstruction_loss == "mse" else fvu)
            per_layer.append(_layer_record(fvu.detach(), None, None, {}))
        return total, per_layer

    def set_l1_coefficient(self, value: float) -> None:
        pass  # no sparsity term

    def codes(self, j: int, x: Tensor):
        return None

    def dead_fractions(self) -> Optional[List[float]]:
        return None

    def counters(self) -> List[Tensor]:
        return []

    def thresholds(self) -> List[Tensor]:
        return []



def build_dictionary(architecture: str, layers: List[int], d_in: int, d_out: int, n_features: int,
                     transcoder_kwargs: dict, *, bilinear_kind: str = "transcoder", reconstruction_loss: str = "mse",
                     seed: int = 0, device=None) -> nn.Module:
    """The dictionary of ``architecture`` over ``layers``, initialised from ``seed`` (each layer its own
    draw, so two runs with one seed start from the same weights)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    n = len(layers)
    if architecture == "per_layer":
        tcs = []
        for j in range(n):
            tc = Transcoder(d_in, n_features, d_out, device=device, init=False, **transcoder_kwargs)
            # the encoder comes from its seeded generator, the decoder from torch's global RNG: seed both
            torch.manual_seed(seed * 1000 + j)
            tc.reset_parameters(seed=seed * 1000 + j)
            tcs.append(tc)
        return PerLayerTranscoders(layers, tcs)
    if architecture == "crosslayer":
        kw = dict(transcoder_kwargs)
        activation = kw.pop("activation")
        torch.manual_seed(seed)
        clt = CrossLayerTranscoder(n, d_in, n_features, d_out, activation, device=device, **kw)
        for s, src in enumerate(clt.layers):
            torch.manual_seed(seed * 1000 + s)
            src.reset_parameters(seed=seed * 1000 + s)
        return CrossLayer(layers, clt)
    if bilinear_kind not in BILINEAR_KINDS:
        raise ValueError(f"bilinear_kind must be one of {BILINEAR_KINDS}, got {bilinear_kind!r}")
    mods = []
    for j in range(n):
        torch.manual_seed(seed * 1000 + j)
        if bilinear_kind == "transcoder":
            mods.append(BilinearTranscoder(d_in, n_features, d_out, bias=True, device=device))
        else:
            mods.append(BilinearMLP(d_in, n_features, d_out, bias=True, device=device))
    return PerLayerBilinear(layers, mods, reconstruction_loss)
