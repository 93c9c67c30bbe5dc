#!/usr/bin/env bash
# bench/gpu.py on a machine with one NVIDIA GPU and no network, in one command:
#
#   bench/gpu.sh [bench/gpu.py flags]    # e.g. --batch 8 --out /tmp/gpu.json
#
# First, if the folder LM_WHEELS (default bench/results/wheels, what bench/gpu_wheels.sh fills)
# holds wheels, installs them offline into LM_SITE (default /tmp/lm-gpu-site, put first on
# PYTHONPATH, so the image's own environment is left as it is). lm itself runs from this
# checkout; nothing else is installed. JAX may take 95% of the GPU's memory
# (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set) instead of its default 75%: the memory limit the
# train rows are checked against. The run prints its tables and writes bench/results/gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${LM_WHEELS:-bench/results/wheels}
SITE=${LM_SITE:-/tmp/lm-gpu-site}
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if (( ${#wheels[@]} )); then
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile \
    --upgrade --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
if ! "$PYTHON" -c 'import lm.train, lm.generate, lm.engine, lm.memory'; then
  echo "bench/gpu.sh: lm does not import with $PYTHON (a missing package? bench/gpu_wheels.sh" \
    "fetches those a CUDA JAX image lacks, into $WHEELS)" >&2
  exit 1
fi
exec "$PYTHON" bench/gpu.py "$@"
