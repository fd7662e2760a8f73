"""The named shape sets the op and step benchmarks run at.

Each set is a transcoder's model width D, feature count N and active features k, with a token
count M per device: GPU sizes for CUDA, and for the CPU a smaller M (None: the set is not run on
the CPU, whose 2-thread runs would take hours). Smoke mode (TCK_BENCH_SMOKE=1) runs ``SMOKE``,
recorded under the name "tiny", whatever sets were asked for: Triton's interpreter and torch's
compiler both take seconds at any size there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass(frozen=True)
class ShapeSet:
    name: str
    D: int
    N: int
    k: int
    M_gpu: int
    M_cpu: Optional[int]
    note: str = ""

    def shape(self, device: str) -> Optional[Dict[str, int]]:
        """{"M", "D", "N", "k"} on ``device`` ("cpu" or "cuda"), None when the set is not run there."""
        M = self.M_cpu if device == "cpu" else self.M_gpu
        return None if M is None else dict(M=M, D=self.D, N=self.N, k=self.k)


SETS: Dict[str, ShapeSet] = {s.name: s for s in (
    ShapeSet("tiny", D=64, N=1024, k=16, M_gpu=4096, M_cpu=256, note="a unit-test size, for CI"),
    ShapeSet("gpt2", D=768, N=24576, k=32, M_gpu=8192, M_cpu=512,
             note="a GPT-2 small transcoder: 32x expansion, k=32"),
    ShapeSet("adapter", D=3584, N=8192, k=10, M_gpu=8192, M_cpu=None,
             note="a Qwen2.5-7B-width sparse adapter at L0~10, as TopK k=10"),
    ShapeSet("qwen32b", D=5120, N=12288, k=1475, M_gpu=4096, M_cpu=None,
             note="a Qwen-32B-width transcoder with a large k"),
    ShapeSet("large_sae", D=4096, N=131072, k=64, M_gpu=8192, M_cpu=None,
             note="a 131k-feature SAE on a 4096-wide model"),
)}

SMOKE = dict(M=16, D=32, N=256, k=8)


def selected(device: str) -> List[str]:
    """The sets a run measures on ``device``: $TCK_BENCH_SHAPES (comma-separated names) or every
    set that fits the device; in smoke mode "tiny" only."""
    if os.environ.get("TCK_BENCH_SMOKE") == "1":
        return ["tiny"]
    asked = [n.strip() for n in os.environ.get("TCK_BENCH_SHAPES", "").split(",") if n.strip()]
    for name in asked:
        if name not in SETS:
            raise ValueError(f"TCK_BENCH_SHAPES names {name!r}; the sets are {', '.join(SETS)}")
    names = asked or list(SETS)
    return [n for n in names if SETS[n].shape(device) is not None]


def shape_of(name: str, device: str) -> Dict[str, int]:
    if os.environ.get("TCK_BENCH_SMOKE") == "1":
        return dict(SMOKE)
    shape = SETS[name].shape(device)
    if shape is None:
        raise ValueError(f"shape set {name!r} is not run on {device}")
    return shape
