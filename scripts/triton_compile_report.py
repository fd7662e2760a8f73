#!/usr/bin/env python3
"""Compile every Triton kernel specialisation that tckernels' launchers can pick, for sm_90,
without a GPU, and report what the compiler made of each one.

For the given problem shapes (M tokens, N features, D model width, k active features) this
walks the decisions the host code makes -- the first pass's (span, CP) plan, the autotuner's
configurations left after pruning, the exact-mode passes for every power-of-two bucket of
flagged rows, the merge kernel's chunking, the ReLU encoder, the gathers and scatters -- with
the planning functions of the backend itself, and compiles each distinct specialisation
(constexprs, integer-argument specialisation, launch options) once through Triton's compiler and
ptxas. Per specialisation it reports the registers, the spill stores/loads and stack frame that
ptxas reports, the wall seconds the compile took (a fresh cache: nothing is reused), and whether
the PTX issues asynchronous copies (cp.async, or TMA bulk tensor copies).

  python3 scripts/triton_compile_report.py [--json PATH] [--jobs N] [--dtypes bf16,fp32,tf32]
                                           [--subset all|ci] [--kernel RE]

One JSON line per specialisation on stdout as it completes, then the summary: the number of
specialisations, their total compile seconds (serial, summed) and the wall seconds of the run;
--json writes all of it. Exits 1 when any specialisation spills (spill stores, spill loads or a
stack frame). --subset ci (what tests/backends/test_triton_compile.py runs) compiles one
specialisation per kernel configuration, the one with the longest lists, plus every stage-1
configuration at the longest lists _select._MAX_CP allows it; the default compiles them all
(a few minutes on two cores).

The integer arguments are specialised as Triton's JIT does it (1 becomes a constant, multiples
of 16 get a divisibility hint), and tensors are taken as 16-byte aligned, as torch allocates
them. bf16 (the training dtype) uses tensor descriptors (TMA) and pointer loads, since both
can be picked on sm_90 (pointers for misaligned inputs or TCK_TRITON_TMA=0); fp32 uses
pointers, without TF32 (torch's default) and with it ("tf32"). Biases are given (encoders have
one); a call without one is a further specialisation with one load fewer.
"""
from __future__ import annotations

import os

# compiled kernels, not the interpreter: before the backend is imported (it decides at import)
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Dict, Iterable, List, Optional, Sequence, Tuple  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import triton  # noqa: E402

from tckernels.backends.triton import _select, encode, gather, scatter  # noqa: E402
from tckernels.backends.triton._common import next_pow2  # noqa: E402

# (M, N, D, k): the target shapes
SHAPES: Tuple[Tuple[int, int, int, int], ...] = (
    (8192, 131072, 4096, 64),
    (8192, 24576, 768, 32),
    (8192, 8192, 3584, 10),
    (8192, 12288, 5120, 1475),
)
DTYPES: Tuple[str, ...] = ("bf16", "fp32", "tf32")
ARCH = 90

KERNELS = {
    "stage1_kernel": _select.stage1_kernel,
    "merge_kernel": _select.merge_kernel,
    "relu_kernel": encode.relu_kernel,
    "gather_matmul_kernel": gather.gather_matmul_kernel,
    "gather_dot_kernel": gather.gather_dot_kernel,
    "scatter_atomic_kernel": scatter.scatter_atomic_kernel,
    "scatter_sorted_kernel": scatter.scatter_sorted_kernel,
}


# ----------------------------------------------------------------------------------------------
# arguments as Triton's JIT specialises them


def ptr(dtype: str) -> Tuple[str, str]:
    return ("ptr", dtype)


def desc(dtype: str, block: Sequence[int]) -> Tuple[str, str, Tuple[int, ...]]:
    return ("desc", dtype, tuple(block))


def _arg_type(value) -> Tuple[str, bool]:
    """(signature type, divisible by 16) of one runtime argument."""
    if isinstance(value, tuple) and value[0] == "ptr":
        return "*" + value[1], True  # torch allocations are 16-byte aligned (and more)
    if isinstance(value, tuple) and value[0] == "desc":
        return f"tensordesc<{value[1]}[{', '.join(map(str, value[2]))}]>", False
    if isinstance(value, bool):
        raise TypeError("booleans are constexprs here")
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unsupported argument {value!r}")


class Spec(dict):
    """One specialisation: kernel, runtime arguments, constexprs, launch options, and the
    launches that use it ("uses")."""

    def key(self):
        types = tuple((n, _arg_type(v)) for n, v in sorted(self["args"].items()))
        consts = tuple(sorted((n, str(v)) for n, v in self["constexprs"].items()))
        opts = tuple(sorted(self["options"].items()))
        return self["kernel"], types, consts, opts


def _spec(kernel: str, args: Dict, constexprs: Dict, options: Dict, use: str) -> Spec:
    options = {k: v for k, v in options.items() if v is not None}
    options.setdefault("num_warps", 4)
    options.setdefault("num_stages", 3)
    return Spec(kernel=kernel, args=args, constexprs=constexprs, options=options, uses=[use])


def _config_options(c: "triton.Config") -> Dict:
    return {"num_warps": c.num_warps, "num_stages": c.num_stages, "maxnreg": c.maxnreg}


# ----------------------------------------------------------------------------------------------
# what the launchers pick


class _Tensor:
    """Stands in for a tensor where the host's pruning looks at one (its element size)."""

    def __init__(self, elsize: int):
        self._elsize = elsize

    def element_size(self) -> int:
        return self._elsize


# dtype names: the tensors' dtype, except "tf32": fp32 tensors with TF32 dots (torch's
# allow_tf32); "fp32" dots are then plain fp32 (CUDA cores), torch's default
_ELSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4}


def _tensor_dtype(dt: str) -> str:
    return "fp32" if dt == "tf32" else dt


def _dot_precision(dt: str) -> str:
    return "tf32" if dt == "tf32" else "ieee"


def _stage1(M, N, D, k, dt, prec, span, cp, *, from_pre, tma, configs, thr, use) -> List[Spec]:
    """stage1_kernel launches (first pass: the pruned autotuning list; exact mode: one meta)."""
    out = []
    for cfg, opts in configs:
        bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
        Darg = 1 if from_pre else D
        args = dict(
            x_ptr=desc(dt, (bm, bk)) if tma else ptr(dt),
            w_ptr=desc(dt, (bn, bk)) if tma else ptr(dt),
            pre_ptr=ptr(dt), b_ptr=ptr(dt), thr_ptr=ptr("fp32" if thr == 2 else dt), cand_ptr=ptr("i64"),
            M=M, N=N, D=Darg, k=k, m_bucket=_select._bucket(M), thr_scalar=0.0)
        consts = dict(cfg, FROM_PRE=from_pre, HAS_BIAS=True, THR=thr, SPAN=span, CP=cp, EVEN_K=Darg % bk == 0,
                      DOT_PREC=prec, USE_TMA=tma)
        out.append(_spec("stage1_kernel", args, consts, opts, use))
    return out


def _merge(NC, k, cp, dt, relu, use) -> Spec:
    meta = _select.merge_meta(NC, k, cp)
    opts = {"num_warps": meta.pop("num_warps")}
    args = dict(cand_ptr=ptr("i64"), val_ptr=ptr(dt), idx_ptr=ptr("i64"), flag_ptr=ptr("i32"), NC=NC, k=k)
    return _spec("merge_kernel", args, dict(meta, RELU=relu, BF16_FIX=False), opts, use)


def _first_pass_configs(launcher, M, span, cp, dt, prec, from_pre, tma) -> List[Tuple[Dict, Dict]]:
    named = {"M": M, "x_ptr": _Tensor(_ELSIZE[dt])}
    kw = dict(SPAN=span, CP=cp, FROM_PRE=from_pre, DOT_PREC=prec, USE_TMA=tma)
    configs = launcher.prune(launcher.configs, named, **kw) if launcher.prune else launcher.configs
    return [(dict(c.kwargs), _config_options(c)) for c in configs]


def _exact_passes(M, N, D, k, dt, prec, *, from_pre, tma, thr, relu, use) -> List[Spec]:
    """The exact-mode passes over F flagged rows, one per power-of-two bucket of F up to M
    (exact_plan depends on nothing else)."""
    KP = max(8, next_pow2(k))
    out = []
    Fb = 1
    kind = _select.score_kind(from_pre, _ELSIZE[dt], prec, tma)
    while Fb <= next_pow2(M):
        meta, span, rows = _select.exact_plan(Fb, N, KP, kind)
        cfg = {n: meta[n] for n in ("BM", "BN", "BK", "GROUP_M")}
        opts = {n: meta[n] for n in ("num_warps", "num_stages", "maxnreg") if n in meta}
        label = f"{use} exact F<={Fb}"
        out += _stage1(rows, N, D, k, dt, prec, span, KP, from_pre=from_pre, tma=tma, configs=[(cfg, opts)],
                       thr=thr, use=label)
        out.append(_merge(triton.cdiv(N, span) * KP, k, KP, dt, relu, label))
        Fb *= 2
    return out


def _topk_specs(M, N, D, k, dt, prec, from_pre) -> List[Spec]:
    """encode_topk (fused GEMM) or topk_relu (from pre): first pass, merge, exact passes."""
    KP = max(8, next_pow2(k))
    if KP > _select.MAX_FUSED_K:  # the reference selection: no Triton kernel
        return []
    op = "topk_relu" if from_pre else "encode_topk"
    span, cp = _select.plan(M, N, k, _ELSIZE[dt])
    launcher = _select._pre_launcher if from_pre else _select._gemm_launcher
    tmas = [False] if from_pre or _ELSIZE[dt] != 2 else [True, False]
    out = []
    for tma in tmas:
        use = f"{op} first pass" + (" tma" if tma else "")
        out += _stage1(M, N, D, k, dt, prec, span, cp, from_pre=from_pre, tma=tma, thr=0, use=use,
                       configs=_first_pass_configs(launcher, M, span, cp, dt, prec, from_pre, tma))
        if cp < KP:
            out += _exact_passes(M, N, D, k, dt, prec, from_pre=from_pre, tma=tma, thr=0, relu=True,
                                 use=op + (" tma" if tma else ""))
    out.append(_merge(triton.cdiv(N, span) * cp, k, cp, dt, True, f"{op} first pass"))
    return out


def _relu_specs(M, N, D, k, dt, prec) -> List[Spec]:
    """encode_relu (k_max = k): the GEMM kernel, ReLU (scalar threshold) and JumpReLU (vector),
    and the exact top-k of rows with more than k_max active entries."""
    out = []
    named = {"x_ptr": _Tensor(_ELSIZE[dt])}
    for c in encode._relu_launcher.prune(encode._relu_launcher.configs, named, DOT_PREC=prec):
        for thr_vec in (False, True):
            args = dict(x_ptr=ptr(dt), w_ptr=ptr(dt), b_ptr=ptr(dt), thr_ptr=ptr("fp32" if thr_vec else dt),
                        cnt_ptr=ptr("i32"), val_ptr=ptr(dt), idx_ptr=ptr("i32"), M=M, N=N, D=D, k_max=k,
                        thr_scalar=0.0)
            consts = dict(c.kwargs, HAS_BIAS=True, THR_VEC=thr_vec, EVEN_K=D % c.kwargs["BK"] == 0,
                          DOT_PREC=prec, BF16_FIX=False)
            out.append(_spec("relu_kernel", args, consts, _config_options(c), "encode_relu"))
    if max(8, next_pow2(k)) <= _select.MAX_FUSED_K:
        tmas = [True, False] if _ELSIZE[dt] == 2 else [False]
        for tma in tmas:
            for thr in (1, 2):
                out += _exact_passes(M, N, D, k, dt, prec, from_pre=False, tma=tma, thr=thr, relu=False,
                                     use="encode_relu over k_max" + (" tma" if tma else ""))
    return out


def _gather_scatter_specs(M, N, D, k, dt) -> List[Spec]:
    out = []
    for c in gather._gm_launcher.configs:
        for has_bias in (True, False):  # decoder forward / encoder input gradient
            args = dict(v_ptr=ptr(dt), i_ptr=ptr("i64"), w_ptr=ptr(dt), b_ptr=ptr(dt), out_ptr=ptr(dt),
                        M=M, K=k, N=N, D=D)
            consts = dict(c.kwargs, HAS_BIAS=has_bias, BF16_FIX=False)
            out.append(_spec("gather_matmul_kernel", args, consts, _config_options(c), "gather_matmul"))
    bj = gather.gather_dot_block(k)
    for c in gather._gd_launcher.configs:
        args = dict(g_ptr=ptr(dt), i_ptr=ptr("i64"), w_ptr=ptr(dt), out_ptr=ptr(dt), M=M, K=k, N=N, D=D)
        out.append(_spec("gather_dot_kernel", args, dict(c.kwargs, BJ=bj, BF16_FIX=False), _config_options(c),
                         "gather_dot"))
    for d in (D, 1):  # weight gradient, bias gradient (G = ones [M, 1])
        for c in scatter._sa_launcher.configs:
            args = dict(v_ptr=ptr(dt), i_ptr=ptr("i64"), g_ptr=ptr(dt), ws_ptr=ptr("fp32"), M=M, K=k, n_rows=N, D=d)
            out.append(_spec("scatter_atomic_kernel", args, dict(c.kwargs), _config_options(c), "scatter_matmul"))
        meta = dict(scatter._SORTED_META)
        opts = {"num_warps": meta.pop("num_warps", 4)}
        args = dict(off_ptr=ptr("i64"), src_ptr=ptr("i64"), val_ptr=ptr(dt), g_ptr=ptr(dt), out_ptr=ptr(dt),
                    n_rows=N, D=d)
        out.append(_spec("scatter_sorted_kernel", args, dict(meta, BF16_FIX=False), opts,
                         "scatter_matmul deterministic"))
    return out


def specialisations(shapes: Iterable[Tuple[int, int, int, int]] = SHAPES,
                    dtypes: Iterable[str] = DTYPES) -> List[Spec]:
    """Every distinct specialisation the launchers can pick for these shapes, each once, with
    every launch that uses it."""
    specs = []
    for M, N, D, k in shapes:
        for name in dtypes:
            dt, prec = _tensor_dtype(name), _dot_precision(name)
            found = (_topk_specs(M, N, D, k, dt, prec, from_pre=False)
                     + _topk_specs(M, N, D, k, dt, prec, from_pre=True)
                     + _relu_specs(M, N, D, k, dt, prec) + _gather_scatter_specs(M, N, D, k, dt))
            for s in found:
                s["uses"] = [f"{s['uses'][0]} ({name} M={M} N={N} D={D} k={k})"]
            specs += found
    return _dedup(specs)


def _dedup(specs: List[Spec]) -> List[Spec]:
    """Each specialisation once, with the uses of all its copies."""
    found: Dict = {}
    for s in specs:
        key = s.key()
        if key in found:
            found[key]["uses"] += [u for u in s["uses"] if u not in found[key]["uses"]]
        else:
            found[key] = s
    return list(found.values())


_KIND_DTYPE = {"tma": "bf16", "ptr": "bf16", "tf32": "tf32", "fma": "fp32", "pre": "bf16"}


def limit_specs(M: int = 8192, N: int = 131072, D: int = 4096) -> List[Spec]:
    """Stage 1 at the limits _select._MAX_CP claims: every configuration, for every way of
    making the scores it is allowed, with the longest lists it is allowed (register use grows
    with CP), whether or not the target shapes reach them."""
    out = []
    for launcher in (_select._gemm_launcher, _select._pre_launcher):
        for c in launcher.configs:
            for kind, cp in _select._MAX_CP[c].items():
                name = _KIND_DTYPE[kind]
                out += _stage1(M, N, D, cp, _tensor_dtype(name), _dot_precision(name), 1024, cp,
                               from_pre=kind == "pre", tma=kind == "tma", thr=0,
                               configs=[(dict(c.kwargs), _config_options(c))], use=f"stage 1 limit: {kind} CP={cp}")
    return out


def ci_subset(specs: List[Spec]) -> List[Spec]:
    """A representative subset: per kernel, block shape, launch options and load path, the
    specialisation with the longest candidate lists (stage 1's register use grows with CP) or
    the largest chunk (merge); one per configuration for the other kernels."""
    best: Dict = {}
    for s in specs:
        c = s["constexprs"]
        group = (s["kernel"], tuple(sorted(s["options"].items())),
                 tuple((n, c.get(n)) for n in ("BM", "BN", "BK", "BD", "BJ", "RB", "FROM_PRE", "USE_TMA", "KP")),
                 tuple(sorted(_arg_type(v)[0] for v in s["args"].values())))
        size = (c.get("CP", 0), c.get("CHUNK", 0), c.get("THR", 0))
        if group not in best or size > best[group][0]:
            best[group] = (size, s)
    return [s for _, s in best.values()]


# ----------------------------------------------------------------------------------------------
# compiling


def _worker_init(cache_root: str, shared: bool = False) -> None:
    from triton import knobs

    # fresh per worker, so every compile really runs; or one shared cache to fill (--cache)
    knobs.cache.dir = cache_root if shared else tempfile.mkdtemp(dir=cache_root)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log (registers, spills) on stdout


def _ptxas_figure(log: str, pattern: str) -> int:
    m = re.search(pattern, log)
    return int(m.group(1)) if m else 0


def compile_spec(spec: Spec, cached_ok: bool = False) -> Dict:
    """Compile one specialisation for sm_90; the figures ptxas reports and the compile time.
    ``cached_ok``: a specialisation already in the (kept) cache is reported as cached."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = KERNELS[spec["kernel"]]
    signature, constexprs, attrs = {}, dict(spec["constexprs"]), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty, divisible = _arg_type(spec["args"][name])
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = spec["args"][name]
        elif divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", ARCH, 32), options=dict(spec["options"]))
    seconds = time.perf_counter() - t0
    text = log.getvalue()
    ptx = kernel.asm["ptx"]
    result = {
        "kernel": spec["kernel"],
        "config": {**{k: (v if isinstance(v, (int, float, bool, str)) else str(v))
                      for k, v in spec["constexprs"].items()}, **spec["options"]},
        "signature": {n: signature[n] for n in fn.arg_names if signature[n] != "constexpr"},
        "registers": _ptxas_figure(text, r"Used (\d+) registers"),
        "spill_stores": _ptxas_figure(text, r"(\d+) bytes spill stores"),
        "spill_loads": _ptxas_figure(text, r"(\d+) bytes spill loads"),
        "stack_frame": _ptxas_figure(text, r"(\d+) bytes stack frame"),
        "shared_bytes": int(kernel.metadata.shared),
        "compile_seconds": round(seconds, 3),
        "async_copy": "cp.async" in ptx,  # cp.async (LDGSTS) or cp.async.bulk (TMA)
        "tma": "cp.async.bulk.tensor" in ptx,
        "uses": spec["uses"],
    }
    if "Used " not in text:
        if not cached_ok:
            raise RuntimeError(f"no ptxas log for {spec['kernel']} (cache hit?)")
        result["cached"] = True  # compiled by an earlier run into the same --cache
    result["spills"] = result["spill_stores"] > 0 or result["spill_loads"] > 0 or result["stack_frame"] > 0
    return result


def compile_all(specs: List[Spec], jobs: Optional[int] = None, out=None, cache: Optional[str] = None) -> Dict:
    """Compile specs on ``jobs`` processes; print each result as a JSON line to ``out``. ``cache``:
    compile into that Triton cache directory (kept), instead of fresh temporary ones."""
    jobs = jobs or os.cpu_count() or 1
    results = []
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        cache_root = cache or stack.enter_context(tempfile.TemporaryDirectory())
        if cache:
            os.makedirs(cache, exist_ok=True)
        init = (cache_root, cache is not None)
        with ProcessPoolExecutor(jobs, initializer=_worker_init, initargs=init) as pool:
            for r in pool.map(functools.partial(compile_spec, cached_ok=cache is not None), specs):
                results.append(r)
                if out is not None:
                    print(json.dumps(r), file=out, flush=True)
    return {
        "target": f"cuda sm_{ARCH}",
        "triton": triton.__version__,
        "specialisations": len(results),
        "compile_seconds": round(sum(r["compile_seconds"] for r in results), 3),
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "jobs": jobs,
        "spilling": sum(r["spills"] for r in results),
        "kernels": results,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the whole report there")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    p.add_argument("--subset", choices=["all", "ci"], default="all",
                   help="ci: one specialisation per kernel configuration (the longest lists), and stage 1 "
                        "at the limits of _select._MAX_CP")
    p.add_argument("--kernel", metavar="RE", help="only kernels whose name matches")
    p.add_argument("--cache", metavar="DIR", help="compile into this Triton cache directory and keep it (warms "
                   "TRITON_CACHE_DIR for a GPU run; specialisations already there are reported as cached)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of bf16, fp16, fp32 (no TF32), tf32")
    a = p.parse_args(argv)
    specs = specialisations(SHAPES, a.dtypes.split(","))
    if a.subset == "ci":
        specs = _dedup(ci_subset(specs) + limit_specs())
    if a.kernel:
        specs = [s for s in specs if re.search(a.kernel, s["kernel"])]
    report = compile_all(specs, a.jobs, out=sys.stdout, cache=a.cache)
    report["shapes"] = [dict(zip("MNDk", s)) for s in SHAPES]
    report["subset"] = a.subset
    report["dtypes"] = a.dtypes.split(",")
    summary = {k: v for k, v in report.items() if k != "kernels"}
    print(json.dumps(summary), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    for r in report["kernels"]:
        if r["spills"]:
            print(f"SPILLS: {r['kernel']} {r['config']}: {r['spill_stores']} B stores, "
                  f"{r['stack_frame']} B stack", file=sys.stderr)
    return 1 if report["spilling"] else 0


if __name__ == "__main__":
    sys.exit(main())
