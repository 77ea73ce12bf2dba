#!/usr/bin/env bash
# Records the real-trace bank behind tests/strategies/test_deepprune_real.py and the shipped DeepPrune
# judge: SmolLM2-135M-Instruct (bundled, in-process vLLM on CPU), reasoning-gym chain-sum, 8 traces per
# problem, <= 256 tokens: 48 problems of seed 0 at temperature 0.6 (answers scatter: 4% accuracy) and
# 48 of seed 1 at temperature 0.3 (more traces agree, so the judge sees enough "same" pairs).
# The raw banks (per-token logprobs, ~13 MB each) go to /tmp; the committed copy is compacted by
# scripts/compact_bank.py (text and token counts in 8-token deltas, no logprobs, ~1.5 MB).
# Takes about 20 min per run on 2 CPU cores. Then scripts/train_deepprune_judge.sh trains the judge.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
RAW=${RAW:-/tmp/deepprune-raw}
OUT=${OUT:-tests/data/deepprune_smollm2_chain_sum.jsonl}
record() {  # seed temperature
  nice -n 5 .venv/bin/ttscale bank record --dataset chain-sum --limit 48 --seed "$1" --temperature "$2" \
    --n 8 --max-tokens 256 --backend vllm --concurrency 6 --out "$RAW-s$1.jsonl" --db "$RAW-s$1-results.db" \
    --no-progress
}
record 0 0.6
record 1 0.3
.venv/bin/python scripts/compact_bank.py "$RAW-s0.jsonl" "$RAW-s1.jsonl" "$OUT" --chunk 8
