#!/usr/bin/env bash
# Trains the default DeepPrune judge (ttscale/judges/data/deepprune_judge.json) on the committed SmolLM2
# bank (scripts/record_deepprune_bank.sh): prefix pairs = the first 48 tokens of two traces of one problem,
# labelled by answer equivalence (math-verify); half of the problems train it, the other half are held
# out and give the AUROC, TNR and error rates at tau (calibrated on the training problems to join
# at most 10% of their different-answer pairs) stored in the model's report (and printed).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
BANK=${BANK:-tests/data/deepprune_smollm2_chain_sum.jsonl}
PAIRS=${PAIRS:-/tmp/deepprune-pairs}
OUT=${OUT:-ttscale/judges/data/deepprune_judge.json}
.venv/bin/ttscale judge pairs --bank "$BANK" --out-dir "$PAIRS" --prefix-tokens 48 --heldout-frac 0.5 --split-seed 0
.venv/bin/ttscale judge train --pairs "$PAIRS/train.jsonl" --heldout "$PAIRS/heldout.jsonl" \
  --split "$PAIRS/split.json" --target-fpr 0.1 --out "$OUT"
