#!/usr/bin/env bash
# Builds tckernels with its CUDA kernels and checks them on a GPU machine, in about 4 minutes:
#   1. build (TCK_CUDA=1, archs from TCK_CUDA_ARCHS, default 90) and import tckernels._C
#   2. pytest tests/backends/test_cuda.py (every CUDA op against the reference)
#   3. compute-sanitizer memcheck and racecheck (synccheck too with TCK_SYNCCHECK=1) on
#      scripts/sanitize_cuda_ops.py, which calls every kernel at small shapes
#   4. quick timings: topk_relu against torch.topk, the gather/scatter kernels against a
#      device-to-device copy (the issue 7 targets)
# Every step after the build runs even when an earlier one failed; each step's output goes to
# $TCK_GPU_LOG (default: $OUT when set, else ./gpu_check_logs) and a summary ends the run. The
# exit status is non-zero when any step failed.
#
#   bash scripts/gpu_check.sh          # PYTHON=python3 by default
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LOGDIR=${TCK_GPU_LOG:-${OUT:-gpu_check_logs}}
mkdir -p "$LOGDIR"
export PYTHONUNBUFFERED=1
SUMMARY=()
FAILED=0

# step NAME TIMEOUT_S CMD...: runs CMD under a time limit, output to the terminal and NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS rc=0
  echo
  echo "=== $name: $*"
  set +e
  # bash -c so that CMD may be one of the functions below (exported with export -f).
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$LOGDIR/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  local secs=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("PASS  $name (${secs}s)")
  elif grep -q "Device not supported" "$LOGDIR/$name.log" 2>/dev/null; then
    SUMMARY+=("SKIP  $name: compute-sanitizer does not support this device/runtime (see $name.log)")
  else
    [ "$rc" -eq 124 ] && echo "$name: timed out after ${limit}s" | tee -a "$LOGDIR/$name.log"
    SUMMARY+=("FAIL  $name (exit $rc, ${secs}s; see $LOGDIR/$name.log)")
    FAILED=1
  fi
  return 0
}

summary() {
  echo
  echo "=================== gpu_check summary ==================="
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  if [ "$FAILED" -eq 0 ]; then echo "ALL PASSED"; else echo "SOME STEPS FAILED"; fi
  echo "logs: $LOGDIR"
}

env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -n 2 || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
}

build() {
  TCK_CUDA=1 TCK_CUDA_ARCHS=${TCK_CUDA_ARCHS:-90} "$PY" -m pip install --no-build-isolation --no-deps -e . &&
    "$PY" -c "import tckernels._C as c; assert c.with_cuda, 'built without CUDA'; print('tckernels._C with_cuda', c.with_cuda, 'archs', c.cuda_archs)"
}

SANITIZER=$(command -v compute-sanitizer || true)
[ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer

sanitize() {  # sanitize TOOL [extra flags]: one compute-sanitizer run over the small driver
  local tool=$1
  shift
  # No caching allocator: every tensor is its own allocation, so memcheck sees any overrun.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 "$@" \
    "$PY" scripts/sanitize_cuda_ops.py
}

bench() {
  "$PY" - <<'EOF'
import torch
from tckernels.backends import cuda as C

def timed(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1e-3  # seconds

dev, bf = "cuda", torch.bfloat16
print(torch.cuda.get_device_name(), "| torch", torch.__version__)
src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
copy_bw = 2 * src.numel() / timed(lambda: dst.copy_(src))
print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
del src, dst

print("\n-- topk_relu (bias + relu + top-k) vs torch.topk(pre, k) alone, bf16")
for M, N, k in [(8192, 131072, 64), (8192, 24576, 32), (4096, 12288, 1475), (8192, 8192, 10)]:
    pre = torch.randn(M, N, device=dev, dtype=bf)
    bias = torch.randn(N, device=dev, dtype=bf)
    t_ours = timed(lambda: C.topk_relu(pre, k, bias))
    t_torch = timed(lambda: torch.topk(pre, k, dim=1), iters=5)
    t_dense = timed(lambda: torch.topk(torch.relu(pre + bias), k, dim=1), iters=5)
    bw = pre.numel() * 2 / t_ours
    print(f"M={M} N={N} k={k}: ours {t_ours * 1e3:.3f} ms ({bw / 1e9:.0f} GB/s, {bw / copy_bw:.0%} of copy) | "
          f"torch.topk {t_torch * 1e3:.3f} ms -> {t_torch / t_ours:.2f}x | relu(pre+b).topk {t_dense * 1e3:.3f} ms "
          f"-> {t_dense / t_ours:.2f}x  (target >= 3x torch.topk at 8192x131072 k=64)")
    del pre, bias

print("\n-- gather / scatter, bf16 (bytes = gathered rows + the dense side, each once)")
for M, N, D, k in [(8192, 131072, 4096, 64), (8192, 24576, 768, 32), (4096, 12288, 5120, 1475), (8192, 8192, 3584, 10)]:
    g = torch.Generator(device=dev).manual_seed(0)
    W = torch.randn(N, D, device=dev, dtype=bf)
    idx = torch.randint(0, N, (M, k), device=dev, generator=g)
    val = torch.randn(M, k, device=dev, dtype=bf)
    G = torch.randn(M, D, device=dev, dtype=bf)
    rows = M * k * D * 2
    cases = [
        ("gather_matmul", lambda: C.gather_matmul(val, idx, W), rows + M * D * 2),
        ("gather_dot", lambda: C.gather_dot(G, idx, W), rows + M * D * 2 + M * k * 2),
        ("scatter atomic", lambda: C.scatter_matmul(val, idx, G, N, False), rows + N * D * 2),
        ("scatter det", lambda: C.scatter_matmul(val, idx, G, N, True), rows + N * D * 2),
        ("embedding_bag", lambda: torch.nn.functional.embedding_bag(idx, W, per_sample_weights=val, mode="sum"),
         rows + M * D * 2),
    ]
    line = []
    for name, fn, nbytes in cases:
        try:
            t = timed(fn, iters=5, warmup=2)
            line.append(f"{name} {t * 1e3:.3f} ms ({nbytes / t / copy_bw:.0%})")
        except Exception as exc:  # a baseline that does not run here must not hide the others
            line.append(f"{name} failed: {type(exc).__name__}: {exc}")
    print(f"M={M} N={N} D={D} k={k}: " + " | ".join(line) + "   (target >= 70% of copy)")
    del W, G
EOF
}

export PY SANITIZER
export -f env_info build sanitize bench
step env 60 env_info
step build 300 build
if grep -q "^FAIL  build" <(printf '%s\n' "${SUMMARY[@]}"); then
  summary
  exit 1
fi
step pytest 300 "$PY" -m pytest -q -rs --maxfail=50 -p no:cacheprovider tests/backends/test_cuda.py
if [ -n "$SANITIZER" ]; then
  step memcheck 240 sanitize memcheck
  step racecheck 240 sanitize racecheck --racecheck-report hazard
  if [ "${TCK_SYNCCHECK:-0}" = "1" ]; then step synccheck 240 sanitize synccheck; fi
else
  SUMMARY+=("FAIL  sanitizer: compute-sanitizer not found (PATH or /usr/local/cuda/bin)")
  FAILED=1
fi
step bench 240 bench
summary
exit "$FAILED"
