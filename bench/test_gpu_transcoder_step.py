"""One TopK transcoder training step on the GPU (issue 7), bf16, tckernels vs baselines timed in
the same run: dense eager, dense torch.compile, and the sparsify-style path (dense encoder GEMM +
torch.topk + embedding_bag decoder, whose backward is an index_add).

    pytest bench/test_gpu_transcoder_step.py -s

Targets at D=4096, N=131072, k=64, M=8192: forward+backward >= 3x faster than dense eager, >= 2.3x
with the AdamW update included, >= 1.3x faster than the sparsify-style path; activation memory
<= 1% of the dense path's. Results: bench/results/gpu_transcoder_step_<gpu>.json.
"""
import pytest
import torch

from bench.conftest import write_result
from bench.gpu import bench_pedantic
from bench.transcoder_step import loss_fn, make_params, memory_profile

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [  # (M, D, N, k)
    (8192, 4096, 131072, 64),
    (8192, 768, 24576, 32),
    (4096, 768, 24576, 32),
    (8192, 5120, 12288, 1475),
]
IMPLS = ["tckernels", "dense", "dense-compile", "embbag"]
RESULTS = {}


def _step_fn(impl, params, x, k, adamw):
    variant = "dense" if impl == "dense-compile" else impl
    loss = (lambda p, x_: loss_fn(variant, p, x_, k))
    if impl == "dense-compile":
        loss = torch.compile(loss, fullgraph=True)
    opt = torch.optim.AdamW(params.values(), lr=1e-4, fused=True) if adamw else None

    def step():
        for p in params.values():
            p.grad = None
        loss(params, x).backward()
        if opt is not None:
            opt.step()

    return step


@pytest.mark.parametrize("adamw", [False, True], ids=["fwd+bwd", "with-adamw"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-D{s[1]}-N{s[2]}-k{s[3]}")
def test_step(benchmark, shape, impl, adamw):
    M, D, N, k = shape
    params, x = make_params(M, D, N, k, dtype=torch.bfloat16, device="cuda")
    step = _step_fn(impl, params, x, k, adamw)
    benchmark.group = f"step M{M} D{D} N{N} k{k} {'with-adamw' if adamw else 'fwd+bwd'}"
    seconds = bench_pedantic(benchmark, step, rounds=5, inner=2)
    row = {"seconds": seconds}
    if not adamw and impl != "dense-compile":
        del params, x, step
        torch.cuda.empty_cache()
        row.update(memory_profile(impl, M, D, N, k, torch.bfloat16, "cuda"))
    RESULTS.setdefault(benchmark.group, {})[impl] = row
    torch.cuda.empty_cache()


def test_write_results():
    if not RESULTS:
        pytest.skip("nothing measured")
    summary = {}
    for group, rows in RESULTS.items():
        ours = rows.get("tckernels")
        if ours is None:
            continue
        for base in ("dense", "dense-compile", "embbag"):
            if base in rows:
                summary[f"{group}: speed-up vs {base}"] = rows[base]["seconds"] / ours["seconds"]
        if "saved_bytes" in ours and "dense" in rows:
            summary[f"{group}: saved activations / dense"] = ours["saved_bytes"] / rows["dense"]["saved_bytes"]
            summary[f"{group}: step peak memory / dense"] = ours["peak_bytes"] / rows["dense"]["peak_bytes"]
    name = "gpu_transcoder_step_" + torch.cuda.get_device_name().replace(" ", "_") + ".json"
    path = write_result(name, {"dtype": "bfloat16", "results": RESULTS, "summary": summary})
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    print(f"written to {path}")
