#!/usr/bin/env bash
# Download the wheels that bench/gpu_check.sh installs on a CUDA machine whose image has torch
# (and numpy, pillow, safetensors, click, einops, timm, torchvision, huggingface_hub, regex,
# pyarrow, pandas, xxhash) but not open_clip_torch or datasets. Run it here, where pip reaches a
# package index; the GPU machine needs no network. Output: bench/wheels/ (git-ignored).
#
#   bash bench/fetch_wheels.sh            # then carry bench/wheels to the GPU machine
#
# The target is CPython 3.12 on x86-64 Linux (the GPU image's python3); all of these are
# pure-Python or py312 wheels. Versions are the ones t2i is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${T2I_WHEELS:-bench/wheels}
WHEELS=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4          # text encoder + tokenizer
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19          # webdataset shards (data case)
)
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 any; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
