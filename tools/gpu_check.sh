#!/usr/bin/env bash
# One prepared GPU check: the GPU tests, the device's roofs, sls on a 20M x 64 table, the Kaggle
# whole-model ops, dist on NCCL, serve and reference on the device, each step under its own
# `timeout`, most important first, inside one time budget; then ONE tarball of the runs and
# logs. Usage and what comes back: docs/gpu-check.md.
set -u

usage() {
    cat <<'EOF'
usage: tools/gpu_check.sh [--device cuda|cuda:N|cpu] [--tiny] [--out DIR] [--budget SECONDS]
                          [--gpu-batch N] [--loadgen-wheel WHEEL] [--dlrm-repo PATH]
                          [--tests "FILE ..."]
  --device         where the ops, serve and reference run (default cuda)
  --tiny           smoke-sized workloads and few rows: a quick run of every step (CPU tests)
  --out            where the tarball, log and summary go (default $OUT, else ./gpu-check-out)
  --budget         seconds for all steps together (default 450: the whole check < 8 minutes)
  --gpu-batch      batch of the Kaggle whole-model ops (default 65536; 2048 is launch-bound)
  --loadgen-wheel  an mlcommons-loadgen wheel to install when mlperf_loadgen is missing
                   (default $LOADGEN_WHEEL); without one, serve is skipped with the reason
  --dlrm-repo      a facebookresearch/dlrm checkout for the reference step (default
                   $DLRM_REPO); without one, reference is skipped with the reason
  --tests          the test files of the gpu_tests step (default: the GPU tests, see below)
exit status: 0 every step ok or skipped; 1 some step failed or timed out; 2 bad input
EOF
}

die() { echo "tools/gpu_check.sh: error: $1" >&2; exit 2; }

DEVICE=cuda
TINY=0
OUT_DIR=${OUT:-}
BUDGET_S=450
GPU_BATCH=65536
WHEEL=${LOADGEN_WHEEL:-}
DLRM=${DLRM_REPO:-}
TESTS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) [ $# -ge 2 ] || die "--device needs a value"; DEVICE=$2; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a value"; OUT_DIR=$2; shift 2 ;;
        --budget) [ $# -ge 2 ] || die "--budget needs a value"; BUDGET_S=$2; shift 2 ;;
        --gpu-batch) [ $# -ge 2 ] || die "--gpu-batch needs a value"; GPU_BATCH=$2; shift 2 ;;
        --loadgen-wheel) [ $# -ge 2 ] || die "--loadgen-wheel needs a value"; WHEEL=$2; shift 2 ;;
        --dlrm-repo) [ $# -ge 2 ] || die "--dlrm-repo needs a value"; DLRM=$2; shift 2 ;;
        --tests) [ $# -ge 2 ] || die "--tests needs a value"; TESTS=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$DEVICE" =~ ^(cpu|cuda|cuda:[0-9]+)$ ]] || die "--device $DEVICE: give cpu, cuda or cuda:N"
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] && [ "$BUDGET_S" -ge 30 ] || die "--budget $BUDGET_S: give whole seconds >= 30"
[[ "$GPU_BATCH" =~ ^[1-9][0-9]*$ ]] || die "--gpu-batch $GPU_BATCH: give a whole number >= 1"
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || die "--loadgen-wheel $WHEEL: no such file"
OUT_DIR=${OUT_DIR:-gpu-check-out}
mkdir -p "$OUT_DIR" 2>/dev/null && [ -w "$OUT_DIR" ] || die "--out $OUT_DIR: cannot write there"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
[ -z "$WHEEL" ] || WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
[ -z "$DLRM" ] || [ ! -d "$DLRM" ] || DLRM=$(cd "$DLRM" && pwd)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || die "cannot enter $ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
RUNS=$WORK/runs
LOGS=$WORK/logs
mkdir -p "$RUNS" "$LOGS"
LOG=$WORK/gpu_check.log
SUMMARY=$WORK/gpu_check_summary.tsv
RESERVE_S=20  # kept back from the budget for the read-back and the tarball
STARTED=$(date +%s)
FAILED=0
printf 'step\tstatus\texit\twall_s\tlimit_s\tnote\n' >"$SUMMARY"

say() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$LOG" >&2; }

record() {  # record NAME STATUS EXIT WALL LIMIT NOTE
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$SUMMARY"
    say "step $1: $2 (exit $3, ${4} s of ${5} s)${6:+: $6}"
}

skip() {  # skip NAME REASON [STATUS]
    printf '%s\t%s\t-\t0\t0\t%s\n' "$1" "${3:-skipped}" "$2" >>"$SUMMARY"
    say "step $1: ${3:-skipped}: $2"
}

step() {  # step NAME LIMIT_S COMMAND...: run under timeout within what the budget has left
    local name=$1 limit=$2 left note="" status rc begin wall
    shift 2
    limit=$((limit * LIMIT_SCALE))
    left=$((BUDGET_S - RESERVE_S - ($(date +%s) - STARTED)))
    if [ "$left" -lt 10 ]; then
        skip "$name" "the budget of ${BUDGET_S} s is spent" not_run
        FAILED=1
        return
    fi
    if [ "$left" -lt "$limit" ]; then
        note="limit cut from ${limit} s to what the budget has left"
        limit=$left
    fi
    say "step $name: start (limit ${limit} s): $*"
    begin=$(date +%s.%N)
    # timeout signals the step's whole process group: workers and torchrun ranks end with it.
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    wall=$(awk -v a="$begin" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        3) status=partial; note="${note:+$note; }some rows errored (exit 3)"; FAILED=1 ;;
        124|137) status=timeout; FAILED=1 ;;
        *) status=failed; FAILED=1 ;;
    esac
    if [ "$rc" -ne 0 ]; then
        note="${note:+$note; }last line: $(grep -v '^[[:space:]]*$' "$LOGS/$name.log" | tail -n 1 | tr '\t' ' ' | cut -c1-200)"
    fi
    record "$name" "$status" "$rc" "$wall" "$limit" "$note"
}

BENCH=("$PY" run_bench.py)  # timeout runs programs, not shell functions

# ---------------------------------------------------------------- sizes
LIMIT_SCALE=1
if [ "$TINY" = 1 ]; then
    # Tiny runs are the CPU's test of this script, where a shared CPU can be ten times slower
    # than a GPU machine's host: longer step limits, still inside --budget.
    LIMIT_SCALE=3
    MIN_RUN=0.05
    ROOFS=(--precision fp32 --membw-sizes 65536,1048576)
    SLS=(--rows 20000 --batch-size 64,256 --precision fp32)
    MODEL=(--workload smoke --batch-size 64 --precision fp32)
    DIST=(--workload smoke --ops dlrm_train,allreduce --steps 3 --warmup-steps 1 --sizes 4096)
    SERVE=(--workload smoke --query-size uniform:1,24 --queries 128 --min-queries 300
           --min-duration 0.2 --max-batch 64)
    REFERENCE=(--workload smoke --iterations 3 --warmup 1 --impls per_table --min-run-time 0.02)
    MODEL_IMPLS=per_table,batched,fused_sgd
    TABLES=(--workload smoke --batch-size 64 --precision fp32)
    MLPERF=(--workload mlperf --max-rows 1000 --batch-size 64)
else
    MIN_RUN=0.2
    ROOFS=(--precision fp32,bf16)
    SLS=(--rows 20000000 --batch-size 2048,65536 --precision fp32,bf16)
    # The whole model: the quick sweep would cap kaggle's tables at 100,000 rows.
    MODEL=(--workload kaggle --max-rows 1000000000 --batch-size "$GPU_BATCH" --precision fp32,bf16)
    DIST=(--workload kaggle --max-rows 1000000 --batch-size 65536
          --ops dlrm_train,dlrm_infer,allreduce,alltoall --steps 10)
    SERVE=(--workload kaggle --query-size dlrmv2 --queries 1024 --min-queries 20000
           --min-duration 5 --max-batch 16384)
    REFERENCE=(--workload kaggle --iterations 10 --warmup 3 --impls per_table,batched
               --min-run-time 0.2)
    # Issue 23's targets: our Triton TBE and the graphed step beside stock PyTorch.
    MODEL_IMPLS=per_table,batched,fused_sgd,triton_tbe,cuda_graph
    TABLES=(--workload kaggle --max-rows 1000000000 --batch-size "$GPU_BATCH" --precision fp32,bf16)
    # The whole DLRMv2 model (97 GiB of tables, built on the device) at its GPU batch (the
    # MLPerf global batch, 55,296): one training step beside MLPerf's 1.88M samples/s a GPU.
    MLPERF=(--workload mlperf --max-rows 1000000000)
fi
DIST_DEVICE=$DEVICE
[ "$DEVICE" = cpu ] || DIST_DEVICE=cuda  # each rank takes the GPU of its local rank

say "gpu_check: device $DEVICE, tiny $TINY, budget ${BUDGET_S} s, out $OUT_DIR, tree $ROOT"

# ---------------------------------------------------------------- steps, most important first
step env 30 bash -c "nvidia-smi || echo 'nvidia-smi: not here'; \"$PY\" -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \"gpus\", torch.cuda.device_count())'"

# The GPU tests of the measuring packages (the Triton kernels run on the GPU in the sls and
# model steps; their tests run Triton's CPU interpreter); never tests/tools (this script's own
# test runs the script).
[ -n "$TESTS" ] || TESTS=$(ls tests/run/test_cuda.py tests/run/test_gpu_path.py \
    tests/run/test_telemetry.py tests/{run,ops,models,distributed,serve}/test_*{cuda,gpu}*.py \
    2>/dev/null | sort -u)
# shellcheck disable=SC2086
step gpu_tests 90 "$PY" -m pytest -p no:cacheprovider -q -rs --junitxml="$RUNS/gpu_tests.xml" $TESTS

step roofs 60 "${BENCH[@]}" --ops membw,gemm_peak --device "$DEVICE" "${ROOFS[@]}" --min-run-time "$MIN_RUN" \
    --out "$RUNS" --run-id roofs --no-report

step sls 60 "${BENCH[@]}" --ops sls --workload synthetic --dim 64 --pooling 32 --num-tables 1 --sls-modes sum \
    "${SLS[@]}" --device "$DEVICE" --min-run-time "$MIN_RUN" --out "$RUNS" --run-id sls --no-report

step kaggle_models 100 "${BENCH[@]}" --ops dlrm_infer,dlrm_train --impls "$MODEL_IMPLS" \
    "${MODEL[@]}" --device "$DEVICE" --min-run-time "$MIN_RUN" --out "$RUNS" --run-id kaggle_models \
    --no-report

# All 26 tables in one lookup (every impl, Triton's one launch included) and TT-Rec's lookup
# against the dense one (the Triton TT kernel with and without its cache).
step tables 60 "${BENCH[@]}" --ops sls_multi,tt_sls "${TABLES[@]}" --device "$DEVICE" \
    --min-run-time "$MIN_RUN" --out "$RUNS" --run-id tables --no-report

step mlperf 120 "${BENCH[@]}" --ops dlrm_train --impls fused_sgd,per_table --precision fp32 \
    "${MLPERF[@]}" --device "$DEVICE" --min-run-time "$MIN_RUN" --out "$RUNS" --run-id mlperf \
    --no-report

step dist 45 "${BENCH[@]}" dist --device "$DIST_DEVICE" --nproc 1 "${DIST[@]}" --out "$RUNS" --run-id dist

if ! "$PY" -c 'import mlperf_loadgen' 2>/dev/null && [ -n "$WHEEL" ]; then
    step loadgen_install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEEL"
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if "$PY" -c 'import mlperf_loadgen' 2>/dev/null; then
    step serve 60 "${BENCH[@]}" serve --scenario offline --batching on "${SERVE[@]}" --device "$DEVICE" \
        --out "$RUNS" --run-id serve
else
    skip serve "mlperf_loadgen is not importable and no wheel was given (--loadgen-wheel or LOADGEN_WHEEL)"
fi

if [ -n "$DLRM" ] && [ -f "$DLRM/dlrm_s_pytorch.py" ]; then
    step reference 60 "${BENCH[@]}" reference --dlrm-repo "$DLRM" --mode train,infer --rounds 1 \
        --precision fp32 "${REFERENCE[@]}" --device "$DEVICE" --out "$RUNS" --run-id reference \
        --no-report
else
    skip reference "no facebookresearch/dlrm checkout (--dlrm-repo or DLRM_REPO${DLRM:+: $DLRM has no dlrm_s_pytorch.py})"
fi

# ---------------------------------------------------------------- read back, pack
RESERVE_S=0  # the reserve is for the read-back and the tarball
step readback 30 "$PY" - "$RUNS" <<'EOF'
"""Every results.csv of the runs read back by bench.records.read_rows: rows per status."""
import collections
import json
import sys
from pathlib import Path

from bench.records import read_rows

root = Path(sys.argv[1])
counts = {}
for path in sorted(root.rglob("results.csv")):
    rows = read_rows(path)
    counts[str(path.relative_to(root))] = dict(collections.Counter(row.status for row in rows))
    print(f"{path.relative_to(root)}: {len(rows)} rows {counts[str(path.relative_to(root))]}")
(root / "readback.json").write_text(json.dumps(counts, indent=1) + "\n")
if not counts:
    sys.exit("no results.csv under " + str(root))
EOF

TOTAL=$(( $(date +%s) - STARTED ))
say "gpu_check: done in ${TOTAL} s; $( [ "$FAILED" = 0 ] && echo 'every step ok or skipped' || echo 'some steps failed or timed out: see the summary')"
cp "$LOG" "$SUMMARY" "$OUT_DIR"/
tar -czf "$OUT_DIR/gpu_check.tar.gz" -C "$WORK" runs logs gpu_check.log gpu_check_summary.tsv
echo "tarball: $OUT_DIR/gpu_check.tar.gz ($(du -h "$OUT_DIR/gpu_check.tar.gz" | cut -f1)); log: $OUT_DIR/gpu_check.log" >&2
rm -rf "$WORK"
exit "$FAILED"
