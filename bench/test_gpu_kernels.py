"""GPU kernels (issues 6 and 7), bf16, against baselines measured in the same run.

    pytest bench/test_gpu_kernels.py -s

Targets: top-k select >= 3x faster than torch.topk at M=8192, N=131072, k=64; gather/scatter
kernels >= 70% of the measured copy bandwidth on the bytes they must move; the fused encoder
<= 1.1x bare torch.matmul and >= 1.15x faster than F.linear + torch.topk (D=4096, N=131072, k=64),
>= 1.5x faster at D=768, N=24576, k=32.
Results: bench/results/gpu_kernels_<gpu>.json.
"""
import pytest
import torch
import torch.nn.functional as F

import tckernels
from bench.conftest import write_result
from bench.gpu import bench_pedantic, copy_bandwidth

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16 = torch.bfloat16
GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in tckernels.available_backends("cuda")]
RESULTS = {}


def _record(group, name, seconds, **extra):
    RESULTS.setdefault(group, {})[name] = {"seconds": seconds, **extra}


def _gen(seed=0):
    return torch.Generator(device="cuda").manual_seed(seed)


# --- top-k select -------------------------------------------------------------------------
TOPK_SHAPES = [(8192, 131072, 64), (8192, 24576, 32), (4096, 12288, 1475)]


@pytest.fixture(scope="module", params=TOPK_SHAPES, ids=lambda s: f"M{s[0]}-N{s[1]}-k{s[2]}")
def topk_case(request):
    M, N, k = request.param
    pre = torch.randn(M, N, device="cuda", dtype=BF16, generator=_gen())
    bias = torch.randn(N, device="cuda", dtype=BF16, generator=_gen(1)) * 0.1
    return (M, N, k), pre, bias


@pytest.mark.parametrize("impl", ["torch.topk", "torch:bias+relu+topk", *GPU_BACKENDS])
def test_topk(benchmark, topk_case, impl):
    shape, pre, bias = topk_case
    k = shape[2]
    benchmark.group = f"topk M{shape[0]} N{shape[1]} k{k}"
    if impl == "torch.topk":
        fn = lambda: torch.topk(pre, k, dim=1)  # noqa: E731
    elif impl == "torch:bias+relu+topk":
        fn = lambda: torch.topk(torch.relu(pre + bias), k, dim=1)  # noqa: E731
    else:
        fn = lambda: tckernels.topk_relu(pre, k, bias, backend=impl)  # noqa: E731
    _record(benchmark.group, impl, bench_pedantic(benchmark, fn), bytes=pre.numel() * 2)


# --- gather / scatter bandwidth -------------------------------------------------------------
PRIM_SHAPES = [(8192, 64, 131072, 4096), (8192, 32, 24576, 768), (4096, 1475, 12288, 5120)]


@pytest.fixture(scope="module", params=PRIM_SHAPES, ids=lambda s: f"M{s[0]}-k{s[1]}-N{s[2]}-D{s[3]}")
def prim_case(request):
    M, k, N, D = request.param
    g = _gen(2)
    W = torch.randn(N, D, device="cuda", dtype=BF16, generator=g)
    values = torch.randn(M, k, device="cuda", dtype=BF16, generator=g)
    # Distinct features per row, as top-k produces.
    indices = torch.rand(M, N, device="cuda", generator=g).topk(k, dim=1).indices
    G = torch.randn(M, D, device="cuda", dtype=BF16, generator=g)
    return (M, k, N, D), W, values, indices, G


@pytest.mark.parametrize("op", ["gather_matmul", "gather_dot", "scatter_matmul", "scatter_matmul_det",
                                "embedding_bag", "index_add"])
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
def test_primitive(benchmark, prim_case, op, backend):
    (M, k, N, D), W, values, indices, G = prim_case
    if backend == "none":
        pytest.skip("no GPU backend built")
    if op in ("embedding_bag", "index_add") and backend != GPU_BACKENDS[0]:
        pytest.skip("baseline timed once")
    benchmark.group = f"primitives M{M} k{k} N{N} D{D}"
    elt = 2
    # The bytes each op must move: every gathered (or scattered) row once, plus its dense side.
    rows = M * k * D * elt
    if op == "gather_matmul":
        fn, nbytes = (lambda: tckernels.gather_matmul(values, indices, W, backend=backend)), rows + M * D * elt
    elif op == "gather_dot":
        fn, nbytes = (lambda: tckernels.gather_dot(G, indices, W, backend=backend)), rows + M * D * elt
    elif op.startswith("scatter_matmul"):
        det = op.endswith("det")
        fn = lambda: tckernels.scatter_matmul(values, indices, G, N, deterministic=det, backend=backend)  # noqa: E731
        nbytes = M * D * elt + min(rows, N * D * 4) + N * D * elt
    elif op == "embedding_bag":
        fn, nbytes = (lambda: F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")), rows + M * D * elt
    else:
        contrib = (values.unsqueeze(-1) * G.unsqueeze(1)).reshape(-1, D)
        out = torch.zeros(N, D, device="cuda", dtype=BF16)
        fn, nbytes = (lambda: out.zero_().index_add_(0, indices.reshape(-1), contrib)), rows + N * D * elt
    name = op if op in ("embedding_bag", "index_add") else f"{backend}:{op}"
    _record(benchmark.group, name, bench_pedantic(benchmark, fn), bytes=nbytes)


# --- fused encoder ---------------------------------------------------------------------------
ENC_SHAPES = [(8192, 4096, 131072, 64), (8192, 768, 24576, 32)]


@pytest.fixture(scope="module", params=ENC_SHAPES, ids=lambda s: f"M{s[0]}-D{s[1]}-N{s[2]}-k{s[3]}")
def enc_case(request):
    M, D, N, k = request.param
    g = _gen(3)
    x = torch.randn(M, D, device="cuda", dtype=BF16, generator=g)
    W = torch.randn(N, D, device="cuda", dtype=BF16, generator=g) * D**-0.5
    b = torch.randn(N, device="cuda", dtype=BF16, generator=g) * 0.1
    return (M, D, N, k), x, W, b


@pytest.mark.parametrize("impl", ["matmul", "linear+topk", *GPU_BACKENDS])
def test_encoder(benchmark, enc_case, impl):
    (M, D, N, k), x, W, b = enc_case
    benchmark.group = f"encoder M{M} D{D} N{N} k{k}"
    if impl == "matmul":
        fn = lambda: torch.matmul(x, W.t())  # noqa: E731
    elif impl == "linear+topk":
        fn = lambda: torch.topk(torch.relu(F.linear(x, W, b)), k, dim=1)  # noqa: E731
    else:
        fn = lambda: tckernels.encode_topk(x, W, b, k, backend=impl)  # noqa: E731
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    _record(benchmark.group, impl, bench_pedantic(benchmark, fn, rounds=8, inner=3), peak_bytes=peak)


def test_write_results():
    if not RESULTS:
        pytest.skip("nothing measured")
    bw = copy_bandwidth()
    summary = {}
    for group, rows in RESULTS.items():
        for name, row in rows.items():
            if "bytes" in row and group.startswith("primitives"):
                row["fraction_of_copy_bw"] = row["bytes"] / row["seconds"] / bw
        if group.startswith("topk"):
            for name, row in rows.items():
                if name in GPU_BACKENDS:
                    summary[f"{group} {name}: speed-up vs torch.topk"] = rows["torch.topk"]["seconds"] / row["seconds"]
        if group.startswith("encoder"):
            for name, row in rows.items():
                if name in GPU_BACKENDS:
                    summary[f"{group} {name}: time / matmul"] = row["seconds"] / rows["matmul"]["seconds"]
                    summary[f"{group} {name}: speed-up vs linear+topk"] = rows["linear+topk"]["seconds"] / row["seconds"]
                    summary[f"{group} {name}: peak memory / linear+topk"] = row["peak_bytes"] / max(1, rows["linear+topk"]["peak_bytes"])
        if group.startswith("primitives"):
            for name, row in rows.items():
                summary[f"{group} {name}: fraction of copy bandwidth"] = row["fraction_of_copy_bw"]
    name = "gpu_kernels_" + torch.cuda.get_device_name().replace(" ", "_") + ".json"
    path = write_result(name, {"copy_bandwidth_Bps": bw, "results": RESULTS, "summary": summary})
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s")
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    print(f"written to {path}")
