#!/usr/bin/env bash
# The GPU benchmark set in one go (about 8 minutes on one H200; STEPS splits it where calls are capped), each
# step bounded so one stuck step cannot take the rest down; outputs and logs land in RESULTS_DIR. Needs a CUDA
# machine with ttscale's dependencies (benchmarks/gpu_bundle.sh for an offline one), PYTHONPATH at the checkout,
# and `python` (or $PYTHON) the interpreter that has them.
#   bash benchmarks/gpu_suite.sh TOKENIZER_DIR RESULTS_DIR [STEPS]
# STEPS: any of engine,profile,sampler,e2e,cold (default all). Do not run it under `py-spy record --native`:
# that slowed a 512-branch run more than tenfold.
set -uo pipefail
cd "$(dirname "$0")/.."
TOK=${1:?tokenizer folder}
OUT=${2:?results folder}
STEPS=${3:-engine,profile,sampler,e2e,cold}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/ttscale-triton}
step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? ($OUT/$name.log)"
}
has() { [[ ",$STEPS," == *",$1,"* ]]; }
has engine && step engine_throughput 150 "$PY" benchmarks/engine_throughput.py --device cuda --ns 1,64
has profile && step engine_profile_512 120 "$PY" benchmarks/engine_profile.py --shape smollm2 --n 512 --prompt 64 \
  --top-p 0.95 --temperature 0.6
has sampler && step sampler_variants 110 "$PY" benchmarks/sampler_bench.py --variants --reps 50
if has e2e; then
  step e2e_smollm2 225 "$PY" benchmarks/e2e_throughput.py --device cuda --model random:smollm2 --tokenizer "$TOK" \
    --max-tokens 256 --paths engine,pipeline,eval,eval-inprocess,generate --out "$OUT/e2e_smollm2.txt"
  step e2e_qwen 225 "$PY" benchmarks/e2e_throughput.py --device cuda --model random:qwen2.5-0.5b --tokenizer "$TOK" \
    --max-tokens 128 --paths engine,pipeline,eval,eval-inprocess,generate --out "$OUT/e2e_qwen.txt"
fi
if has cold; then  # first processes on an empty Triton cache (JIT as it comes, then compiled ahead), then one
  # that finds the kernels on disk
  export TRITON_CACHE_DIR=${TMPDIR:-/tmp}/ttscale-triton-cold  # not under OUT: results come back, not kernels
  for run in jit:0 ahead:1 ahead-again:1; do
    [[ $run == ahead-again:1 ]] || rm -rf "$TRITON_CACHE_DIR"
    TTSCALE_PRECOMPILE=${run#*:} step cold_start_${run%:*} 110 "$PY" benchmarks/cold_start.py --model random:smollm2 \
      --tokenizer "$TOK" --problems 64 --n 8 --max-tokens 512 --triton-cache keep --out "$OUT/cold_start_${run%:*}.txt"
  done
fi
tail -n 8 "$OUT"/*.txt 2>/dev/null
