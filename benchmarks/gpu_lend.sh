#!/usr/bin/env bash
# The next GPU lend's checks in one call (README, Benchmarks and ToyWorld), at most about nine minutes:
#   bash benchmarks/gpu_lend.sh        (the run tool's timeout_s=590)
# 1. the CUDA-graph tests (tests/test_fastpath.py -k cuda; the graph capture changed without a device),
# 2. a ToyWorld with 16x16 latents (issue 24): the pool, a three-level VAE (factor 4) and the
#    UNet on its latents trained on the GPU, the small models taken from the bundle, then the full
#    model check (prompt, colour, pattern and mark following, the reference rows) of the result.
# Carry .whl (diffusers, importlib_metadata, a hifi wheel: `pip wheel --no-deps -w .whl .`). In $OUT:
# log.txt, checks.json, unet-u128.log, bundle-u128.tar.gz.NN (`cat` them, untar into a folder to
# load it with --model) and check-u128/check.{json,md}. WORLD_SECONDS bounds step 2; LATENT is the
# JSON of TrainSettings fields that makes the world (default: 16x16x4 latents). The bundle is packed
# before its check: if the check outruns WORLD_SECONDS, run it here on the CPU (benchmarks.toyworld
# check --model FOLDER, about 6 minutes).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
LATENT=${LATENT:-'{"vae_width": [32, 64, 96], "latent_channels": 4, "vae_seconds": 40, "unet_seconds": 150}'}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    2>&1 | tee -a "$OUT/log.txt"
timeout "${TEST_SECONDS:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_fastpath.py -k cuda 2>&1 \
    | tee -a "$OUT/log.txt"
timeout "${WORLD_SECONDS:-440}" python3 -m benchmarks.toyworld_gpu --carried src/hifi_backends/toy/bundle \
    --work /tmp/tw16 --out "$OUT" --variants u128 --settings "$LATENT" 2>&1 \
    | grep --line-buffered -v '%|' | tee -a "$OUT/log.txt"
ls -la "$OUT" "$OUT"/check-* 2>&1 | tee -a "$OUT/log.txt"
exit 0
