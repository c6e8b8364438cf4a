#!/usr/bin/env bash
# GPU check: build dcp_native, run the GPU tests and the GPU benchmarks, in under 8 minutes.
#
# usage: benchmarks/gpu_check.sh OUTDIR [--no-cuda]
#
# For a GPU machine whose python3 already has torch (and pytest, pybind11,
# cmake, ninja, setuptools, numpy, matplotlib) and no network: nothing is
# installed. The extension is built in place (setup.py build_ext --inplace, as
# `make build` does) and the repository is put on PYTHONPATH; `.venv` is
# neither needed nor touched. Steps, each with its own time limit inside an
# overall budget of GPU_CHECK_BUDGET_S (default 470 s):
#
#   1. environment: nvidia-smi, torch / CUDA versions, CPU, disk   -> summary.txt
#   2. build                                                         -> build.log
#   3. GPU tests: pytest -m "cuda or fake_cuda or real_cudart", DCP_NATIVE_REQUIRE_CUDA=1 -> tests.log
#      (the real-GPU tests, and the pipeline tests against the fake runtime)
#   4. two GPUs: benchmarks/multi_gpu_check.py, 2 gloo ranks, rank r on cuda:r only,
#      saving and loading with dcp_native (native engine, then Python engine); it fails
#      when nvidia-smi shows a rank with a process on another rank's GPU (a stray CUDA
#      context: rank 1 on GPU 0). SKIP (passes) when torch sees fewer than 2 GPUs or
#      there is no nvidia-smi                                  -> multi_gpu.log, multi_gpu.json
#      Then benchmarks/cooperative.py --device cuda --ranks 2: cooperative loads over NCCL,
#      checked values, bytes read and time with and without (SKIP with < 2 GPUs) -> multi_gpu.log
#   5. benchmarks: a --quick --device cuda pass (the code path); benchmarks/narrow_columns.py
#      when it exists (column-shard loads into CUDA memory, up to 60 s); then the
#      sized run (--device cuda --reps 2) in the time left             -> bench.log,
#      narrow_columns.json, latest.json, latest.md, latest.png (partial results are kept
#      if cut short)
#
# OUTDIR holds at most 10 files, flat. The exit status is 0 when the build, the
# tests, the two-GPU check (or its SKIP) and the benchmark runs succeeded;
# summary.txt says what each step did.
#
# --no-cuda runs the same steps without a GPU, to check the script itself: the
# tests and two-GPU steps are skipped, and the benchmarks run on the CPU (--device cpu).
# Without --no-cuda, a machine where torch sees no CUDA device fails at once.

set -u -o pipefail

usage() { echo "usage: $0 OUTDIR [--no-cuda]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT_ARG=$1
shift
NO_CUDA=0
for arg in "$@"; do
    case "$arg" in
        --no-cuda) NO_CUDA=1 ;;
        *) usage ;;
    esac
done

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT_ARG" || exit 2
OUT=$(cd "$OUT_ARG" && pwd)
SUMMARY="$OUT/summary.txt"
START=$SECONDS
STATUS=0

log() { echo "[$((SECONDS - START))s] $*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - START))); }

: > "$SUMMARY"
log "dcp_native GPU check: repo $REPO, python $(command -v "$PY"), budget ${BUDGET}s, no-cuda=$NO_CUDA"

# ----------------------------------------------------------------------------- 1. environment
{
    echo "--- host"
    uname -a
    nproc
    grep -m1 "model name" /proc/cpuinfo || true
    grep MemTotal /proc/meminfo || true
    df -h "$REPO" "${TMPDIR:-/tmp}" 2>/dev/null || true
    echo "--- git"
    git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "(not a git checkout)"
    git -C "$REPO" status --short 2>/dev/null | head -20
    echo "--- nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi || true
    else
        echo "nvidia-smi not found"
    fi
} >> "$SUMMARY" 2>&1

if ! TORCH_INFO=$(timeout 120 "$PY" -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(),
      "name", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
' 2>&1); then
    log "FAILED: $PY cannot import torch:"
    echo "$TORCH_INFO" >> "$SUMMARY"
    exit 1
fi
log "$TORCH_INFO"
CUDA_OK=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$NO_CUDA" = 0 ] && [ "$CUDA_OK" != 1 ]; then
    log "FAILED: torch.cuda.is_available() is False on this machine (use --no-cuda to check the script without a GPU)"
    exit 1
fi
DEVICE=cuda
[ "$NO_CUDA" = 1 ] && DEVICE=cpu

# ----------------------------------------------------------------------------- 2. build
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
log "build: $PY setup.py build_ext --inplace (log: build.log)"
if timeout 240 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    && "$PY" -c 'import dcp_native, dcp_native._C; import os; os.environ["DCP_NATIVE_BACKEND"] = "native"; assert dcp_native.backend() == "native"' >> "$OUT/build.log" 2>&1; then
    log "build: ok (native engine imports)"
else
    log "build: FAILED (tail of build.log follows); the benchmarks' native rows will fail"
    tail -20 "$OUT/build.log" >> "$SUMMARY"
    STATUS=1
fi

# ----------------------------------------------------------------------------- 3. GPU tests
if [ "$NO_CUDA" = 1 ]; then
    log "tests: skipped (--no-cuda)"
    echo "skipped: --no-cuda" > "$OUT/tests.log"
else
    T=$(( $(left) < 180 ? $(left) : 180 ))
    log "tests: pytest -m 'cuda or fake_cuda or real_cudart' with DCP_NATIVE_REQUIRE_CUDA=1, limit ${T}s (log: tests.log)"
    DCP_NATIVE_REQUIRE_CUDA=1 timeout "$T" "$PY" -m pytest -m "cuda or fake_cuda or real_cudart" -q -rfEs -p no:cacheprovider tests \
        > "$OUT/tests.log" 2>&1
    rc=$?
    case $rc in
        0) log "tests: passed ($(tail -1 "$OUT/tests.log"))" ;;
        124) log "tests: TIMED OUT after ${T}s"; STATUS=1 ;;
        *) log "tests: FAILED (exit $rc): $(tail -1 "$OUT/tests.log")"; STATUS=1 ;;
    esac
fi

# ----------------------------------------------------------------------------- 4. two GPUs
if [ "$NO_CUDA" = 1 ]; then
    log "multi-GPU: skipped (--no-cuda)"
    echo "skipped: --no-cuda" > "$OUT/multi_gpu.log"
else
    T=$(( $(left) < 120 ? $(left) : 120 ))
    if [ "$T" -lt 45 ]; then
        log "multi-GPU: not run, only ${T}s left"
        echo "not run: only ${T}s left" > "$OUT/multi_gpu.log"
        STATUS=1
    else
        # The script bounds itself (--timeout: ranks killed, FAIL with the reason); timeout(1) is the backstop.
        MT=$(( T - 15 < 90 ? T - 15 : 90 ))
        log "multi-GPU: multi_gpu_check.py --timeout ${MT}, limit ${T}s (log: multi_gpu.log, multi_gpu.json)"
        timeout -k 10 "$T" "$PY" benchmarks/multi_gpu_check.py --timeout "$MT" --out "$OUT/multi_gpu.json" \
            > "$OUT/multi_gpu.log" 2>&1
        rc=$?
        LAST=$(tail -1 "$OUT/multi_gpu.log" | cut -c1-600)
        case $rc in
            0) log "multi-GPU: $LAST" ;;  # PASS: ... or SKIP: ...
            124|137) log "multi-GPU: TIMED OUT after ${T}s"; STATUS=1 ;;
            *) log "multi-GPU: FAILED (exit $rc): $LAST"; STATUS=1 ;;
        esac
        # Cooperative loads over NCCL (2 ranks, one GPU each; a SKIP line with fewer GPUs),
        # appended to multi_gpu.log.
        T=$(( $(left) - 200 < 90 ? $(left) - 200 : 90 ))
        if [ "$T" -lt 30 ]; then
            log "cooperative (NCCL): not run, only $(left)s left"
        else
            echo "=== cooperative loads over NCCL: benchmarks/cooperative.py --device cuda --ranks 2" >> "$OUT/multi_gpu.log"
            timeout -k 10 "$T" "$PY" benchmarks/cooperative.py --device cuda --ranks 2 --mb 256 --reps 2 \
                --dir "${TMPDIR:-/tmp}" >> "$OUT/multi_gpu.log" 2>&1
            rc=$?
            case $rc in
                0) log "cooperative (NCCL): ok ($(tail -1 "$OUT/multi_gpu.log" | cut -c1-300))" ;;
                124|137) log "cooperative (NCCL): TIMED OUT after ${T}s"; STATUS=1 ;;
                *) log "cooperative (NCCL): FAILED (exit $rc; see multi_gpu.log)"; STATUS=1 ;;
            esac
        fi
    fi
fi

# ----------------------------------------------------------------------------- 5. benchmarks
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/dcp_native_gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
: > "$OUT/bench.log"

T=$(( $(left) < 120 ? $(left) : 120 ))
log "bench (quick, --device $DEVICE): limit ${T}s (log: bench.log)"
echo "=== quick run: --quick --device $DEVICE" >> "$OUT/bench.log"
timeout "$T" "$PY" benchmarks/run.py --quick --device "$DEVICE" --workload model --workload stage --workload async \
    --workload cold --workload many --workload reshard --out "$SCRATCH/quick" --dir "$SCRATCH" >> "$OUT/bench.log" 2>&1
rc=$?
if [ $rc = 0 ]; then
    log "bench (quick): ok"
else
    log "bench (quick): FAILED (exit $rc; see bench.log)"
    STATUS=1
fi

# Column-shard loads into CUDA memory (a SKIP line and exit 0 without a GPU), when the script exists;
# at most 60 s, leaving the sized run at least 60.
NC=benchmarks/narrow_columns.py
if [ ! -f "$NC" ]; then
    log "bench (narrow columns): skipped, $NC does not exist"
    echo "=== narrow columns: skipped, $NC does not exist" >> "$OUT/bench.log"
else
    T=$(( $(left) - 75 < 60 ? $(left) - 75 : 60 ))
    if [ "$T" -lt 20 ]; then
        log "bench (narrow columns): not run, only $(left)s left"
        STATUS=1
    else
        log "bench (narrow columns): $NC --out narrow_columns.json, limit ${T}s"
        echo "=== narrow columns: $NC --out narrow_columns.json" >> "$OUT/bench.log"
        timeout -k 5 "$T" "$PY" "$NC" --out "$OUT/narrow_columns.json" >> "$OUT/bench.log" 2>&1
        rc=$?
        case $rc in
            0) log "bench (narrow columns): ok ($(tail -1 "$OUT/bench.log" | cut -c1-300))" ;;
            124|137) log "bench (narrow columns): TIMED OUT after ${T}s"; STATUS=1 ;;
            *) log "bench (narrow columns): FAILED (exit $rc; see bench.log)"; STATUS=1 ;;
        esac
    fi
fi

T=$(( $(left) - 15 ))
if [ "$T" -lt 60 ]; then
    log "bench (sized): not run, only ${T}s left"
    STATUS=1
else
    # Sized for an H200 host (16 cores, NVMe): every workload at 1 GiB with 2 reps; the
    # results are written after each workload, so a run cut short keeps what it measured.
    SIZE=${GPU_CHECK_SIZE:-1G}
    [ "$NO_CUDA" = 1 ] && SIZE=64M
    log "bench (sized, --device $DEVICE --size $SIZE --reps 2): limit ${T}s"
    echo "=== sized run: --device $DEVICE --size $SIZE --reps 2" >> "$OUT/bench.log"
    timeout "$T" "$PY" benchmarks/run.py --device "$DEVICE" --size "$SIZE" --reps 2 --out "$OUT" \
        --dir "$SCRATCH" >> "$OUT/bench.log" 2>&1
    rc=$?
    case $rc in
        0) log "bench (sized): ok" ;;
        124) log "bench (sized): TIMED OUT after ${T}s; latest.json/.md hold the workloads that finished (partial)"; STATUS=1 ;;
        *) log "bench (sized): FAILED (exit $rc; see bench.log and the errors in latest.md)"; STATUS=1 ;;
    esac
fi

log "done in $((SECONDS - START))s, status $STATUS; files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $STATUS
