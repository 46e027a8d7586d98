#!/usr/bin/env bash
# The fast path on a lent GPU machine, in one call (see the README's Benchmarks section):
# the CUDA-graph tests against eager, then every stage eager and as CUDA graphs, side by side,
# SD1.4's architecture (random weights) in bf16 at 512x512, batch 1.
#
#   bash benchmarks/gpu_fastpath.sh          every stage (sd14-gpu-bf16-graph.{json,md})
#   bash benchmarks/gpu_fastpath.sh tune     default tunes on one photo, eager and as graphs
#                                            (sd14-gpu-bf16-tune.{json,md})
#   bash benchmarks/gpu_fastpath.sh sdxl     SDXL's architecture (random weights) at 1024x1024 in bf16: every
#                                            stage of benchmarks.gpu_check with its peak memory, without and
#                                            with gradient checkpointing (sdxl-gpu-bf16-1024{,-checkpointed}.json)
#   bash benchmarks/gpu_fastpath.sh sd3      the same for SD 3 medium's architecture (no T5) at 1024x1024 in bf16
#                                            (sd3-gpu-bf16-1024{,-checkpointed}.json)
#   bash benchmarks/gpu_fastpath.sh batch    issue 25's targets: the profile of a guided image and a null-text
#                                            inversion (profile-sd14-gpu-bf16.json), then plain, guided and
#                                            null-text images per second at batch 1, 4, 8 (batching-sd14-gpu-bf16)
#   bash benchmarks/gpu_fastpath.sh layout   the c_s step and CFG forward with the UNet NCHW and
#                                            channels-last (sd14-gpu-bf16-layout), then the loops
#                                            and a one-photo tune in the faster layout
#                                            (sd14-gpu-bf16-loops, sd14-gpu-bf16-tune)
# Carry .whl: diffusers, importlib_metadata, and a hifi wheel (for its backend entry points).
# Results go to $OUT (on the device machine: one log.txt and the JSON files, under its 8-file limit)
# or benchmarks/results/; `python -m benchmarks.run --markdown FILE.json` writes the table again.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$OUT/log.txt"
timeout "${TEST_SECONDS:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py -k cuda 2>&1 | tee -a "$OUT/log.txt"
common="--arch sd14 --sample-size 64 --dtype bf16 --batch 1 --accel graph"
if [ "${1:-all}" = layout ]; then
  rm -f benchmarks/results/sd14-gpu-bf16-{layout,loops,tune}.json  # only this run's results go back
  timeout 90 python3 -m benchmarks.run $common --only core --repeats 20 --name sd14-gpu-bf16-layout 2>&1 \
      | tee -a "$OUT/log.txt"
  # the fastest setting of the graph c_s step, as flags of benchmarks.run
  layout=$(python3 -c "
import json; rows = json.load(open('benchmarks/results/sd14-gpu-bf16-layout.json'))['rows']
best = min((r for r in rows if r['stage'].startswith('c_s step')), key=lambda r: r['seconds'])['stage']
print(('--channels-last ' if 'channels-last' in best else '') + ('--cudnn-benchmark' if 'cudnn' in best else ''))
" 2>>"$OUT/log.txt")
  echo "faster layout: ${layout:-NCHW}" | tee -a "$OUT/log.txt"
  timeout 150 python3 -m benchmarks.run $common $layout --only loops --steps 50 --loop-steps 50 --repeats 2 \
      --name sd14-gpu-bf16-loops 2>&1 | tee -a "$OUT/log.txt"
  cp benchmarks/results/sd14-gpu-bf16-l*.json "$OUT/" 2>/dev/null
  name=sd14-gpu-bf16-tune
  timeout "${BENCH_SECONDS:-220}" python3 -m benchmarks.run $common $layout --full-tune-only 1 --name $name 2>&1 \
      | tee -a "$OUT/log.txt"
elif [ "${1:-all}" = sdxl ] || [ "${1:-all}" = sd3 ]; then
  for extra in "" "--gradient-checkpointing"; do
    name=$1-gpu-bf16-1024${extra:+-checkpointed}
    timeout "${BENCH_SECONDS:-240}" python3 -m benchmarks.gpu_check --backend "$1" --sample-size 128 --precisions bf16 \
        --attention sdpa --no-perception --tune-steps 4 --ddim-steps 10 --phi-steps 2 $extra \
        --out "benchmarks/results/$name.json" 2>&1 | tail -40 | tee -a "$OUT/log.txt"
    cp "benchmarks/results/$name.json" "$OUT/" 2>/dev/null
  done
  exit 0
elif [ "${1:-all}" = batch ]; then
  arch="--arch sd14 --sample-size 64 --dtype bf16 --steps 50 --phi-steps 10 --accel graph"
  timeout 150 python3 -m benchmarks.profile_loops $arch --name profile-sd14-gpu-bf16 2>&1 | tee -a "$OUT/log.txt"
  timeout "${BENCH_SECONDS:-300}" python3 -m benchmarks.batching $arch --batches 1,4,8 --repeats 1 \
      --name batching-sd14-gpu-bf16 2>&1 | tee -a "$OUT/log.txt"
  cp benchmarks/results/profile-sd14-gpu-bf16.json benchmarks/results/batching-sd14-gpu-bf16.json "$OUT/" 2>/dev/null
  exit 0
elif [ "${1:-all}" = tune ]; then
  name=sd14-gpu-bf16-tune
  timeout "${BENCH_SECONDS:-300}" python3 -m benchmarks.run --arch sd14 --sample-size 64 --dtype bf16 --batch 1 \
      --accel graph --full-tune-only 1 --name $name 2>&1 | tee -a "$OUT/log.txt"
else
  name=sd14-gpu-bf16-graph
  timeout "${BENCH_SECONDS:-360}" python3 -m benchmarks.run --arch sd14 --sample-size 64 --dtype bf16 --batch 1 \
      --steps 50 --loop-steps 50 --repeats 2 --accel graph --no-naive-loops --full-tune --name $name 2>&1 | tee -a "$OUT/log.txt"
fi
cp benchmarks/results/$name.json "$OUT/" 2>/dev/null
exit 0
