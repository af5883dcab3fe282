#!/usr/bin/env bash
# One prepared run for a lent H100/H200 (the device tool's image has torch, triton, transformers, pytest,
# pytest-benchmark; no internet). First the checkout goes on PYTHONPATH (no install: pip's build step would need
# the internet); then the steps named in $STEPS, in that order, each bounded so the whole run ends within
# $BUDGET seconds (default 560, inside the device tool's 10-minute call):
#   tests     the GPU-marked tests (kernel vs torch ops, int64 offsets, engine triton vs torch)
#   memory    memory_model.py: engine.row_bytes (the planner's memory model) against the measured peak per row
#   phases    profile_engine.py --phases: torch bf16 gl 2 and rr 20 on 256 sentences phase by phase (prefix, rows
#             forward, rows backward, baseline, ...): each phase's time, its kernels by category, and how busy the
#             GPU was in it
#   profile   profile_engine.py (the device's matmul ceilings; where the engine's GPU time goes), $PROFILE_ARGS
#   compile   engine_ab.py --compare compile: the rows' layers eager against torch.compile (bf16 gl 2 and
#             rr 20, 256 sentences; the warm-up call's time includes compiling)
#   packing   engine_ab.py --compare packing: rows packed to their real tokens against rows padded (bf16 gl 2
#             and rr 20, 256 sentences; packing every padded group, so the padding of both rules is measured)
#   tf32      engine_ab.py --compare tf32: bf16 rows with their float32 products (prefix, reduction) in TF32
#             against full FP32 (bf16 gl 2 and rr 20, 256 sentences); not in the default list: run it when the
#             phases step shows the prefix above 15% of a bf16 call
#   compare   bench_compare.py on $WORKLOADS (default a), $COMPARE_ARGS passed on, at most $COMPARE_LIMIT s each
#   overhead  profile_engine.py --group-overhead: what one more group costs (engine.GROUP_OVERHEAD_TOKENS)
#   corpus    bench_corpus.py on a BERT-base shape, bf16 gl 2, full output, 4096 short sentences: a real
#             `attattr-fast attribute --out` run; its "write wait" says whether writing results, not the engine,
#             sets a corpus run's pace on a GPU machine
#   grouping  engine_ab.py --compare grouping: plan_groups against the grouping it replaced (bf16 gl 2 and
#             rr 20, float32 gl 2; 256 sentences)
#   probe     triton_compile_probe.py with an empty Triton cache (first vs second launch per specialisation)
#   kernel    bench_kernel.py at n = 128, 512, 2048, float32 and bf16, launch configurations $KERNEL_CONFIGS
#             (default: launch_config's, and tiles 32 and 64 at 8 warps, where ptxas reports fewer or no spills)
# STEPS defaults to all of them but tf32, in the order above. Every step's log goes to $OUT too, with the result JSONs this
# run wrote (not older ones). Results land in bench/results/ (commit them) and are copied to $OUT when it is set
# (the device tool).
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
steps=${STEPS:-tests memory phases profile compile packing compare overhead corpus grouping probe kernel}
out=${OUT:-/tmp/gpu_session}; mkdir -p "$out"
log() { echo "== $(date +%H:%M:%S) [${SECONDS}s] $*"; }
# step LIMIT CMD...: run CMD for at most LIMIT seconds and never past the budget; skip it when < 30 s are left
step() {
    local limit=$1 left=$((budget - SECONDS)); shift
    ((left < 30)) && { log "skipped (budget spent): $*"; return 0; }
    timeout $((limit < left ? limit : left)) "$@"
    local rc=$?  # reported here: the pipelines after a step show only tee's status
    ((rc)) && log "exit status $rc$( ((rc == 124)) && echo ' (its time limit)'): $*"
    return $rc
}
marker=$(mktemp); touch "$marker"  # result files newer than this are this run's
copy_out() { find "$results" -maxdepth 1 -name 'h[0-9]*.json' -newer "$marker" -exec cp {} "$out"/ \; ; true; }

log "install"
if compgen -G ".whl/*.whl" >/dev/null; then
    $python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# the checkout itself (an editable install needs the internet); setup.py maps kernels/ to attattr_fast.kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[[ -e attattr_fast/kernels || -L attattr_fast/kernels ]] || ln -s ../kernels attattr_fast/kernels
$python -c "import attattr_fast.kernels.attribution_reduce" || log "the kernel does not import: Triton steps will fail"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

for name in $steps; do
    case $name in
    tests)
        log "GPU tests"
        step 50 $python -m pytest -q -m gpu tests/ 2>&1 | tee "$out/tests.log" | tail -15 ;;
    memory)
        log "memory model"
        step 60 $python bench/memory_model.py 2>&1 | tee "$out/memory.log" | tail -10 ;;
    phases)
        log "phases"
        step 90 $python bench/profile_engine.py --phases 2>&1 | tee "$out/phases.log" | tail -30 ;;
    profile)
        log "profile"
        step ${PROFILE_LIMIT:-120} $python bench/profile_engine.py ${PROFILE_ARGS---examples 128} 2>&1 | tee "$out/profile.log" | tail -60 ;;
    packing)
        log "packed rows before/after"
        step 90 $python bench/engine_ab.py --compare packing --cases bf16:gausslegendre:2,bf16:riemann_right:20 \
            --pack-above-padding 0 --repeats 2 2>&1 | tee "$out/packing.log" ;;
    tf32)
        log "TF32 float32 products before/after"
        step 60 $python bench/engine_ab.py --compare tf32 --cases bf16:gausslegendre:2,bf16:riemann_right:20 \
            --repeats 2 2>&1 | tee "$out/tf32.log" ;;
    compile)
        log "torch.compile before/after"
        step 180 $python bench/engine_ab.py --compare compile --cases bf16:gausslegendre:2,bf16:riemann_right:20 \
            --repeats 2 2>&1 | tee "$out/compile.log" ;;
    compare)
        for workload in ${WORKLOADS:-a}; do
            log "bench_compare workload $workload"
            step ${COMPARE_LIMIT:-240} $python bench/bench_compare.py --workloads "$workload" ${COMPARE_ARGS---repeats 1 --baseline-examples 16} 2>&1 | tee "$out/compare-$workload.log"
        done ;;
    overhead)
        log "group overhead"
        step 60 $python bench/profile_engine.py --group-overhead 2>&1 | tee "$out/overhead.log" | tail -12 ;;
    corpus)
        log "corpus run, BERT-base, full output"
        step 120 $python bench/bench_corpus.py --device cuda --sizes 4096 --layers 12 --heads 12 --hidden 768 \
            --method gausslegendre --steps 2 --dtype bfloat16 --name corpus-bert-base 2>&1 \
            | tr '\r' '\n' | grep -v '^attributing' | tee "$out/corpus.log" | tail -8 ;;
    grouping)
        log "grouping before/after"
        step 90 $python bench/engine_ab.py --compare grouping 2>&1 | tee "$out/grouping.log" ;;
    probe)
        log "Triton compile probe (empty cache)"
        TRITON_CACHE_DIR=$(mktemp -d) step 120 $python bench/triton_compile_probe.py 2>&1 | tee "$out/probe.log" ;;
    kernel)
        log "kernel benchmark"
        step 90 $python bench/bench_kernel.py --configs ${KERNEL_CONFIGS:-default 32:8 64:8} 2>&1 | tee "$out/kernel.log" | tail -40 ;;
    *)
        log "unknown step: $name" ;;
    esac
    copy_out
done
log "done"
