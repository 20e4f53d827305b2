#!/bin/bash
# How LR-LoRA's default lr for real models was chosen: SmolLM2-135M (tools/smollm2_to_hf.py), 300 steps of
# 8 x 256 tokens of the Python standard library's code (~1.3M tokens: under one epoch, so the val loss can keep
# falling), LR-LoRA (and LoRA for reference) on all 7 projections at several lrs; one line per run with the val
# curve.   SMOLLM2_DIR=<converted HF dir> bash tools/smollm2_lr_sweep.sh "lrlora:1e-4 lrlora:3e-4 lora:3e-4" [flags]
set -o pipefail
OUT=${OUT:-out/sweep}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
STD=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
for run in $1; do
    name=${run%%:*}; lr=${run##*:}
    python3 train.py --init-from "$SMOLLM2_DIR" --adapter "$name" --data "$STD/*.py" --steps 300 --batch-size 8 \
        --block-size 256 --lr "$lr" --eval-interval 50 --eval-iters 20 --out-dir "/tmp/sweep/$name-$lr" "${@:2}" \
        > "$OUT/$name-$lr.log" 2>&1 || { echo "$name lr $lr: failed"; tail -3 "$OUT/$name-$lr.log"; continue; }
    python3 - "/tmp/sweep/$name-$lr/$name/metrics.json" "$name" "$lr" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
curve = " ".join(f"{c['val_loss']:.3f}" for c in m["curve"])
merge = m["merge"]
print(f"{sys.argv[2]:8s} lr {sys.argv[3]:6s} val {m['val_loss_before']:.3f} -> {curve}  {m['tokens_per_s']:,.0f} tok/s  "
      f"merge {'exact' if merge.get('exact') else merge.get('reason', 'approx')} {merge.get('max_abs_logit_diff')}")
PY
done
