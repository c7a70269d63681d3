#!/bin/sh
# The GPU rows of the benchmark, for a machine with a CUDA device: saelab's training step with bf16
# autocast (fp32 master weights) and torch.compile at d_in 768, d_sae 24576, batch 4096, against
# the bf16 matrix-product roofline of the same shapes (and SAELens's step under bf16 autocast where
# installed), then the stacked sweep of 8 SAEs on the GPU against 8 separate runs.
# Writes bench/results/<commit>-gpu.json. Usage: sh bench/gpu.sh [--quick]
set -e
cd "$(dirname "$0")/.."
PY=${PY:-python}
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m bench --gpu "$@"
