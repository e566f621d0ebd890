#!/usr/bin/env bash
# One GPU session's open measurements, as two calls on one warm machine (docs/benchmarking.md):
#
#   bash benchmarks/gpu_session.sh 1 [OUT]   # device tool: carry [".whl2"] (part.aa), timeout_s=360
#   bash benchmarks/gpu_session.sh 2 [OUT]   # device tool: carry [".whl", ".whl2"] (part.ab), timeout_s=360
#
# OUT: where logs and archives go ($OUT on the device tool, else /tmp/fusedls-gpu). Each step has
# its own time limit; its output is appended to OUT/session<part>.log and the results folder is
# archived to OUT/results<part>.tgz after each step, so a call cut short still returns what
# finished. The last lines printed are a summary (the device tool returns the output's tail).
#
# Steps and budgets (seconds), in priority order:
# The session's 15 minutes of device time hold a machine's start (~2-3 minutes) and ~10.5 minutes
# of steps:
#   call 1 (~5.3 minutes)
#     env          5  device, driver, torch / triton versions, the commit
#     tests      120  the test suite on CUDA: compiled Triton kernels, the cooperative split rows
#                     against the two-phase variant, CUDA graphs, set_sync_debug_mode("error") (#15, #18)
#     ce_paths    90  tune_cross_entropy.py --paths --quick: which forward path per shape (#18)
#     lce        100  tune_linear_cross_entropy.py on the Llama-3 8B head: strategies, acc_dtype, the
#                     fused path exact and filtered on peaked logits; prints FUSED_TIME_VS_TOKENS (#17)
#   call 2 (~5.2 minutes)
#     wheels      20  Liger-Kernel and quack from the carried wheels (skipped without .whl)
#     ce         120  cross_entropy bf16 fwd+bwd, 4096 / 16384 rows x 32000 / 128256 / 256000 and
#                     8 x 256000: the fusedls Triton paths, torch, liger, quack, copy (#18)
#     ce_compile  45  4096 x 32000 next to torch.compile (#15: >= 2x), compiled once
#     dropout     45  dropout, dropout_add, dropout_add_rms_norm at 16384 x 8192 bf16 fwd+bwd (#15, #18)
#     train_step  45  optimizer steps of a 2-layer Llama at Llama-3-8B width, 128k vocabulary:
#                     unpatched vs fusedls.transformers.apply, step time and peak memory (#16)
#     overhead    30  per-call host cost, tiny inputs, fwd+bwd, each op next to torch (#15)
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-1}
OUT=${2:-${OUT:-/tmp/fusedls-gpu}}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG="$OUT/session$PART.log"
SLUG=$(python3 -c "from fusedls.bench import report; import torch; print(report.device_slug(torch.device(\"cuda\")))" 2>/dev/null || echo gpu)
RESULTS="benchmarks/results/$SLUG"
mkdir -p "$RESULTS"
declare -a SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run with a limit, log it, archive the results so far
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    SUMMARY+=("$(printf '%-9s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$*")")
    tail -n 25 "$LOG" >"$OUT/last_step.txt"
    tar czf "$OUT/results$PART.tgz" "$RESULTS" 2>/dev/null
}

XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")

step env 5 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
python3 -c 'import torch, triton; print(\"torch\", torch.__version__, \"| triton\", triton.__version__, \"| cuda\", torch.version.cuda)'; \
git log --oneline -1 2>/dev/null || echo 'no .git'; date -u"
if [ "$PART" = 1 ]; then
    if ls .whl2/part.* >/dev/null 2>&1; then mkdir -p /tmp/parts && cp .whl2/part.* /tmp/parts/; fi
    step tests 120 python3 -m pytest -q --maxfail=20 $XDIST -p no:cacheprovider tests
    step ce_paths 90 python3 benchmarks/tune_cross_entropy.py --paths --quick
    step lce 100 python3 benchmarks/tune_linear_cross_entropy.py
else
    if [ -f .whl/cutlass-name ] && ls /tmp/parts/part.* .whl2/part.* >/dev/null 2>&1; then
        step wheels 20 bash -c 'cat /tmp/parts/part.* .whl2/part.* > "/tmp/$(cat .whl/cutlass-name)" && \
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
"/tmp/$(cat .whl/cutlass-name)"'
        export PYTHONPATH=/tmp/site
    elif ls .whl/*.whl >/dev/null 2>&1; then
        step wheels 20 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            .whl/liger_kernel-*.whl
        export PYTHONPATH=/tmp/site
    fi
    step ce 120 python3 -m fusedls.bench --op cross_entropy --mode fwd+bwd --dtype bf16 --rows 8 4096 16384 \
        --vocab 32000 128256 256000 --providers 'fusedls/triton*' torch liger quack copy --merge --no-progress
    step ce_compile 45 python3 -m fusedls.bench --op cross_entropy --mode fwd+bwd --dtype bf16 --rows 4096 \
        --vocab 32000 --providers 'fusedls/triton*' torch torch.compile copy --merge --no-progress
    step dropout 45 python3 -m fusedls.bench --op dropout dropout_add dropout_add_rms_norm --mode fwd+bwd \
        --dtype bf16 --rows 16384 --cols 8192 --merge --no-progress
    step train_step 45 python3 -m fusedls.bench --op train_step --vocab 128256 --merge --no-progress
    step overhead 30 python3 -m fusedls.bench --op overhead --merge --no-progress
fi

cp "$LOG" "$RESULTS/session$PART.log" 2>/dev/null
tar czf "$OUT/results$PART.tgz" "$RESULTS" 2>/dev/null
echo
echo "=== summary, call $PART ($SLUG; logs: $LOG, results: $OUT/results$PART.tgz)"
for line in "${SUMMARY[@]}"; do echo "$line"; done
grep -h "speed-up\|of copy\|x torch" "$LOG" | tail -n 20
