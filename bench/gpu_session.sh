#!/usr/bin/env bash
# One prepared run for a lent H100/H200 (the device tool's image has torch, triton, transformers, pytest,
# pytest-benchmark; no internet). In order, each step bounded so the whole run ends within $BUDGET seconds
# (default 560, inside the device tool's 10-minute call):
#   1. install this checkout without dependencies (editable, no build isolation: nothing to download)
#   2. the GPU tests (kernel vs torch ops, int64 offsets, engine triton vs torch) and the engine tests on CUDA
#   3. bench_kernel.py at n = 128, 512, 2048, float32 and bf16
#   4. bench_compare.py workload (a); then (b) and (c) if time is left
# Results land in bench/results/ (commit them) and are copied to $OUT when it is set (the device tool).
#
#     bash bench/gpu_session.sh            # on the device: run(command="bash bench/gpu_session.sh", timeout_s=600)
#
# Captum rows need the captum wheel: put captum-*.whl in .whl/ and carry ".whl".
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python=${PYTHON:-python3}
results=bench/results
budget=${BUDGET:-560}
log() { echo "== $(date +%H:%M:%S) [${SECONDS}s] $*"; }
# step LIMIT CMD...: run CMD for at most LIMIT seconds and never past the budget; skip it when < 30 s are left
step() {
    local limit=$1 left=$((budget - SECONDS)); shift
    ((left < 30)) && { log "skipped (budget spent): $*"; return 0; }
    timeout $((limit < left ? limit : left)) "$@"
}
copy_out() { [[ -n "${OUT:-}" ]] && cp "$results"/h[0-9]*.json "$OUT"/ 2>/dev/null; true; }

log "install"
if compgen -G ".whl/*.whl" >/dev/null; then
    $python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
$python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

log "GPU tests"
step 150 $python -m pytest -q tests/test_kernels.py tests/test_engine.py 2>&1 | tail -15

log "kernel benchmark"
step 120 $python bench/bench_kernel.py
copy_out

for workload in a b c; do
    log "bench_compare workload $workload"
    step 300 $python bench/bench_compare.py --workloads "$workload"
    copy_out
done
log "done"
