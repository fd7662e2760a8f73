"""The benchmark report: every bench/results/*.json as one markdown file and PNG figures.

    python -m bench.report            # write bench/results/report.md and bench/results/report_*.png
    python -m bench.report --readme   # ... and README.md's performance section
    python -m bench.report --check    # exit 1 when report.md or README's section is not what the JSON gives

Every result file is read as the one results format (a list of figures, each a provider at a shape
set and mode, with its baseline, speed-up and target). The GPU suites of bench/gpu.py write figures
of their own (each with its "measured" value), read through one adapter (``_gpu_figures``); a file
in neither is an error naming it.

The figures need matplotlib, the ``bench`` extra: ``pip install -e ".[bench]"``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
README = ROOT / "README.md"
REPORT = "report.md"
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"

# The keys of one figure of the results format; an adapter fills what its file has, the rest is None.
FIGURE_KEYS = ("family", "op", "provider", "dtype", "shape_set", "shape", "mode", "median_s", "q25_s", "q75_s",
               "tflops", "gbps", "baseline", "speedup", "peak_bytes", "target", "target_met", "error")
FAMILIES = ("encode", "select", "decode", "gather", "scatter", "step", "loop", "adapter")
# step, loop and adapter figures are whole training steps or model runs: one figure for all of them
STEP_FAMILIES = ("step", "loop", "adapter")
# bench/test_adapter_overhead.py: the shape set of the adapters against the plain model; its feature
# sweep's shape sets are "f<F>"
ADAPTER_SET = "adapter"


@dataclass
class Source:
    """One result file, read into the results format."""
    file: str
    suite: str
    device: str
    mode: Optional[str]
    rounds: Optional[object]  # a count, or one per shape set ("96 (tiny), 6 (gpt2)")
    environment: dict
    figures: List[dict] = field(default_factory=list)
    schema: str = "results format"


def figure(**values) -> dict:
    """A figure of the results format. ``extra`` holds what a suite measures beyond the format's
    keys (tokens/s, a time relative to the baseline, a note), shown where the report has a place
    for it."""
    unknown = set(values) - set(FIGURE_KEYS) - {"extra"}
    if unknown:
        raise ValueError(f"not keys of a figure: {sorted(unknown)}")
    out = {k: values.get(k) for k in FIGURE_KEYS}
    out["extra"] = dict(values.get("extra") or {})
    return out


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------


def _derived(f: dict) -> dict:
    """A figure of the results format with its ``extra`` and what it implies beyond its keys:
    tokens/s of a bridging step (shape M: tokens per step), the time relative to the plain model of
    an adapter figure."""
    f = figure(**{k: f.get(k) for k in FIGURE_KEYS}, extra=f.get("extra"))
    if f["op"] == "bridging_step" and f["median_s"] and (f["shape"] or {}).get("M"):
        f["extra"]["tokens_per_s"] = f["shape"]["M"] / f["median_s"]
    if f["family"] == "adapter" and f["baseline"] == "plain" and f["speedup"]:
        f["extra"]["time_vs_baseline"] = 1 / f["speedup"]
    return f


def _from_results_format(name: str, data: dict) -> Source:
    rounds = data.get("rounds")
    if isinstance(rounds, dict):  # the shape sets ran different numbers of rounds
        rounds = ", ".join(f"{n} ({s})" for s, n in rounds.items())
    return Source(name, data["suite"], data["device"], data.get("mode"), rounds,
                  data.get("environment", {}), [_derived(f) for f in data["figures"]])


GPU_SUITES = ("gpu_kernels", "gpu_transcoder_step")
GPU_FAMILY = {"topk_relu": "select", "encode_topk": "encode", "gather_matmul": "gather", "gather_dot": "gather",
              "scatter_matmul": "scatter", "sparse_decode": "decode", "transcoder_step": "step"}


def _gpu_figures(name: str, data: dict) -> Source:
    """bench/gpu.py's Figures (bench/test_gpu_kernels.py, bench/test_gpu_transcoder_step.py): one row
    per (op, figure, backend); only speed-up rows are speed-ups, the others (a time or memory
    fraction, a fraction of copy bandwidth) keep their own figure as a note."""
    out = []
    for r in data["figures"]:
        backend = r.get("backend")
        provider = f"tckernels[{backend}]" if backend else r["op"]
        medians = r.get("median_seconds") or {}
        target = None
        if r.get("target"):
            target = float(r["target"].split()[-1])
        met = {"pass": True, "miss": False}.get(r["status"])
        measured = r.get("measured")
        values = dict(family=GPU_FAMILY.get(r["op"], r["op"].split("_")[0]), op=r["op"], provider=provider,
                      dtype=data.get("dtype"), shape=r["shape"], mode="full" if r["op"] == "transcoder_step"
                      else "forward", median_s=medians.get(backend), baseline=r.get("baseline"),
                      extra={"note": r["note"]} if r.get("note") else {})
        if r["figure"].startswith("speed-up") and measured is not None:
            values.update(speedup=measured, target=target, target_met=met)
        elif measured is not None:
            values["extra"]["figure"] = f"{r['figure']} = {measured:.3g} ({r['target'] or 'no target'}, {r['status']})"
        peak = r.get("peak_bytes")
        if isinstance(peak, dict):
            values["peak_bytes"] = peak.get(backend)
        nbytes = r.get("bytes_moved")
        if nbytes is not None and values["median_s"]:
            values["gbps"] = nbytes / values["median_s"] / 1e9
        out.append(figure(**values))
    stem = Path(name).stem
    # a device label may hold underscores (NVIDIA_H200): the suite is the known part
    suite = next((x for x in GPU_SUITES if stem.startswith(x + "_")), stem.rpartition("_")[0])
    device = stem[len(suite) + 1:]
    for e in data.get("errors", []):
        out.append(figure(family="step" if "step" in suite else "encode", op=suite, provider="?", error=e))
    return Source(name, suite, device, data.get("mode"), data.get("rounds"), data.get("environment", {}), out, "legacy")


def read(path: Path) -> Source:
    data = json.loads(path.read_text())
    try:
        if "suite" in data and "figures" in data:
            return _from_results_format(path.name, data)
        if isinstance(data.get("figures"), list) and all("measured" in r for r in data["figures"]):
            return _gpu_figures(path.name, data)
    except (KeyError, TypeError, ValueError, statistics.StatisticsError) as e:
        raise SystemExit(f"bench.report: {path}: not the schema expected of it ({type(e).__name__}: {e})") from None
    raise SystemExit(f"bench.report: {path}: neither the results format (suite + figures) nor bench/gpu.py's "
                     f"figures (each with \"measured\")")


def load(results: Path = RESULTS) -> List[Source]:
    return [read(p) for p in sorted(results.glob("*.json"))]


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------

DASH = "—"


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return DASH
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_bytes(b: Optional[int]) -> str:
    if b is None:
        return DASH
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def fmt_x(v: Optional[float]) -> str:
    return DASH if v is None else f"{v:.2f}×"


def fmt_target(f: dict) -> str:
    return DASH if f["target"] is None else f"≥ {f['target']:g}×"


def fmt_met(f: dict) -> str:
    return {True: "yes", False: "**no**", None: DASH}[f["target_met"]]


def fmt_speedup(f: dict) -> str:
    """A speed-up with its target, bold when it meets it: the README's cells."""
    if f["speedup"] is None:
        return DASH
    cell = f"**{fmt_x(f['speedup'])}**" if f["target_met"] else fmt_x(f["speedup"])
    if f["target"] is not None:
        cell += f" (target {fmt_target(f)}{'' if f['target_met'] else ', missed'})"
    return cell


def fmt_num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def fmt_throughput(f: dict) -> str:
    parts = []
    if f["tflops"] is not None:
        parts.append(f"{fmt_num(f['tflops'])} TFLOP/s")
    if f["gbps"] is not None:
        parts.append(f"{fmt_num(f['gbps'])} GB/s")
    return ", ".join(parts) or DASH


def fmt_shape(shape: Optional[dict]) -> str:
    return DASH if not shape else " ".join(f"{k}={v}" for k, v in shape.items())


def table(header: List[str], rows: Iterable[List[str]]) -> List[str]:
    rows = list(rows)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def all_figures(sources: List[Source]) -> List[dict]:
    return [{**f, "source": s.file} for s in sources for f in s.figures]


def families(sources: List[Source]) -> List[str]:
    present = {f["family"] for f in all_figures(sources)}
    return [x for x in FAMILIES if x in present] + sorted(present - set(FAMILIES))


def figure_file(family: str) -> str:
    return f"report_{family}.png"


STEPS_FIGURE = "report_steps.png"


def plotted(sources: List[Source]) -> List[str]:
    """The PNG files the report shows, in its order."""
    names = [figure_file(x) for x in families(sources) if x not in STEP_FAMILIES]
    if any(f["family"] in STEP_FAMILIES for f in all_figures(sources)):
        names.append(STEPS_FIGURE)
    return names


# ------------------------------------------------------------------------------------------------
# report.md
# ------------------------------------------------------------------------------------------------


def family_table(figs: List[dict]) -> List[str]:
    header = ["op", "provider", "dtype", "shape set", "shape", "mode", "median", "q25–q75", "TFLOP/s · GB/s",
              "baseline", "speed-up", "target", "met", "peak memory", "file"]
    rows = []
    for f in figs:
        q = DASH if f["q25_s"] is None else f"{fmt_time(f['q25_s'])}–{fmt_time(f['q75_s'])}"
        note = f["error"] and f"error: {f['error']}"
        note = note or f["extra"].get("figure") or f["extra"].get("note")
        rows.append([f["op"], f["provider"], f["dtype"] or DASH, f["shape_set"] or DASH, fmt_shape(f["shape"]),
                     f["mode"] or DASH, fmt_time(f["median_s"]), q, fmt_throughput(f), f["baseline"] or DASH,
                     fmt_x(f["speedup"]), fmt_target(f), fmt_met(f), fmt_bytes(f["peak_bytes"]),
                     f"`{f['source']}`" + (f" ({note})" if note else "")])
    return table(header, rows)


def environment_table(sources: List[Source]) -> List[str]:
    keys = ["device", "mode", "rounds", "python", "torch", "triton", "tckernels", "cpu", "threads", "gpu", "driver",
            "cuda", "commit"]
    rows = []
    for s in sources:
        env = s.environment
        commit = env.get("git_commit")
        commit = DASH if not commit else commit[:10] + (" (dirty)" if env.get("git_dirty") else "")
        values = {"device": s.device, "mode": s.mode, "rounds": s.rounds, "commit": commit, **{
            k: env.get(k) for k in keys if k not in ("device", "mode", "rounds", "commit")}}
        rows.append([f"`{s.file}` ({s.schema})"] + [DASH if values[k] is None else str(values[k]) for k in keys])
    return table(["file"] + keys, rows)


def report_md(sources: List[Source]) -> str:
    lines = ["# Benchmark report", "",
             "Generated by `python -m bench.report` from `bench/results/*.json`; do not edit by hand. Each "
             "speed-up is the median over interleaved rounds of the within-round ratio baseline time / this "
             "time; a missed target is reported, not failed.", ""]
    figs = all_figures(sources)
    fams = families(sources)
    for fam in fams:
        lines += [f"## {fam}", ""]
        lines += family_table([f for f in figs if f["family"] == fam])
        if fam not in STEP_FAMILIES:
            lines += ["", f"![{fam}]({figure_file(fam)})"]
        elif fam == [x for x in fams if x in STEP_FAMILIES][-1]:  # one figure for all steps and loops
            lines += ["", f"![steps and loops]({STEPS_FIGURE})"]
        lines.append("")
    lines += ["## Environment", ""] + environment_table(sources) + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# README's section
# ------------------------------------------------------------------------------------------------

LABELS = {
    "tckernels": "tckernels", "dense_eager": "dense eager", "embedding_bag": "`F.embedding_bag` decoder",
    "adapters_off": "off", "sparse_relu": "ReLU, L0≈{k}", "topk": "TopK k={k}",
    "dense_formula": "the original's dense formula",
}
SHAPE_SET_LABELS = {"tiny": "tiny default", "gpt2": "GPT-2 shape", "adapter": "adapter"}


def label(f: dict) -> str:
    text = LABELS.get(f["provider"], f["provider"])
    try:
        return text.format(**{**(f["shape"] or {}), **f["extra"]})
    except KeyError:  # a figure without the value its label names (an L0 not recorded)
        return text.split(",")[0]


def _caption(figs: List[dict], sources: List[Source], what: str) -> str:
    files = sorted({f["source"] for f in figs})
    by_file = {s.file: s for s in sources}
    per_set = {f["shape_set"]: f["extra"].get("rounds") for f in figs if f["extra"].get("rounds")}
    rounds = [f"{n} ({s})" for s, n in per_set.items()] if len(set(per_set.values())) > 1 else \
        list(dict.fromkeys(str(by_file[x].rounds) for x in files if by_file[x].rounds is not None))
    env = by_file[files[0]].environment
    device = by_file[files[0]].device
    return (f"{what}: {', '.join(f'`bench/results/{x}`' for x in files)}, {device}, "
            f"{env.get('threads', '?')} threads, torch {env.get('torch', '?')}; median over "
            f"{', '.join(rounds)} interleaved rounds.")


def readme_step_table(figs: List[dict], sources: List[Source]) -> List[str]:
    """The step family at one shape set: a column per provider, a row per (op, mode) for the
    medians and for tckernels' speed-ups (each under the baseline it is taken against), and the
    peak memory of the whole steps."""
    def op_of(f):  # the encoder GEMM is the floor of the topk_step it is timed with
        return "topk_step" if f["op"] == "gemm" else f["op"]

    cases = list(dict.fromkeys((op_of(f), f["mode"]) for f in figs))
    # a baseline that has no figure of its own still gets its column: the speed-up against it goes there
    providers = list(dict.fromkeys([f["provider"] for f in figs] + [f["baseline"] for f in figs if f["baseline"]]))
    ours = list(dict.fromkeys(f["provider"] for f in figs if f["provider"].startswith("tckernels")))
    first = {}  # (op, mode, provider) -> its figure (its rows against each baseline share the times)
    for f in figs:
        first.setdefault((op_of(f), f["mode"], f["provider"]), f)
    against = {(op_of(f), f["mode"], f["provider"], f["baseline"]): f for f in figs if f["baseline"]}

    rows = [[f"median, {o} {m}"] + [fmt_time(first[o, m, p]["median_s"]) if (o, m, p) in first else DASH
                                         for p in providers] for o, m in cases]
    for us in ours:
        rows += [[f"speed-up of {us}, {o} {m}"] + [fmt_speedup(against[o, m, us, p]) if (o, m, us, p) in against
                                                         else DASH for p in providers] for o, m in cases]
    rows += [[f"peak memory, {o} {m}"] + [fmt_bytes(first[o, m, p]["peak_bytes"]) if (o, m, p) in first else DASH
                                               for p in providers] for o, m in cases if m == "full"]
    ops = ", ".join(f"`{o}`" for o in dict.fromkeys(o for o, _ in cases))
    lines = [_caption(figs, sources, f"{ops}, {figs[0]['dtype']}, {fmt_shape(figs[0]['shape'])}"), ""]
    heads = [label(next(f for f in figs if f["provider"] == p)) if any(f["provider"] == p for f in figs)
             else LABELS.get(p, p) for p in providers]
    return lines + table([""] + heads, rows)


def readme_loop_table(figs: List[dict], sources: List[Source]) -> List[str]:
    """A loop measured at several shape sets: a column per shape set."""
    sets = list(dict.fromkeys(f["shape_set"] for f in figs))
    providers = list(dict.fromkeys(f["provider"] for f in figs))
    cell = {(f["shape_set"], f["provider"]): f for f in figs}
    ours = [p for p in providers if any(cell[s, p]["baseline"] for s in sets if (s, p) in cell)]

    def row(name, p, fmt):
        return [name] + [fmt(cell[s, p]) if (s, p) in cell else DASH for s in sets]

    rows = [row(f"{label(cell[next(s for s in sets if (s, p) in cell), p])} tokens/s", p,
                lambda f: DASH if f["extra"].get("tokens_per_s") is None else f"{f['extra']['tokens_per_s']:,.0f}")
            for p in providers]
    for p in ours:
        rows.append(row(f"speed-up of {label(cell[next(s for s in sets if (s, p) in cell), p])}", p, fmt_speedup))
        if not any("activation_share" in f["extra"] for f in figs):
            continue
        rows.append(row(f"{label(cell[next(s for s in sets if (s, p) in cell), p])}: share of time making activations", p, lambda f: DASH if f["extra"].get(
            "activation_share") is None else f"{100 * f['extra']['activation_share']:.0f}%"))
    lines = [_caption(figs, sources, f"`{figs[0]['op']}`, {figs[0]['dtype']}"), ""]
    return lines + table([figs[0]["op"]] + [SHAPE_SET_LABELS.get(s, s) for s in sets], rows)


def readme_overhead_table(figs: List[dict], sources: List[Source]) -> List[str]:
    """Adapters against the plain model: time relative to it, a column per provider, a row per op."""
    compared = [f for f in figs if f["baseline"]]
    providers = list(dict.fromkeys(f["provider"] for f in compared))
    ops = list(dict.fromkeys(f["op"] for f in compared))
    cell = {(f["op"], f["provider"]): f for f in compared}
    first = {p: next(f for f in compared if f["provider"] == p) for p in providers}
    baseline = compared[0]["baseline"]

    def ratio(f):
        return fmt_x(f["extra"].get("time_vs_baseline", None if not f["speedup"] else 1 / f["speedup"]))

    shape = {k: v for k, v in figs[0]["shape"].items() if k != "M"}
    lines = [_caption(figs, sources, f"adapter overhead, time relative to `{baseline}`, {figs[0]['dtype']}, "
                                     f"{fmt_shape(shape)}"), ""]
    return lines + table(["adapters"] + [label(first[p]) for p in providers],
                         [[op] + [ratio(cell[op, p]) if (op, p) in cell else DASH for p in providers] for op in ops])


def crossover(figs: List[dict]) -> Optional[int]:
    """The smallest feature count of a sweep from which on (every larger one too) the compared
    provider is faster than its baseline (speed-up >= 1); None when it is not at the largest."""
    found = None
    for f in sorted((f for f in figs if f["baseline"]), key=lambda f: -f["shape"]["N"]):
        if f["speedup"] is None or f["speedup"] < 1:
            break
        found = f["shape"]["N"]
    return found


def readme_sweep_table(figs: List[dict], sources: List[Source]) -> List[str]:
    """A feature-count sweep: a column per F, the providers' medians and the speed-up."""
    ns = sorted({f["shape"]["N"] for f in figs})
    providers = list(dict.fromkeys(f["provider"] for f in figs))
    cell = {(f["shape"]["N"], f["provider"]): f for f in figs}
    ours = [p for p in providers if any(f["baseline"] for f in figs if f["provider"] == p)]
    rows = [[f"{label(next(f for f in figs if f['provider'] == p))}, median"] +
            [fmt_time(cell[n, p]["median_s"]) if (n, p) in cell else DASH for n in ns] for p in providers]
    rows += [[f"speed-up of {label(next(f for f in figs if f['provider'] == p))}"] +
             [fmt_speedup(cell[n, p]) if (n, p) in cell else DASH for n in ns] for p in ours]
    shape = {k: v for k, v in figs[0]["shape"].items() if k != "N"}
    lines = [_caption(figs, sources, f"`{figs[0]['op']}` over the feature count F, {figs[0]['dtype']}, "
                                     f"{fmt_shape(shape)}"), ""]
    lines += table(["F"] + [f"{n:,}" for n in ns], rows)
    x = crossover(figs)
    targets = sorted(f["shape"]["N"] for f in figs if f["target"] is not None)
    goal = f" (target: faster once F ≥ {targets[0]:,})" if targets else ""
    return lines + ["", f"Crossover: the sparse path is faster than {LABELS.get(figs[0]['baseline'], figs[0]['baseline'])} from "
                        f"F = {x:,} on{goal}." if x else
                        f"Crossover: the sparse path is not faster at any F of the sweep up to {ns[-1]:,}{goal}."]


def readme_family_table(figs: List[dict]) -> List[str]:
    """An op family of the results format: its figures with a target (the headline ones)."""
    headline = [f for f in figs if f["target"] is not None] or [f for f in figs if f["speedup"] is not None]
    if not headline:
        return ["No figures: " + "; ".join(f"{f['op']} {f['provider']}: {f['error'] or 'no speed-up'}" for f in figs)]
    return table(["op", "provider", "shape set", "mode", "median", "vs", "speed-up", "peak memory"], [
        [f["op"], f["provider"], f["shape_set"] or fmt_shape(f["shape"]), f["mode"] or DASH, fmt_time(f["median_s"]),
         f["baseline"] or DASH, fmt_speedup(f), fmt_bytes(f["peak_bytes"])] for f in headline])


def readme_section(sources: List[Source]) -> str:
    figs = all_figures(sources)
    lines = [BEGIN, "<!-- generated by `python -m bench.report --readme` from bench/results/*.json -->", ""]
    steps = [f for f in figs if f["family"] == "step"]
    for s in dict.fromkeys(f["shape_set"] for f in steps):
        lines += readme_step_table([f for f in steps if f["shape_set"] == s], sources) + [""]
    for op in dict.fromkeys(f["op"] for f in figs if f["family"] == "loop"):
        lines += readme_loop_table([f for f in figs if f["op"] == op and f["family"] == "loop"], sources) + [""]
    adapters = [f for f in figs if f["family"] == "adapter"]
    if any(f["shape_set"] == ADAPTER_SET for f in adapters):
        lines += readme_overhead_table([f for f in adapters if f["shape_set"] == ADAPTER_SET], sources) + [""]
    sweep = [f for f in adapters if f["shape_set"] != ADAPTER_SET and not f["error"]]
    if sweep:
        lines += readme_sweep_table(sweep, sources) + [""]
    for fam in families(sources):
        if fam in STEP_FAMILIES:
            continue
        these = [f for f in figs if f["family"] == fam]
        files = sorted({f["source"] for f in these})
        lines += [f"`{fam}` ({', '.join(f'`bench/results/{x}`' for x in files)}):", ""]
        lines += readme_family_table(these) + [""]
    pngs = " · ".join(f"[{p[len('report_'):-len('.png')]}](bench/results/{p})" for p in plotted(sources))
    lines += [f"Every figure, its environment and plots: [bench/results/report.md](bench/results/report.md) "
              f"(figures: {pngs}).", END]
    return "\n".join(lines)


def replace_section(readme: str, section: str) -> str:
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise SystemExit(f"bench.report: README.md must have one {BEGIN} ... {END} pair")
    head, rest = readme.split(BEGIN)
    return head + section + rest.split(END, 1)[1]


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('bench.report: the figures need matplotlib, the "bench" extra: '
                         'pip install -e ".[bench]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, groups: List[str], series: Dict[str, Dict[str, float]], ylabel: str, title: str,
          ref: Optional[float] = None) -> None:
    """Grouped bars: a group per entry of ``groups``, a bar per series."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [values.get(g, 0) for g in groups], width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    if ref is not None:
        ax.axhline(ref, color="grey", lw=0.8, ls="--")
    if series:
        ax.legend(fontsize=6)


def _group(f: dict) -> str:
    return " ".join(x for x in (f["op"], f["shape_set"] or fmt_shape(f["shape"]), f["mode"]) if x)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    # no timestamp or version in the file: the same JSON gives the same bytes
    fig.savefig(path, dpi=100, metadata={"Software": None})


def plot_family(plt, figs: List[dict], family: str, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    ok = [f for f in figs if f["speedup"] is not None]
    groups = list(dict.fromkeys(_group(f) for f in ok))
    series: Dict[str, Dict[str, float]] = {}
    for f in ok:
        series.setdefault(f"{f['provider']} vs {f['baseline']}", {})[_group(f)] = f["speedup"]
    _bars(left, groups, series, "speed-up (×)", f"{family}: speed-up vs baseline", ref=1.0)
    mem = [f for f in figs if f["peak_bytes"] is not None]
    groups = list(dict.fromkeys(_group(f) for f in mem))
    series = {}
    for f in mem:
        series.setdefault(f["provider"], {})[_group(f)] = f["peak_bytes"] / 2**20
    _bars(right, groups, series, "MiB", f"{family}: peak memory")
    _save(fig, path)
    plt.close(fig)


def plot_steps(plt, figs: List[dict], path: Path) -> None:
    """A panel per op: tokens/s where the suite counts tokens, time relative to the baseline where it
    measures an overhead, the speed-up otherwise."""
    def panel(f):  # the adapters against the plain model are one panel (forward, generate), their sweep another
        if f["family"] == "adapter":
            return "adapters vs plain" if f["shape_set"] == ADAPTER_SET else f"adapter {f['op']} over F"
        return f["op"]

    ops = list(dict.fromkeys(panel(f) for f in figs))
    fig, axes = plt.subplots(1, len(ops), figsize=(3.3 * len(ops), 3.4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        these = [f for f in figs if panel(f) == op]
        series: Dict[str, Dict[str, float]] = {}
        if any("tokens_per_s" in f["extra"] for f in these):
            metric, ylabel, ref = (lambda f: f["extra"].get("tokens_per_s")), "tokens/s", None
            key, group = (lambda f: f["provider"]), (lambda f: f["shape_set"])
        elif any("time_vs_baseline" in f["extra"] for f in these):
            metric, ylabel, ref = (lambda f: f["extra"].get("time_vs_baseline")), "time / baseline", 1.0
            key, group = (lambda f: f["provider"]), (lambda f: f["op"])
        else:
            metric, ylabel, ref = (lambda f: f["speedup"]), "speed-up (×)", 1.0
            key, group = (lambda f: f"{f['provider']} vs {f['baseline']}"), (lambda f: f["shape_set"] or f["mode"])
        for f in these:
            if metric(f) is not None:
                series.setdefault(key(f), {})[group(f)] = metric(f)
        groups = list(dict.fromkeys(g for values in series.values() for g in values))
        _bars(ax, groups, series, ylabel, op, ref=ref)
        if ylabel == "tokens/s":  # shape sets differ by orders of magnitude
            ax.set_yscale("log")
    _save(fig, path)
    plt.close(fig)


def write_figures(sources: List[Source], out: Path) -> List[Path]:
    plt = _pyplot()
    figs = all_figures(sources)
    written = []
    for fam in families(sources):
        if fam not in STEP_FAMILIES:
            written.append(out / figure_file(fam))
            plot_family(plt, [f for f in figs if f["family"] == fam], fam, written[-1])
    steps = [f for f in figs if f["family"] in STEP_FAMILIES]
    if steps:
        written.append(out / STEPS_FIGURE)
        plot_steps(plt, steps, written[-1])
    return written


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def check(results: Path, readme: Optional[Path]) -> List[str]:
    """What is out of date with the JSON in ``results``: report.md, its PNGs, README's section."""
    sources = load(results)
    stale = []
    report = results / REPORT
    if not report.exists() or report.read_text() != report_md(sources):
        stale.append(str(report))
    stale += [str(results / p) for p in plotted(sources) if not (results / p).exists()]
    if readme is not None:
        text = readme.read_text()
        if replace_section(text, readme_section(sources)) != text:
            stale.append(f"{readme} (between {BEGIN} and {END})")
    return stale


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON (default: bench/results)")
    p.add_argument("--readme", nargs="?", const=README, type=Path, default=None,
                   help="also rewrite the performance section of this README (default README.md)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if report.md (or, with --readme, README's section) is out of date")
    args = p.parse_args(argv)
    if args.check:
        stale = check(args.results, args.readme if args.readme else (README if args.results == RESULTS else None))
        if stale:
            print("out of date with the JSON (run python -m bench.report --readme):\n  " + "\n  ".join(stale))
            return 1
        print("bench.report: up to date")
        return 0
    sources = load(args.results)
    written = write_figures(sources, args.results)
    (args.results / REPORT).write_text(report_md(sources))
    written.insert(0, args.results / REPORT)
    if args.readme:
        args.readme.write_text(replace_section(args.readme.read_text(), readme_section(sources)))
        written.append(args.readme)
    for w in written:
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
