#!/usr/bin/env bash
# The one command for a lent GPU machine (one H200, 15 minutes of device time): LoRA vs BeamLoRA on 8 Llama-7B-shaped
# layers, bf16 and NF4 bases (benchmarks/gpu.py; about 2-4 minutes there, most of it imports and model builds).
#   bash benchmarks/gpu.sh [extra gpu.py flags]    -> $OUT/gpu.json and $OUT/gpu.log (OUT defaults to benchmarks/results)
#
# The device machine has torch, transformers and peft but no bitsandbytes, no DeepSpeed and no registry. gpu.py needs
# neither DeepSpeed nor an installed beamlora_ds (it imports it from this checkout). For the NF4 base, carry the
# bitsandbytes wheel (43 MB, it holds the CUDA 13 kernels) - here, in the repo root, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and call the device with carry [".whl"] and the command `bash benchmarks/gpu.sh`. Without the wheel, NF4 is skipped
# (said in the log and in the JSON's "skipped") and the bf16 base still runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export OUT PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, transformers, peft" 2>/dev/null; then
  bash scripts/setup.sh  # a machine with a registry: the package and its pinned dependencies
fi
if ! "$PY" -c "import bitsandbytes" 2>/dev/null && ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/bitsandbytes-*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.log" || true
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__)" 2>&1 | tee -a "$OUT/gpu.log"
"$PY" benchmarks/gpu.py --json "$OUT/gpu.json" "$@" 2>&1 | tee -a "$OUT/gpu.log"
