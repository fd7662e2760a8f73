"""bench.report: the report, its plots and README's performance section come from the result JSON,
in the results format and in bench/gpu.py's figures."""
import json
import shutil
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STEPS = "steps_cpu.json"  # bench/test_transcoder_step.py
TRAINER = "transcoder_trainer_cpu.json"  # bench/test_transcoder_trainer.py
ADAPTER = "adapter_cpu.json"  # bench/test_adapter_overhead.py
ENV = {"python": "3.11.7", "torch": "2.13.0+cpu", "tckernels": "0.1.0", "cpu": "x86_64", "threads": 2,
       "triton": "3.6.0", "git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False}


def _fig(**kw):
    base = {k: None for k in report.FIGURE_KEYS if k != "error"}
    base.update(dtype="float32", mode="forward")
    base.update(kw)
    return base


def ops_cpu() -> dict:
    """An ops suite's file as bench.conftest.write_result writes it."""
    gpt2 = {"M": 2048, "D": 768, "N": 24576, "k": 32}
    return {"environment": ENV, "suite": "ops", "device": "cpu", "mode": "quick", "rounds": 5, "figures": [
        _fig(family="encode", op="encode_topk", provider="dense_eager", shape_set="gpt2", shape=gpt2,
             median_s=0.0412, q25_s=0.0400, q75_s=0.0430, tflops=1.88, peak_bytes=268435456),
        _fig(family="encode", op="encode_topk", provider="tckernels[cpu]", shape_set="gpt2", shape=gpt2,
             median_s=0.0163, q25_s=0.0160, q75_s=0.0170, tflops=4.74, baseline="dense_eager", speedup=2.53,
             peak_bytes=67108864, target=2.0, target_met=True),
        _fig(family="encode", op="encode_topk", provider="tckernels[cpu]", shape_set="tiny",
             shape={"M": 64, "D": 64, "N": 1024, "k": 16}, mode="backward", median_s=0.000212, q25_s=0.0002,
             q75_s=0.00023, baseline="dense_eager", speedup=0.91, target=1.0, target_met=False),
        _fig(family="decode", op="sparse_decode", provider="embedding_bag", shape_set="gpt2", shape=gpt2,
             median_s=0.0051, gbps=12.5, peak_bytes=8388608),
        _fig(family="decode", op="sparse_decode", provider="tckernels[cpu]", shape_set="gpt2", shape=gpt2,
             median_s=0.0034, gbps=18.8, baseline="embedding_bag", speedup=1.5, peak_bytes=6291456),
        {**{k: None for k in report.FIGURE_KEYS}, "family": "decode", "op": "sparse_decode", "provider": "sparsify",
         "dtype": "float32", "shape_set": "gpt2", "shape": gpt2, "mode": "forward",
         "error": "ImportError: no module named sparsify"},
    ]}


@pytest.fixture
def results(tmp_path):
    """An ops file made here and the committed step, trainer and adapter files."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "ops_cpu.json").write_text(json.dumps(ops_cpu(), indent=2))
    for name in (STEPS, TRAINER, ADAPTER):
        shutil.copy(RESULTS / name, out / name)
    return out


def rows(markdown: str, first: str) -> list:
    """The cells of every table row of ``markdown`` whose first cell is ``first``."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells[0] == first:
                out.append(cells)
    return out


def test_results_format_rows(results):
    md = report.report_md(report.load(results))
    encode = rows(md, "encode_topk")
    assert encode == [
        ["encode_topk", "dense_eager", "float32", "gpt2", "M=2048 D=768 N=24576 k=32", "forward", "41.2 ms",
         "40 ms–43 ms", "1.88 TFLOP/s", "—", "—", "—", "—", "256 MiB", "`ops_cpu.json`"],
        ["encode_topk", "tckernels[cpu]", "float32", "gpt2", "M=2048 D=768 N=24576 k=32", "forward", "16.3 ms",
         "16 ms–17 ms", "4.74 TFLOP/s", "dense_eager", "2.53×", "≥ 2×", "yes", "64 MiB", "`ops_cpu.json`"],
        ["encode_topk", "tckernels[cpu]", "float32", "tiny", "M=64 D=64 N=1024 k=16", "backward", "212 µs",
         "200 µs–230 µs", "—", "dense_eager", "0.91×", "≥ 1×", "**no**", "—", "`ops_cpu.json`"],
    ]
    decode = rows(md, "sparse_decode")
    assert [r[1] for r in decode] == ["embedding_bag", "tckernels[cpu]", "sparsify"]
    assert decode[1][8] == "18.8 GB/s" and decode[1][10] == "1.50×" and decode[1][12] == "—"
    assert decode[2][-1] == "`ops_cpu.json` (error: ImportError: no module named sparsify)"
    # a family per section, in the format's order, before the steps
    assert [line for line in md.splitlines() if line.startswith("## ")] == [
        "## encode", "## decode", "## step", "## loop", "## adapter", "## Environment"]


def figures(results, name):
    return json.loads((results / name).read_text())["figures"]


def test_committed_rows(results):
    md = report.report_md(report.load(results))
    steps = figures(results, STEPS)
    # every figure of the step file is a row, in the file's order: op, provider, mode, baseline, speed-up, target
    want = [(f["op"], f["provider"], f["mode"], f["baseline"] or "—", report.fmt_x(f["speedup"]), report.fmt_target(f))
            for f in steps]
    got = [(r[0], r[1], r[5], r[9], r[10], r[11]) for op in ("topk_step", "gemm", "topk_train_step")
           for r in rows(md, op)]
    assert sorted(got) == sorted(want)
    assert [r[1] for r in rows(md, "topk_step")] == [f["provider"] for f in steps if f["op"] == "topk_step"]

    trainer = figures(results, TRAINER)
    loop = rows(md, "transcoder_trainer")
    assert [(r[1], r[3], r[10]) for r in loop] == [(f["provider"], f["shape_set"], report.fmt_x(f["speedup"]))
                                                   for f in trainer]

    # the adapter file: every provider of forward and generate against plain, the sweep against the dense formula
    adapter = figures(results, ADAPTER)
    want = {(f["op"], f["shape_set"], f["provider"]): f for f in adapter}
    forward = {(r[3], r[1]): r for r in rows(md, "forward")}
    assert {(s, p) for s, p in forward if s == "adapter"} == {
        ("adapter", p) for p in ("plain", "adapters_off", "sparse_relu", "topk", "dense_formula")}
    sparse = want["forward", "adapter", "sparse_relu"]
    assert forward["adapter", "sparse_relu"][9:11] == ["plain", f"{sparse['speedup']:.2f}×"]
    assert forward["adapter", "plain"][9] == "—"
    assert forward["adapter", "adapters_off"][11] == "≥ 0.8×"
    assert {s for s, p in forward if s != "adapter"} == {"f1152", "f2048", "f4096", "f8192"}
    assert forward["f8192", "sparse_relu"][9:12] == ["dense_formula", f"{want['forward', 'f8192', 'sparse_relu']['speedup']:.2f}×",
                                                      "≥ 1×"]
    assert [r[1] for r in rows(md, "bridging_step")] == ["sparse_relu", "dense_formula"]

    assert rows(md, f"`{TRAINER}` (results format)"), "no environment row"
    assert rows(md, "`ops_cpu.json` (results format)")[0][1:] == [
        "cpu", "quick", "5", "3.11.7", "2.13.0+cpu", "3.6.0", "0.1.0", "x86_64", "2", "—", "—", "—", "0123456789"]


def test_readme_section_has_the_figures(results):
    sources = report.load(results)
    section = report.readme_section(sources)
    assert section.startswith(report.BEGIN) and section.endswith(report.END)
    steps = [f for f in figures(results, STEPS) if f["shape_set"] == "gpt2"]
    providers = list(dict.fromkeys(f["provider"] for f in steps))
    assert providers[:2] == ["tckernels[cpu]", "dense_eager"] and "gemm" in providers
    first = {}
    for f in steps:
        first.setdefault((f["op"], f["mode"], f["provider"]), f)
    # the gpt2 table is the second of each row name (the tiny set's comes first)
    assert rows(section, "median, topk_step full")[1][1:] == [report.fmt_time(first["topk_step" if p != "gemm" else "gemm", "full", p]["median_s"])
                                                             for p in providers]
    ours = {f["baseline"]: f for f in steps if (f["op"], f["mode"], f["provider"]) == ("topk_step", "full", "tckernels[cpu]")}
    cells = rows(section, "speed-up of tckernels[cpu], topk_step full")[1][1:]
    assert cells == [report.fmt_speedup(ours[p]) if p in ours else "—" for p in providers]
    assert set(ours) == {"dense_eager", "embedding_bag", "sparsify", "gemm"}
    for base, target in (("dense_eager", "5"), ("embedding_bag", "2"), ("sparsify", "1.4"), ("gemm", "0.8")):
        assert f"(target ≥ {target}×" in cells[providers.index(base)], (base, cells)
    assert rows(section, "peak memory, topk_train_step full")[1][1] == report.fmt_bytes(
        first["topk_train_step", "full", "tckernels[cpu]"]["peak_bytes"])

    trainer = {(f["shape_set"], f["provider"]): f for f in figures(results, TRAINER)}
    assert rows(section, "tckernels tokens/s")[0][1:] == [f"{trainer[s, 'tckernels']['extra']['tokens_per_s']:,.0f}"
                                                         for s in ("tiny", "gpt2")]
    assert rows(section, "dense eager tokens/s")[0][1:] == [f"{trainer[s, 'dense_eager']['extra']['tokens_per_s']:,.0f}"
                                                           for s in ("tiny", "gpt2")]
    assert rows(section, "tckernels: share of time making activations")[0][1:] == [
        f"{100 * trainer[s, 'tckernels']['extra']['activation_share']:.0f}%" for s in ("tiny", "gpt2")]
    rounds = json.loads((results / TRAINER).read_text())["rounds"]
    assert f"median over {rounds['tiny']} (tiny), {rounds['gpt2']} (gpt2) interleaved rounds" in section

    adapter = {(f["op"], f["shape_set"], f["provider"]): f for f in figures(results, ADAPTER)}
    assert rows(section, "adapters")[0][1:] == ["off", "ReLU, L0≈8", "TopK k=8", "the original's dense formula"]
    for op in ("forward", "generate"):  # time relative to plain: the inverse of the speed-up
        assert rows(section, op)[0][1:] == [f"{1 / adapter[op, 'adapter', p]['speedup']:.2f}×"
                                            for p in ("adapters_off", "sparse_relu", "topk", "dense_formula")]
    assert rows(section, "F")[0][1:] == ["1,152", "2,048", "4,096", "8,192"]
    bridging, sweep = (r[1:] for r in rows(section, "speed-up of ReLU, L0≈8"))
    assert [c.split(" ")[0].strip("*") for c in sweep] == [
        f"{adapter['forward', f'f{n}', 'sparse_relu']['speedup']:.2f}×" for n in (1152, 2048, 4096, 8192)]
    x = report.crossover([f for (op, s, _), f in adapter.items() if s.startswith("f")])
    assert (f"from F = {x:,} on" if x else "not faster at any F") in section
    step = {p: adapter["bridging_step", "tiny", p] for p in ("sparse_relu", "dense_formula")}
    assert rows(section, "the original's dense formula tokens/s")[0][1:] == [
        f"{step['dense_formula']['shape']['M'] / step['dense_formula']['median_s']:,.0f}"]
    assert bridging == [f"{step['sparse_relu']['speedup']:.2f}×"]
    # the results format's families: the figures with a target
    assert [(r[1], r[2], r[3], r[6]) for r in rows(section, "encode_topk")] == [
        ("tckernels[cpu]", "gpt2", "forward", "**2.53×** (target ≥ 2×)"),
        ("tckernels[cpu]", "tiny", "backward", "0.91× (target ≥ 1×, missed)")]
    assert "(bench/results/report_encode.png)" in section and "(bench/results/report_steps.png)" in section


def test_the_figures_are_written(results):
    pytest.importorskip("matplotlib")
    assert report.main(["--results", str(results)]) == 0
    pngs = sorted(p.name for p in results.glob("*.png"))
    assert pngs == ["report_decode.png", "report_encode.png", "report_steps.png"]
    for name in pngs:
        data = (results / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and 5_000 < len(data) < 200_000, (name, len(data))
    md = (results / "report.md").read_text()
    assert all(f"]({name})" in md for name in pngs)


def test_check_fails_after_a_value_changes(results, tmp_path):
    pytest.importorskip("matplotlib")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nprose\n\n{report.BEGIN}\n{report.END}\n\nmore prose\n")
    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text().startswith("# x\n\nprose\n\n") and readme.read_text().endswith("\n\nmore prose\n")
    assert report.main(["--check", "--results", str(results), "--readme", str(readme)]) == 0

    steps = json.loads((results / STEPS).read_text())
    ours = next(f for f in steps["figures"] if f["shape_set"] == "gpt2" and f["baseline"] == "dense_eager"
                and (f["op"], f["mode"], f["provider"]) == ("topk_step", "full", "tckernels[cpu]"))
    ours["speedup"] = 3.5
    (results / STEPS).write_text(json.dumps(steps))
    assert report.check(results, readme) == [str(results / "report.md"), f"{readme} (between {report.BEGIN} and "
                                                                         f"{report.END})"]
    assert report.main(["--check", "--results", str(results), "--readme", str(readme)]) == 1

    report.main(["--results", str(results), "--readme", str(readme)])
    assert "3.50×" in readme.read_text()
    (results / "report_steps.png").unlink()  # a plot the report shows is missing
    assert report.check(results, readme) == [str(results / "report_steps.png")]


def test_readme_section_is_generated_from_the_committed_results():
    """README's performance section is what `python -m bench.report --readme` writes, and so is report.md."""
    text = (ROOT / "README.md").read_text()
    sources = report.load(RESULTS)
    assert report.replace_section(text, report.readme_section(sources)) == text, \
        "README.md's performance section is out of date: run python -m bench.report --readme"
    assert report.check(RESULTS, ROOT / "README.md") == []


def test_missing_matplotlib_names_the_extra(results, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(SystemExit, match=r'the "bench" extra: pip install -e "\.\[bench\]"'):
        report.main(["--results", str(results)])


def test_an_unknown_file_is_an_error_naming_it(results):
    (results / "mystery.json").write_text(json.dumps({"environment": ENV, "numbers": [1, 2]}))
    with pytest.raises(SystemExit, match="mystery.json: neither the results format"):
        report.load(results)
    (results / "mystery.json").write_text(json.dumps({"suite": "ops", "figures": []}))  # no "device"
    with pytest.raises(SystemExit, match="mystery.json: not the schema expected of it"):
        report.load(results)


def test_gpu_figures_files(results):
    """A file of bench/gpu.py's Figures: speed-ups become speed-ups, other figures stay notes."""
    (results / "gpu_kernels_NVIDIA_H200.json").write_text(json.dumps({
        "environment": {**ENV, "gpu": "NVIDIA H200", "cuda": "12.8"}, "mode": "quick", "rounds": 5,
        "dtype": "bfloat16", "diagnostics": {}, "errors": [], "figures": [
            {"op": "topk_relu", "figure": "speed-up vs torch.topk", "backend": "triton",
             "shape": {"M": 8192, "N": 131072, "k": 64}, "baseline": "torch.topk", "measured": 2.2,
             "target": ">= 2.0", "status": "pass", "median_seconds": {"triton": 0.001, "torch.topk": 0.0022}},
            {"op": "gather_matmul", "figure": "fraction of copy bandwidth", "backend": "cuda",
             "shape": {"M": 8192, "k": 64, "N": 24576, "D": 768}, "baseline": "copy", "measured": 0.61,
             "target": ">= 0.7", "status": "miss", "median_seconds": {"cuda": 0.002}, "bytes_moved": 4e9},
        ]}))
    md = report.report_md(report.load(results))
    (select,) = rows(md, "topk_relu")
    assert select[1] == "tckernels[triton]" and select[5:7] == ["forward", "1 ms"] and select[10:13] == ["2.20×", "≥ 2×", "yes"]
    (gather,) = rows(md, "gather_matmul")
    assert gather[8] == "2,000 GB/s" and gather[10] == "—"
    assert "fraction of copy bandwidth = 0.61 (>= 0.7, miss)" in gather[-1]
    assert rows(md, "`gpu_kernels_NVIDIA_H200.json` (legacy)")[0][1] == "NVIDIA_H200"


def test_a_baseline_without_its_own_figure_keeps_its_column(tmp_path):
    ops = ops_cpu()
    ops["figures"] = [_fig(family="step", op="topk_step", provider="tckernels[cpu]", shape_set="tiny", mode="full",
                           median_s=0.01, baseline="dense_eager", speedup=2.0, target=3.0, target_met=False),
                      {**{k: None for k in report.FIGURE_KEYS}, "family": "scatter", "op": "scatter_matmul",
                       "provider": "tckernels[cpu]", "error": "RuntimeError: out of memory"}]
    (tmp_path / "steps_cpu.json").write_text(json.dumps(ops))
    section = report.readme_section(report.load(tmp_path))
    assert rows(section, "")[0] == ["", "tckernels[cpu]", "dense eager"]
    assert rows(section, "speed-up of tckernels[cpu], topk_step full")[0][1:] == ["—", "2.00× (target ≥ 3×, missed)"]
    assert "No figures: scatter_matmul tckernels[cpu]: RuntimeError: out of memory" in section
