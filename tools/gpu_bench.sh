#!/bin/bash
# The GPU preset as run for the README (one H100): bash tools/gpu_bench.sh [extra bench.py flags]
# Writes $OUT/log, $OUT/bench_gpu.json and $OUT/profile.txt (OUT defaults to out/gpu).
# If peft is not importable and .whl/ holds a peft wheel, it is installed to /tmp/site first.
set -o pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import peft" 2>/dev/null && ls .whl/peft-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/peft-*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; date -u; git log -1 --format='commit %h %s' 2>/dev/null; } | tee "$OUT/log"
python3 bench.py --preset gpu --profile "$OUT/profile.txt" --out "$OUT/bench_gpu.json" "$@" 2>&1 | tee -a "$OUT/log"
