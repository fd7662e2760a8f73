#!/usr/bin/env bash
# Downloads the wheels the GPU kit may need on the GPU machine, which has no package registry:
# Python 3.12, x86-64 manylinux. The kit installs from this folder only what the machine lacks.
#
#   bash scripts/gpu_kit_wheels.sh [DIR]      # default build/wheels (ignored by git)
#
# Build and test tools (the machine's image has them today; these are the fallback), and
# EleutherAI's sparsify with the dependencies its import needs that the image lacks (the training-
# step baseline). Versions are pinned so a carried folder holds one version of each.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-build/wheels}
mkdir -p "$DIR"
WHEELS=(
  pybind11==3.0.1 ninja==1.13.0 cmake==4.1.2 pytest-xdist==3.8.0 execnet==2.1.1
  eai-sparsify==1.3.3 natsort==8.4.0 simple-parsing==0.1.7 docstring-parser==0.17.0 schedulefree==1.4.1
  datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$DIR" "${WHEELS[@]}"
ls -1 "$DIR"
du -sh "$DIR"
