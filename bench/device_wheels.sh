#!/bin/bash
# Fetch, here, the wheels a device machine lacks, into .whl/ (ignored by git) for the device tool's `carry`.
# Its image holds torch, transformers, accelerate, safetensors, tokenizers, matplotlib, tqdm and pyyaml, but not
# optuna (and its alembic, SQLAlchemy, colorlog, Mako), gguf or bitsandbytes. Versions are constraints.txt's;
# transformers stays the image's own (carrying ours as well would pass the 64 MiB a call may carry).
#   bash bench/device_wheels.sh       then: device run "bash bench/device_session.sh", carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
pin() { grep -i "^$1==" constraints.txt; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "$(pin optuna)" "$(pin alembic)" "$(pin SQLAlchemy)" "$(pin colorlog)" "$(pin Mako)" "$(pin gguf)" "$(pin bitsandbytes)"
du -sh .whl
