#!/usr/bin/env bash
# What the GPU benchmarks need on an offline CUDA machine whose image already has torch, transformers and
# Triton: wheels of ttscale's other dependencies for that machine's Python, and the embedded model's tokenizer
# (random-weight shapes take it with --tokenizer). Run here (with network and scripts/setup.sh done):
#   bash benchmarks/gpu_bundle.sh [OUT=.gl] [PYTHON_VERSION=3.12]
# then on the GPU machine, from a copy of the checkout holding OUT:
#   python -m pip install -q --no-index --find-links OUT/wheels pydantic numpy httpx asyncio-throttle rich typer \
#       'math-verify[antlr4_13_2]' fastapi uvicorn httptools uvloop openai psutil py-spy pytest pytest-asyncio hypothesis
#   export PYTHONPATH=$PWD; bash benchmarks/gpu_suite.sh OUT/tok RESULTS_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gl}
PYV=${2:-3.12}
mkdir -p "$OUT/wheels" "$OUT/tok"
.venv/bin/python -m pip download -q --only-binary=:all: --python-version "$PYV" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$OUT/wheels" \
  "pydantic>=2.7" "numpy>=1.26" "httpx>=0.27" "asyncio-throttle>=1.0.2" "rich>=13" "typer>=0.12" \
  "math-verify[antlr4_13_2]>=0.7" fastapi uvicorn httptools uvloop "openai>=1.40" psutil py-spy pytest pytest-asyncio hypothesis
model=$(.venv/bin/python -c "from ttscale.models import default_model_dir; print(default_model_dir())")
for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -f "$model/$f" ] && cp "$model/$f" "$OUT/tok/"
done
du -sh "$OUT"
