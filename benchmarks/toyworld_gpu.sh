#!/usr/bin/env bash
# ToyWorld's GPU recipe on a lent GPU machine, in one call (README, ToyWorld):
#   bash benchmarks/toyworld_gpu.sh
# Carry .whl (diffusers, importlib_metadata, a hifi wheel: `pip wheel --no-deps -w .whl .`) and
# .gpuwork (the small models of a CPU run: see benchmarks/toyworld_gpu.py). Everything it makes
# goes to $OUT: log.txt, checks.json, unet-<variant>.log and bundle-<variant>.tar.gz.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    2>&1 | tee -a "$OUT/log.txt"
timeout "${GPU_SECONDS:-560}" python3 -m benchmarks.toyworld_gpu --carried .gpuwork --work /tmp/tw --out "$OUT" "$@" 2>&1 \
    | grep --line-buffered -v '%|' | tee -a "$OUT/log.txt"
ls -la "$OUT" | tee -a "$OUT/log.txt"
exit 0
