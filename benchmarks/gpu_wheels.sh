#!/usr/bin/env bash
# The pure-Python wheels the GPU machine's image lacks (it has torch, transformers, timm, scipy,
# huggingface-hub, safetensors, pytest): about 8 MB into .whl/ (git-ignored), to be carried there.
#   bash benchmarks/gpu_wheels.sh        # then see LOG.md (issue 13) for the device command
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl omegaconf==2.4.0 diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 \
  clean-fid==0.1.35 importlib_metadata==9.1.0
ls -l .whl
