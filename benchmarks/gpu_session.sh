#!/usr/bin/env bash
# One GPU session's measurements, in priority order, within one 10-minute device call:
#
#   bash benchmarks/gpu_session.sh [OUT]        # OUT: where the logs and the results archive go ($OUT, else /tmp/fusedls-gpu)
#
# On the device tool: run(command="bash benchmarks/gpu_session.sh", timeout_s=590). Each step has its
# own time limit, its output appended to OUT/session.log, and the results folder re-archived to
# OUT/results.tgz after each step, so a call cut short still returns what finished. The last lines
# printed are the summary table (the device tool returns the output's tail).
#
# Steps and budgets (seconds; about 9 minutes in all on an H100):
#   1 env        10  device, driver, torch / triton versions, the commit
#   2 tests     150  the test suite on CUDA (compiled Triton kernels, the cuda backend, CUDA graphs,
#                    set_sync_debug_mode("error") in tests/test_cuda_graphs.py)
#   3 overhead   45  per-call host cost, tiny inputs, fwd+bwd, each op next to torch (#15)
#   4 ce        140  cross_entropy bf16 fwd+bwd, 8 / 4096 / 16384 rows x 32000 / 128256 / 256000: the
#                    fusedls Triton paths, torch, liger, quack (where importable), copy (#18)
#   5 ce_compile 60  4096 x 32000 next to torch.compile (#15: >= 2x), compiled once
#   6 dropout    60  dropout, dropout_add, dropout_add_rms_norm at 16384 x 8192 bf16 fwd+bwd (#15, #18)
#   7 lce       120  linear cross-entropy on the Llama-3 8B head: strategies, acc_dtype, the fused path exact and
#                    filtered on peaked logits; prints the FUSED_TIME_VS_TOKENS for auto (#17)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/fusedls-gpu}}
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG="$OUT/session.log"
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
    tar czf "$OUT/results.tgz" "$RESULTS" 2>/dev/null
}

XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")

step env 10 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
python3 -c 'import torch, triton; print(\"torch\", torch.__version__, \"| triton\", triton.__version__, \"| cuda\", torch.version.cuda)'; \
git log --oneline -1 2>/dev/null || echo 'no .git'; date -u"
step tests 150 python3 -m pytest -q --maxfail=20 $XDIST -p no:cacheprovider tests
step overhead 45 python3 -m fusedls.bench --op overhead --merge --no-progress
step ce 140 python3 -m fusedls.bench --op cross_entropy --mode fwd+bwd --dtype bf16 --rows 8 4096 16384 \
    --vocab 32000 128256 256000 --providers 'fusedls/triton*' torch liger quack copy --merge --no-progress
step ce_compile 60 python3 -m fusedls.bench --op cross_entropy --mode fwd+bwd --dtype bf16 --rows 4096 \
    --vocab 32000 --providers 'fusedls/triton*' torch torch.compile copy --merge --no-progress
step dropout 60 python3 -m fusedls.bench --op dropout dropout_add dropout_add_rms_norm --mode fwd+bwd \
    --dtype bf16 --rows 16384 --cols 8192 --merge --no-progress
step lce 120 python3 benchmarks/tune_linear_cross_entropy.py

cp "$LOG" "$RESULTS/session.log" 2>/dev/null
tar czf "$OUT/results.tgz" "$RESULTS" 2>/dev/null
echo
echo "=== summary ($SLUG; logs: $LOG, results: $OUT/results.tgz)"
for line in "${SUMMARY[@]}"; do echo "$line"; done
grep -h "speed-up\|of copy\|x torch" "$LOG" | tail -n 20
