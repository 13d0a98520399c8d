#!/usr/bin/env bash
# Everything the kernels need from a GPU, in one call of the device tool (from the repo root):
#   bash bench/kernels_gpu_tests.sh            # gpu tests, tuning sweep, benchmark
#   SKIP_TUNE=1 bash bench/kernels_gpu_tests.sh  # keep the committed kernels/configs/*.json
# Logs and results go to $OUT (the device tool's output folder) or /tmp/kernels_out.
set -uo pipefail
OUT=${OUT:-/tmp/kernels_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu \
  --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"
# --confcutdir: the project's tests/conftest.py needs the services' packages, not installed here.
python3 -m pytest tests/kernels -m gpu -q --confcutdir=tests/kernels -p no:cacheprovider \
  -W ignore::pytest.PytestConfigWarning 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
# Programmatic dependent launch inside a captured CUDA graph: if this driver/toolkit cannot,
# run the rest without it (the kernels read LORASERVE_KERNELS_PDL=0).
python3 - <<'PY' || export LORASERVE_KERNELS_PDL=0
import torch
from kernels import add_lora, build_lora_meta
from kernels._bench import graph_ms, make_problem
p = make_problem(8, 256, 256, adapters=2)
m = build_lora_meta(p.slots, p.weights, 64)
print("pdl graph probe:", graph_ms(lambda: add_lora(p.y, p.x, [p.a], [p.b], p.ranks, p.scales, m), rep=5))
PY
echo "LORASERVE_KERNELS_PDL=${LORASERVE_KERNELS_PDL:-default}"
if [ "${SKIP_TUNE:-0}" != 1 ]; then
  python3 -m kernels.tune > "$OUT/tune.jsonl" && cp kernels/configs/NVIDIA*.json "$OUT/"
  grep '"best"\|written\|error' "$OUT/tune.jsonl" | cut -c1-400
fi
python3 -m kernels._profile_eager 2>&1 | grep -v "^$" | cut -c1-160 | head -32
python3 bench/kernels_bench.py --out "$OUT/bench.jsonl" > "$OUT/bench.log" 2>&1
status=$?
grep -v '^{' "$OUT/bench.log"
exit $status
