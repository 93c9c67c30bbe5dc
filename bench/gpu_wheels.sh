#!/usr/bin/env bash
# Downloads, as wheels for CPython 3.12 on manylinux x86-64, the packages `import lm.train,
# lm.generate, lm.engine, lm.memory` (and so bench/gpu.py) needs beyond what a CUDA JAX image
# already holds (Python 3.12, jax 0.11 with its CUDA 13 plugins, flax, optax, orbax-checkpoint,
# sentencepiece, absl-py, etils, cloudpickle, protobuf, psutil, pyyaml, tqdm, numpy, ...):
#
#   ml-collections  configs (lm.config, lm.train)
#   grain           the data pipeline (lm.data, imported by lm.train)
#   array-record    grain's file format (imported by grain)
#   portpicker      imported by grain's prefetch
#
# Their own dependencies are all in such an image, so none are fetched (--no-deps).
# tensorflow-datasets, tensorboardX, matplotlib and lm-eval are imported only where they are
# used, never by those modules. Run it where pip can reach PyPI; bench/gpu.sh installs the
# folder on the GPU machine with pip's --no-index.
#
#   bench/gpu_wheels.sh [DIR]   # default bench/results/wheels (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-bench/results/wheels}
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR"
# The versions this repository is tested with (setup.py's lower bounds, or newer).
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" \
  ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
ls -l "$DIR"
