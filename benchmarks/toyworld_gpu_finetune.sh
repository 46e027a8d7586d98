#!/usr/bin/env bash
# Go on training the bundled ToyWorld UNet on a lent GPU machine, in one call (README, ToyWorld):
#   GPU_SECONDS=560 bash benchmarks/toyworld_gpu_finetune.sh [SETTINGS_JSON]
# Each call adds its minutes to the UNet's training instead of starting over. Carry .whl
# (diffusers, importlib_metadata and a hifi wheel, as for toyworld_gpu.sh). The argument is
# JSON of TrainSettings fields over the bundle's own; it replaces the default below (the GPU
# recipe's pool, batch 512, a 405 s budget: the settings of the bundle's first GPU fine-tune,
# 5,800 steps on an H100; its second went on with "unet_lr": 1e-4, "unet_seconds": 80 and
# GPU_SECONDS=175; Min-SNR-5, object weight 3 and the widths stay the bundle's). The device
# is this machine's unless the JSON names one.
# Back in $OUT: unet/ and training.json (every other model is the bundle's, unchanged),
# check/check.{json,md} (60 generations on the GPU) and log.txt. To install it here:
#   cp -r OUT/unet OUT/training.json src/hifi_backends/toy/bundle/
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
SETTINGS=${1:-'{"looks": 30000, "render_workers": 16, "unet_batch": 512, "unet_lr": 2e-4, "unet_steps": 60000, "unet_seconds": 405}'}
GPU_SECONDS=${GPU_SECONDS:-560}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
fi
export PYTHONPATH="$PWD/src:/tmp/site:$PWD" PYTHONUNBUFFERED=1
DEVICE=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
SETTINGS=$(python3 -c "import json, sys; s = json.loads(sys.argv[1]); s.setdefault('device', sys.argv[2]); print(json.dumps(s))" \
    "$SETTINGS" "$DEVICE") || { echo "toyworld_gpu_finetune: the argument is not a JSON object" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/log.txt"
echo "settings: $SETTINGS" | tee -a "$OUT/log.txt"
began=$(date +%s)
timeout "$GPU_SECONDS" python3 -m hifi_backends.toy.train --finetune src/hifi_backends/toy/bundle \
    --work /tmp/tw-ft --out /tmp/tw-ft-bundle --settings "$SETTINGS" 2>&1 \
    | grep --line-buffered -v '%|' | tee -a "$OUT/log.txt"
if [ -f /tmp/tw-ft-bundle/training.json ]; then
    cp -r /tmp/tw-ft-bundle/unet /tmp/tw-ft-bundle/training.json "$OUT/"
    left=$(( GPU_SECONDS - ($(date +%s) - began) ))
    if [ "$left" -gt 30 ]; then
        timeout "$left" python3 -m benchmarks.toyworld check --model /tmp/tw-ft-bundle --device "$DEVICE" \
            --out "$OUT/check" 2>&1 | grep -v '%|' | tee -a "$OUT/log.txt"
    fi
fi
ls -la "$OUT" | tee -a "$OUT/log.txt"
exit 0
