#!/bin/bash
# train.py data-parallel on 1 vs 2 GPUs, end to end, on a LLaMA-3.2-1B-shaped checkpoint (random weights):
#   1. torchrun with 1 and with 2 processes: LoRA, global batch 16 x 1024 tokens, 30 steps, bf16 (tokens/s, the
#      time after the last training step, the whole command's wall time);
#   2. the same in float32 (global batch 4 x 1024, 10 steps) and the adapter weights of 1 vs 2 processes compared
#      (bf16 runs differ by reduction order, float32 runs must agree);
#   3. a table of both.
# One command, for one device call on a 2-GPU machine:   bash tools/ddp_bench.sh
# The same code path on a CPU in a minute (gloo, a toy LLaMA):   TINY=1 bash tools/ddp_bench.sh
# Writes $OUT (default out/ddp): log, the checkpoint, every run's metrics.json; the table at the end of the log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/ddp}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
if [ -n "${TINY:-}" ]; then
    CKPT=$OUT/tiny-llama; SHAPE=--tiny; DEV="--device cpu"; BIG="--batch-size 4 --block-size 64"; SMALL="--batch-size 4 --block-size 64"
else
    CKPT=$OUT/llama-3.2-1b-random; SHAPE=; DEV=; BIG="--batch-size 16 --block-size 1024"; SMALL="--batch-size 4 --block-size 1024"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
date -u; git log -1 --format='commit %h %s' 2>/dev/null || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
[ -f "$CKPT/model.safetensors" ] || python3 tools/random_llama.py "$CKPT" $SHAPE

run() {  # run NAME NPROC FLAGS...: one torchrun, its wall time in $OUT/NAME/wall_s
    local name=$1 n=$2; shift 2
    local t0; t0=$(date +%s.%N)
    # a failure after training (e.g. sampling ids outside the random checkpoint's small tokenizer) keeps adapter.pt
    # and metrics.json, which is all this measures
    torchrun --standalone --nproc_per_node="$n" train.py --adapter lora --init-from "$CKPT" --out-dir "$OUT/$name" --overwrite \
        --eval-iters 2 --sample-tokens 32 $DEV "$@" || echo "($name: exit $? after training)"
    python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$(date +%s.%N)" > "$OUT/$name/wall_s"
}
run bf16-1gpu 1 $BIG --steps 30 --eval-interval 30 ${TINY:+--dtype float32}
run bf16-2gpu 2 $BIG --steps 30 --eval-interval 30 ${TINY:+--dtype float32}
# no dropout here: its masks depend on the process, so they would differ between 1 and 2 processes
run fp32-1gpu 1 $SMALL --steps 10 --eval-interval 10 --dtype float32 --dropout 0
run fp32-2gpu 2 $SMALL --steps 10 --eval-interval 10 --dtype float32 --dropout 0

python3 - "$OUT" <<'EOF'
import json, sys, torch
out = sys.argv[1]
m = {k: json.load(open(f"{out}/{k}/lora/metrics.json")) for k in ("bf16-1gpu", "bf16-2gpu", "fp32-1gpu", "fp32-2gpu")}
wall = {k: float(open(f"{out}/{k}/wall_s").read()) for k in m}
print("\n| run | processes | tokens/s | speed-up | after the last step | command wall | after / wall |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for k, v in m.items():
    after = sum(v["finish_s"].values())
    base = m[k.replace("2gpu", "1gpu")]["tokens_per_s"]
    print(f"| {k} | {2 if '2gpu' in k else 1} | {v['tokens_per_s']:,.0f} | {v['tokens_per_s'] / base:.2f}x | {after:.2f} s "
          f"({', '.join(f'{p} {s:.2f}' for p, s in v['finish_s'].items())}) | {wall[k]:.1f} s | {100 * after / wall[k]:.1f}% |")
a, b = (torch.load(f"{out}/fp32-{n}/lora/adapter.pt")["state"] for n in ("1gpu", "2gpu"))
diff = max((a[k] - b[k]).abs().max().item() for k in a)
scale = max(a[k].abs().max().item() for k in a if k.endswith(".B"))
print(f"\nfloat32, 1 vs 2 processes, adapter weights after 10 steps: max |diff| {diff:.3g} (largest |B| entry {scale:.3g}); "
      f"{'AGREE' if diff <= 1e-4 * max(scale, 1e-3) + 1e-6 else 'DIFFER'} (tolerance 1e-4 relative to B, as test_torchrun_two_processes_match_one_process)")
for k, v in m.items():
    print(f"{k}: val loss {v['val_loss_before']:.4f} -> {v['val_loss_after']:.4f}; merge {v['merge'] and v['merge'].get('relative_diff')}; errors {v['errors'] or 'none'}")
EOF
