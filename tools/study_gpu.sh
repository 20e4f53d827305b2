#!/bin/bash
# Issue 25's study on SmolLM2-135M in one command (docs/study-protocol.md says what and why): every method at its
# paper's rank and targets, RanLoRA's literal Eq. 7 reading, and LoRA at the trainable-parameter budgets of GenLoRA
# (q,k,v r=6) and of AuroRA / RanLoRA (q,k,v,up,down r=2), over 7 half-decade lrs (1 seed), then seeds 0,1,2 at each
# entry's best lr; the task data from tools/make_task.py (run it where reasoning-gym is installed; carry out/task).
#
#   SMOLLM2_DIR=<converted HF dir> bash tools/study_gpu.sh      # converts it first where it is missing
#
# Knobs (environment): TASK (out/task), STUDY_DIR (${OUT:-out}/study), STEPS (1000), PER_GPU (3 runs at a time on each
# GPU), LIMIT (510 s: then the study stops, each run at a step boundary, and the table so far is printed; the same
# command continues it, from STUDY_DIR carried back), LRS, SEEDS, BEST_SEEDS, ADAPTERS, EVAL_INTERVAL, EVAL_ITERS.
# Runs that were stopped lose their checkpoints here (Adam state is too big to carry back): they start over next time.
set -uo pipefail
: "${SMOLLM2_DIR:?set SMOLLM2_DIR to the converted SmolLM2-135M directory (tools/smollm2_to_hf.py)}"
TASK=${TASK:-out/task}
STUDY_DIR=${STUDY_DIR:-${OUT:-out}/study}
STEPS=${STEPS:-1000}
PER_GPU=${PER_GPU:-3}
LIMIT=${LIMIT:-510}
LRS=${LRS:-1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2}
SEEDS=${SEEDS:-0}
BEST_SEEDS=${BEST_SEEDS:-0,1,2}
ADAPTERS=${ADAPTERS:-lora,genlora,lrlora,aurora,ranlora,ranlora@init=literal,lora@r=6@targets=q+k+v,lora@r=2@targets=q+k+v+up+down}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}
EVAL_ITERS=${EVAL_ITERS:-20}
cd "$(dirname "$0")/.."
for f in "$TASK/chain_sum.txt" "$TASK/chain_sum_eval.json"; do
    [ -f "$f" ] || { echo "error: $f missing: run python tools/make_task.py where reasoning-gym is installed and carry $TASK" >&2; exit 2; }
done
[ -f "$SMOLLM2_DIR/model.safetensors" ] || python3 tools/smollm2_to_hf.py "$SMOLLM2_DIR" || exit 2
mkdir -p "$STUDY_DIR"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u; git log -1 --format='commit %h %s' 2>/dev/null
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee -a "$STUDY_DIR/device.txt"
export PYTHONUNBUFFERED=1
# what fills a GPU: utilization and memory every 10 s, for choosing PER_GPU next time
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -l 10 > "$STUDY_DIR/gpu_util.csv" 2>/dev/null &
smi=$!
# SIGTERM after LIMIT seconds (SIGKILL 60 s later): the study stops its runs at a step boundary and prints the table so far
timeout -k 60 "$LIMIT" python3 tools/study.py --adapters "$ADAPTERS" --lrs "$LRS" --seeds "$SEEDS" --best-seeds "$BEST_SEEDS" \
    --out "$STUDY_DIR" --per-gpu "$PER_GPU" --drop-adapters --plot -- \
    --init-from "$SMOLLM2_DIR" --data "$TASK/chain_sum.txt" --task-eval "$TASK/chain_sum_eval.json" \
    --steps "$STEPS" --batch-size 8 --block-size 256 --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
rc=$?
kill $smi 2>/dev/null
find "$STUDY_DIR" -name ckpt.pt -delete
done=$(python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['records']; print(sum(x['status'] == 'done' for x in r), 'of', len(r))" \
       "$STUDY_DIR/study.json" 2>/dev/null)
echo "study exit status $rc (124: stopped at LIMIT, run the same command again to continue); runs done: ${done:-?}; $(du -sh "$STUDY_DIR" | cut -f1) in $STUDY_DIR"
exit $rc
