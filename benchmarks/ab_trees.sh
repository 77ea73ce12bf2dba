#!/usr/bin/env bash
# A/B of the engine and native benchmarks: this tree against an older revision, in one run on one machine.
#   bash benchmarks/ab_trees.sh OLD_REV [OUT_DIR]        (e.g. OLD_REV=e18e6ee; needs CUDA for the figures)
# Writes engine_{new,old}.txt and native_{new,old}.txt to OUT_DIR; compare tok/s and ms/step line by line.
# The old tree comes from `git archive` (or from an unpacked folder given as OLD_REV).
set -euo pipefail
old=$1; out=${2:-ab-out}
mkdir -p "$out"; out=$(cd "$out" && pwd)
if [ -d "$old" ]; then tree=$(cd "$old" && pwd); else
  tree=$(mktemp -d); git archive "$old" | tar -x -C "$tree"; fi
run() {  # tree name
  (cd "$1" && PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" python3 benchmarks/engine_throughput.py --device cuda \
      --ns 1,64 --out "$out/engine_$2.txt" | tail -4)
  (cd "$1" && PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}" python3 benchmarks/native_strategies.py --workers 1,4 \
      --streams 4 > "$out/native_$2.txt" 2>&1; tail -8 "$out/native_$2.txt")
}
run "$(pwd)" new
run "$tree" old
