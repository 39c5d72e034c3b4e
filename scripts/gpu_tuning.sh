#!/usr/bin/env bash
# The launch choices that the sm_90 compile reports cannot settle, timed on a GPU in one call:
# occupancy against pipelining (the README's "Occupancy" paragraph, scripts/kernel_cost.py's
# programs per SM).
#   1. tc final pass: its loop over r in 1, 2 or 3 stages (tune_routing.py --grid tc_grad; sm_90,
#      MNIST shape, tf32x3: 43 / 101 / 161 KB of shared memory, 2 / 2 / 1 programs per SM), in bf16
#      and in fp32 at tf32x3;
#   2. fma kernels: pipelining depth 1-3 x batch tile 2-8 (--grid stages); the final sweep holds
#      8 / 8 / 4 one-warp programs per SM at 1 / 2 / 3 stages (fp32, block_b = 4; registers bound
#      the first two);
#   3. fma final sweep: the output capsules in two tiles (8 + 2 rows) or one of 16 (--grid split_j);
#   4. tc bf16 forward passes: their loop over chunks in 1 or 2 stages (--grid tc_fwd_stages; the
#      default follows the Triton version: 2 under 3.6, where 1 spills, 1 under 3.9).
# Each at batch 128 and 8192, every output and gradient checked against float64 first. Not yet
# run; each grid has its own time limit (mostly first-call compilations: the tc tf32x3 final pass
# took about 130 s to compile on a 2-core CPU), 9.5 minutes in all. Run it after
# scripts/gpu_session.sh, in a call of its own. Results: benchmarks/results/<device>-tuning-*.{json,log};
# where $OUT is set (the lent device machine), also $OUT/gpu-tuning.tar.gz.
#
#   bash scripts/gpu_tuning.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
. scripts/gpu_setup.sh  # install, .whl/ wheels, $device

tune() {  # result name, seconds, tune_routing.py options
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" python3 scripts/tune_routing.py --batch 128 8192 --no-eager \
        --json "$RESULTS/$device-tuning-$name.json" "$@" 2>&1 | tee "$RESULTS/$device-tuning-$name.log"
}
tune tc-bf16 90 --dtype bfloat16 --grid tc_grad
tune tc-tf32x3 240 --dtype float32 --precision tf32x3 --grid tc_grad
tune fma-fp32 135 --dtype float32 --grid stages
tune fma-split-j 60 --dtype float32 --grid split_j
tune tc-bf16-fwd-stages 45 --dtype bfloat16 --grid tc_fwd_stages

if [[ -n ${OUT:-} ]]; then
    tar czf "$OUT/gpu-tuning.tar.gz" "$RESULTS"/"$device"-tuning-*
fi
