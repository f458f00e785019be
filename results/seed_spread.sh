#!/usr/bin/env bash
# How the seed spread in results/default_benchmark.md was made: seeds 1 and 2 of every method's
# default run, next to the seed-0 runs of default_benchmark.sh, in the same MLflow store. The
# teacher is the same for every seed (its own seed is in the teacher section); --seed changes the
# student's initialisation and data order. Then
#   python results/summarize.py > results/default_benchmark.md
set -euo pipefail
for seed in 1 2; do
  for m in none kd cwd skd ifvd attnfd; do kdbench run --quiet --seed "$seed" --method "$m"; done
done
