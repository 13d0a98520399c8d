#!/usr/bin/env bash
# The executor's GPU checks and its end-to-end benchmark, in one call of the device tool (from
# the repo root). The service tests need the gRPC/pydantic packages the device image lacks:
# carry them as wheels in .whl/ (see docs/benchmarks.md) or have them installed.
#   bash bench/executor_gpu_checks.sh                 # tests, stress x2, engine benchmark
#   STRESS_RUNS=3 BENCH_ARGS="--skip-peft" bash bench/executor_gpu_checks.sh
# Logs and JSON lines go to $OUT (the device tool's output folder) or /tmp/executor_out.
set -uo pipefail
OUT=${OUT:-/tmp/executor_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" \
  | tee -a "$OUT/gpu.txt"
status=0
python3 -m pytest -q -p no:cacheprovider --confcutdir=tests/kernels -m gpu tests/kernels \
  > "$OUT/kernel_gpu_tests.log" 2>&1 || status=1
tail -n 3 "$OUT/kernel_gpu_tests.log"
python3 -m pytest -q -p no:cacheprovider --noconftest -m gpu tests/executor/test_engine_gpu.py \
  > "$OUT/engine_gpu_tests.log" 2>&1 || status=1
tail -n 3 "$OUT/engine_gpu_tests.log"
for i in $(seq "${STRESS_RUNS:-2}"); do
  LORASERVE_TEST_EXECUTOR_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -x \
    tests/executor/test_stress_executor.py > "$OUT/stress_$i.log" 2>&1 || status=1
  echo "stress run $i: $(tail -n 1 "$OUT/stress_$i.log")"
done
python3 bench/engine_bench.py ${BENCH_ARGS:---compare-single-grid} \
  > "$OUT/engine_bench.jsonl" 2> "$OUT/engine_bench.err" || status=1
cut -c1-330 "$OUT/engine_bench.jsonl"
tail -n 5 "$OUT/engine_bench.err"
exit $status
