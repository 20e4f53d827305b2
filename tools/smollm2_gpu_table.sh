#!/bin/bash
# The SmolLM2-135M table of docs/results.md, as run on one H100: every adapter at train.py's --init-from
# defaults (its class's rank, its paper's targets, its llm_lr, dropout 0.05, warm-up 10%, cosine decay),
# the same data (pydoc topics), steps and seed.
#   SMOLLM2_DIR=<converted HF dir> bash tools/smollm2_gpu_table.sh [extra train.py flags]
# (tools/smollm2_to_hf.py makes the directory.) Writes $OUT/smollm2_compare.json and $OUT/smollm2.log.
set -o pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; git log -1 --format='commit %h' 2>/dev/null; } | tee "$OUT/smollm2.log"
# about one epoch of the 120k training tokens: more overfits a 135M model on this small text
python3 train.py --init-from "$SMOLLM2_DIR" --adapter all --steps 60 --batch-size 8 --block-size 256 --overwrite \
    --eval-interval 20 --eval-iters 20 --out-dir /tmp/smollm2_runs "$@" 2>&1 | tr '\r' '\n' | grep -v -E 'it/s|s/it' | tee -a "$OUT/smollm2.log"
cp /tmp/smollm2_runs/compare.json "$OUT/smollm2_compare.json"
