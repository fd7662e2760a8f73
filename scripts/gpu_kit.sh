#!/usr/bin/env bash
# The GPU kit: on a lent GPU machine, one command builds tckernels' CUDA kernels, checks every GPU
# kernel and measures every GPU figure, inside a global deadline, writing logs and results to OUTDIR.
#
#   bash scripts/gpu_kit.sh OUTDIR                   # on the GPU machine ($OUT there; TCK_GIT_COMMIT=<sha>
#                                                    # names the commit when the copy there has no .git)
#   bash scripts/gpu_kit.sh --from cuda_tests OUTDIR # pick up where a deadline stopped a first call
#   bash scripts/gpu_kit.sh --deadline 480 OUTDIR    # seconds for the whole run (default 540)
#   bash scripts/gpu_kit.sh --dry-run OUTDIR         # the whole script on a CPU: Triton through its
#                                                    # interpreter at tiny shapes, no CUDA steps
#   bash scripts/gpu_kit.sh --plan                   # the time plan for a 16-core H200 machine
#
# Steps, in order (each has its own time limit, cut to what the deadline leaves):
#   probe        GPU, driver, nvcc, cmake, pybind11, compute-sanitizer and its flags
#   deps         install what the machine lacks from the carried wheels (build/wheels, made by
#                scripts/gpu_kit_wheels.sh); the machine has no package registry
#   build_triton build _C for this GPU's architecture only, in the background, while the Triton
#                tests run in the foreground (they need no _C): autotuning off, a persistent
#                TRITON_CACHE_DIR (build/triton-cache), pytest-xdist
#   cuda_tests   tests/backends/test_cuda.py (slow tests included) and tests/ops on CUDA tensors
#   memcheck     compute-sanitizer memcheck over scripts/sanitize_cuda_ops.py, tckernels kernels only
#   racecheck    compute-sanitizer racecheck on the kernel that uses shared memory (topk_relu)
#   figures      every bf16 Triton configuration compiled on all cores into the cache, then
#                bench/test_gpu_kernels.py and bench/test_gpu_transcoder_step.py in quick mode:
#                every op on cuda and triton against its baseline, side by side; JSON to OUTDIR
# A step the deadline cannot fit is skipped with every later one, and summary.txt says to rerun
# with --from that step. OUTDIR gets one log per step, summary.txt and kit.json (the steps, their
# status and seconds, the machine) plus the benchmark JSON files. Exit status: 0 when every step
# that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS=(probe deps build_triton cuda_tests memcheck racecheck figures)
# limit_s: the most a step may take on the GPU machine; need_s: below this much time left the
# step is not started. scripts/gpu_kit_plan.py derives both from measurements (see --plan).
declare -A LIMIT=([probe]=20 [deps]=45 [build_triton]=170 [cuda_tests]=110 [memcheck]=60 [racecheck]=45 [figures]=170)
declare -A NEED=([probe]=5 [deps]=10 [build_triton]=60 [cuda_tests]=40 [memcheck]=30 [racecheck]=20 [figures]=60)
# the build alone (a later call, --from, on a fresh machine) is within build_triton's limit

DRY=0
PLAN=0
FROM=probe
DEADLINE=${TCK_KIT_DEADLINE:-540}
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --plan) PLAN=1 ;;
    --from) FROM=${2:?--from needs a step name}; shift ;;
    --from=*) FROM=${1#--from=} ;;
    --deadline) DEADLINE=${2:?--deadline needs seconds}; shift ;;
    --deadline=*) DEADLINE=${1#--deadline=} ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) echo "gpu_kit: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -n "$OUTDIR" ] && { echo "gpu_kit: one OUTDIR only (got $OUTDIR and $1)" >&2; exit 2; }; OUTDIR=$1 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
if [ "$PLAN" = 1 ]; then
  exec "$PY" scripts/gpu_kit_plan.py
fi
[ -n "$OUTDIR" ] || { echo "gpu_kit: give the output folder (e.g. \$OUT on the GPU machine); see --help" >&2; exit 2; }
case " ${STEPS[*]} " in *" $FROM "*) ;; *) echo "gpu_kit: --from $FROM: no such step; steps: ${STEPS[*]}" >&2; exit 2 ;; esac
[[ "$DEADLINE" =~ ^[0-9]+$ ]] || { echo "gpu_kit: --deadline must be whole seconds, got $DEADLINE" >&2; exit 2; }
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${TCK_KIT_WHEELS:-build/wheels}
# The commit measured: a copy of the tree without .git (as a GPU machine may get) names it here.
TCK_GIT_COMMIT=${TCK_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export TCK_GIT_COMMIT
WORKERS=$(( $(nproc) > 8 ? 8 : $(nproc) ))
START=$SECONDS
FAILED=0
RESULTS=()   # "name status seconds note" lines for summary.txt and kit.json
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - (SECONDS - START))); }
record() {  # record NAME STATUS SECONDS NOTE
  RESULTS+=("$1|$2|$3|$4")
  say "$(printf '%-8s %-13s %4ss  %s' "$2" "$1" "$3" "$4")"
  [ "$2" = FAIL ] && FAILED=1
  return 0
}

# run NAME LIMIT CMD...: CMD under min(LIMIT, time left), output to NAME.log (and the terminal).
run() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  local l
  l=$(left)
  [ "$limit" -gt "$l" ] && limit=$l
  echo "=== $name (limit ${limit}s): $*" >"$OUTDIR/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUTDIR/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUTDIR/$name.log"
  if [ "$rc" -eq 0 ]; then
    record "$name" PASS $((SECONDS - t0)) ""
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" FAIL $((SECONDS - t0)) "timed out after ${limit}s (see $name.log)"
  else
    record "$name" FAIL $((SECONDS - t0)) "exit $rc (see $name.log)"
  fi
  return "$rc"
}

# --- the steps ------------------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
[ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer

probe() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)  commit: $TCK_GIT_COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || echo "nvidia-smi: none"
  nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc: none"
  cmake --version 2>/dev/null | head -n 1 || echo "cmake: none"
  ninja --version 2>/dev/null | sed 's/^/ninja /' || echo "ninja: none"
  "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
      torch.cuda.get_device_capability() if torch.cuda.is_available() else "")
for name in ("triton", "transformers", "pybind11", "pytest", "xdist", "pytest_benchmark", "hypothesis", "sparsify"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: missing ({type(exc).__name__})")
EOF
  if [ -n "$SANITIZER" ]; then
    echo "compute-sanitizer: $SANITIZER"
    "$SANITIZER" --version | tail -n 1
    "$SANITIZER" --help | grep -E -- "--kernel-name|--racecheck-report|--error-exitcode|--print-limit" | head -n 8
  else
    echo "compute-sanitizer: none"
  fi
}

deps() {
  # a command (cmd:NAME) or an import, then the wheels that provide it; sparsify is the optional
  # training-step baseline
  local NEEDS=("pybind11 pybind11" "cmd:cmake cmake" "cmd:ninja ninja" "xdist pytest-xdist" "execnet execnet"
               "pytest_benchmark pytest-benchmark" "hypothesis hypothesis"
               "sparsify eai-sparsify natsort simple-parsing docstring-parser schedulefree datasets dill multiprocess")
  local missing=() entry what modules=() absent
  for entry in "${NEEDS[@]}"; do
    what=${entry%% *}
    case "$what" in
      cmd:*) command -v "${what#cmd:}" >/dev/null || missing+=(${entry#* }) ;;
      *) modules+=("$what") ;;
    esac
  done
  # one interpreter checks every module (each import of a torch package costs seconds)
  absent=$("$PY" - "${modules[@]}" <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
)
  for entry in "${NEEDS[@]}"; do
    what=${entry%% *}
    [[ " $absent " == *" $what "* ]] && missing+=(${entry#* })
  done
  if [ ${#missing[@]} -eq 0 ]; then echo "nothing missing"; return 0; fi
  echo "missing: ${missing[*]}"
  if [ "$DRY" = 1 ]; then echo "dry run: would install them from $WHEELS"; return 0; fi
  [ -d "$WHEELS" ] || { echo "no carried wheels at $WHEELS (make them with scripts/gpu_kit_wheels.sh)"; return 1; }
  local files=() w f
  for w in "${missing[@]}"; do
    f=$(ls "$WHEELS"/$(echo "$w" | tr - _)-*.whl 2>/dev/null | head -n 1)
    if [ -n "$f" ]; then files+=("$f"); else echo "no wheel for $w in $WHEELS"; fi
  done
  [ ${#files[@]} -eq 0 ] && return 1
  # --target: the image's site-packages may not be writable; PYTHONPATH makes them visible.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target build/kit-site "${files[@]}"
}

cuda_arch() {
  "$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')"
}

build() {
  if [ "$DRY" = 1 ]; then
    "$PY" -c "import tckernels._C as c; print('dry run: the installed _C, with_cuda', c.with_cuda)"
    return
  fi
  local arch
  arch=$(cuda_arch) || return 1
  echo "building for sm_$arch with $(nproc) jobs"
  # In place (tckernels/_C*.so, found through PYTHONPATH): nothing is installed into the image.
  TCK_CUDA=1 TCK_CUDA_ARCHS=$arch CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" setup.py -q build_ext --inplace &&
    "$PY" -c "import tckernels._C as c; assert c.with_cuda, 'built without CUDA'; print('_C with_cuda', c.with_cuda, 'archs', c.cuda_archs)"
}

xdist() {  # pytest's parallel flags when pytest-xdist is importable
  "$PY" -c "import xdist" 2>/dev/null && echo "-n $WORKERS" || true
}

triton_tests() {
  local select=()
  if [ "$DRY" = 1 ]; then
    # the interpreter is slow: the fused encoder through its first configuration, with and without
    # tensor descriptors
    export TRITON_INTERPRET=1
    select=(-k "every_config_encode_topk and (0-0 or 0-1)")
  fi
  TCK_TRITON_AUTOTUNE=0 TRITON_CACHE_DIR="$PWD/build/triton-cache" \
    "$PY" -m pytest -q -p no:cacheprovider $(xdist) tests/backends/test_triton.py "${select[@]}"
}

build_triton() {
  local t0=$SECONDS bpid brc limit
  limit=${LIMIT[build_triton]}
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "=== build (in the background, build.log) and triton_tests (limit ${limit}s)"
  timeout --kill-after=10 "$limit" bash -c build >"$OUTDIR/build.log" 2>&1 &
  bpid=$!
  run triton_tests "$limit" bash -c triton_tests
  wait "$bpid"
  brc=$?
  tail -n 15 "$OUTDIR/build.log"
  if [ "$brc" -eq 0 ]; then record build PASS $((SECONDS - t0)) "in the background"
  else record build FAIL $((SECONDS - t0)) "exit $brc (see build.log)"; fi
  [ "$brc" -eq 0 ]
}

has_cuda_build() {
  "$PY" -c "import tckernels._C as c; assert c.with_cuda" 2>/dev/null
}

cuda_tests() {
  "$PY" -m pytest -q -rs -p no:cacheprovider $(xdist) tests/backends/test_cuda.py tests/ops
}

sanitize() {  # sanitize TOOL FILTER [extra flags]
  local tool=$1 filter=$2
  shift 2
  local flags=(--tool "$tool" --error-exitcode 1 --print-limit 20)
  # Instrument tckernels' kernels only, not torch's (if this compute-sanitizer can filter).
  "$SANITIZER" --help | grep -q -- "--kernel-name" && flags+=(--kernel-name "kns=$filter")
  # No caching allocator: every tensor is its own allocation, so memcheck sees any overrun.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" "${flags[@]}" "$@" "$PY" scripts/sanitize_cuda_ops.py
}

figures() {
  local env=(TCK_BENCH_RESULTS="$OUTDIR" TCK_BENCH_QUICK=1 TRITON_CACHE_DIR="$PWD/build/triton-cache")
  [ "$DRY" = 1 ] && env=(TCK_BENCH_RESULTS="$OUTDIR" TCK_BENCH_SMOKE=1 TRITON_INTERPRET=1)
  if [ "$DRY" = 0 ]; then
    # Autotuning compiles every configuration one after another; compile them on every core first,
    # into the cache the benchmarks read (the figures' first-call times show whether it hit).
    "$PY" scripts/triton_compile_report.py --dtypes bf16 --jobs "$(nproc)" --cache "$PWD/build/triton-cache" \
      >"$OUTDIR/triton_warm.jsonl" 2>&1 || echo "warming the Triton cache failed (see triton_warm.jsonl)"
    tail -n 1 "$OUTDIR/triton_warm.jsonl" | cut -c1-300
  fi
  env "${env[@]}" "$PY" -m pytest -q -s -p no:cacheprovider bench/test_gpu_kernels.py bench/test_gpu_transcoder_step.py
}

# --- the run --------------------------------------------------------------------------------
say "gpu kit: $(date -u +%FT%TZ), deadline ${DEADLINE}s, from $FROM$( [ "$DRY" = 1 ] && echo ', dry run (CPU)')"
export PYTHONPATH="$PWD/build/kit-site:$PYTHONPATH"
export DRY PY WHEELS WORKERS SANITIZER OUTDIR
export -f probe deps build cuda_arch xdist triton_tests cuda_tests sanitize figures
started=0
stopped=""   # the first step the deadline could not fit
for s in "${STEPS[@]}"; do
  [ "$s" = "$FROM" ] && started=1
  # probe and deps always run: a second call may land on a fresh machine
  if [ "$started" = 0 ] && [ "$s" != probe ] && [ "$s" != deps ]; then
    record "$s" SKIP 0 "before --from $FROM"
    continue
  fi
  if [ -n "$stopped" ] || [ "$(left)" -lt "${NEED[$s]}" ]; then
    [ -z "$stopped" ] && stopped=$s
    record "$s" SKIP 0 "deadline ($(left)s left); rerun with --from $stopped"
    continue
  fi
  case "$s" in
    probe|deps) run "$s" "${LIMIT[$s]}" bash -c "$s" ;;
    build_triton)
      build_triton || { [ "$DRY" = 1 ] || say "the build failed: the CUDA steps cannot run"; } ;;
    cuda_tests|memcheck|racecheck)
      if [ "$DRY" = 1 ]; then record "$s" SKIP 0 "dry run: no CUDA"; continue; fi
      if ! has_cuda_build; then  # a later call on a fresh machine: build first (not the Triton tests)
        run build "${LIMIT[build_triton]}" bash -c build || continue
      fi
      case "$s" in
        cuda_tests) run cuda_tests "${LIMIT[cuda_tests]}" bash -c cuda_tests ;;
        memcheck) [ -n "$SANITIZER" ] || { record "$s" FAIL 0 "compute-sanitizer not found"; continue; }
          run memcheck "${LIMIT[memcheck]}" bash -c 'sanitize memcheck tck' ;;
        racecheck) [ -n "$SANITIZER" ] || { record "$s" FAIL 0 "compute-sanitizer not found"; continue; }
          run racecheck "${LIMIT[racecheck]}" bash -c 'sanitize racecheck topk_relu_kernel --racecheck-report hazard' ;;
      esac
      if grep -q "Device not supported" "$OUTDIR/$s.log" 2>/dev/null; then
        say "  ($s: compute-sanitizer does not support this device or runtime)"
      fi ;;
    figures)
      if [ "$DRY" = 0 ] && ! has_cuda_build; then run build "${LIMIT[build_triton]}" bash -c build; fi
      run figures "${LIMIT[figures]}" bash -c figures ;;
  esac
done

total=$((SECONDS - START))
"$PY" - "$OUTDIR/kit.json" "$total" "$DEADLINE" "$DRY" "${RESULTS[@]}" <<'EOF'
import json, os, sys
from bench.conftest import environment  # what every benchmark result is stamped with
path, total, deadline, dry, *rows = sys.argv[1:]
steps = [dict(zip(("name", "status", "seconds", "note"), r.split("|", 3))) for r in rows]
for s in steps:
    s["seconds"] = int(s["seconds"])
machine = {**environment(), "cores": os.cpu_count()}
json.dump({"total_seconds": int(total), "deadline_seconds": int(deadline), "dry_run": dry == "1",
           "steps": steps, "machine": machine}, open(path, "w"), indent=1)
EOF
say "total ${total}s of ${DEADLINE}s; logs and results in $OUTDIR"
if [ "$FAILED" = 0 ]; then say "ALL STEPS THAT RAN PASSED"; else say "SOME STEPS FAILED"; fi
exit "$FAILED"
