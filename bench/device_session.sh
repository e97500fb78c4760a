#!/bin/bash
# The one prepared run for a session lent a GPU (15 minutes of device time in all): the CUDA paths first, then the
# search's speed there. Prepare here with `bash bench/device_wheels.sh`, then call the device tool with
#   command "bash bench/device_session.sh", carry [".whl"], timeout_s 540.
# Logs go to $OUT (they come back). Every step has its own time limit, so a hang in one still returns the others.
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run bench/device_wheels.sh here and carry .whl"; exit 3; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers, optuna, bitsandbytes; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'optuna', optuna.__version__, 'bitsandbytes', bitsandbytes.__version__, 'cuda', torch.cuda.is_available())"
# 1. measure, ablate, search (full and multi-fidelity), hooked edits and a 4-bit search on cuda against the CPU
timeout 300 python3 bench/device_check.py --device cuda --workdir /tmp/device-check 2>&1 | tee "$OUT/device_check.log"
# 2. the search's trials per minute on the GPU, multi-fidelity against --fidelity full (the quick GPT-OSS organism)
timeout 180 python3 bench/bench_search.py --quick --arch gpt_oss --fidelity-minutes 1 --threads 8 \
    --search-args "--harmful-n 48 --harmless-n 48 --max-new-tokens 24 --batch-size 48 --device cuda" \
    --json "$OUT/bench_search.json" 2>&1 | tee "$OUT/bench_search.log"
