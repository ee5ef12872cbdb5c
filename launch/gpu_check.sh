#!/usr/bin/env bash
# The GPU check of issue 24 on the device machine, in one call (about 8 minutes on an H200):
#   bash launch/gpu_wheels.sh                                    # here, once: .whl/ with DeepSpeed and pydantic
#   device run, carry [".whl"]: bash launch/gpu_check.sh         # there: $OUT/gpu_check.json and gpu_check.log
# Extra arguments go to launch/gpu_check.py (--shapes qwen2.5-0.5b, --variants lora,l1ra-masked, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import deepspeed, pydantic, hjson" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: deepspeed is not installed and no .whl/ was carried (run launch/gpu_wheels.sh here)" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT_DIR/gpu.csv" 2>&1 || true
timeout 560 python3 launch/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
