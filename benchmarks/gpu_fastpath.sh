#!/usr/bin/env bash
# The fast path on a lent GPU machine, in one call (see the README's Benchmarks section):
# the CUDA-graph tests against eager, then every stage eager and as CUDA graphs, side by side,
# SD1.4's architecture (random weights) in bf16 at 512x512, batch 1.
#
#   bash benchmarks/gpu_fastpath.sh          every stage (sd14-gpu-bf16-graph.{json,md})
#   bash benchmarks/gpu_fastpath.sh tune     default tunes on one photo, eager and as graphs
#                                            (sd14-gpu-bf16-tune.{json,md})
# Carry .whl: diffusers, importlib_metadata, and a hifi wheel (for its backend entry points).
# Results go to $OUT (on the device machine) or benchmarks/results/, with the logs.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_SECONDS:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py -k cuda 2>&1 | tee "$OUT/pytest-cuda.log"
if [ "${1:-all}" = tune ]; then
  name=sd14-gpu-bf16-tune
  timeout "${BENCH_SECONDS:-300}" python3 -m benchmarks.run --arch sd14 --sample-size 64 --dtype bf16 --batch 1 \
      --accel graph --full-tune-only 1 --name $name 2>&1 | tee "$OUT/bench-tune.log"
else
  name=sd14-gpu-bf16-graph
  timeout "${BENCH_SECONDS:-360}" python3 -m benchmarks.run --arch sd14 --sample-size 64 --dtype bf16 --batch 1 \
      --steps 50 --loop-steps 50 --repeats 2 --accel graph --no-naive-loops --full-tune --name $name 2>&1 | tee "$OUT/bench.log"
fi
cp benchmarks/results/$name.* "$OUT/" 2>/dev/null
exit 0
