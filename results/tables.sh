#!/usr/bin/env bash
# The README's comparison table and figures of the default benchmark, made from the MLflow store by
# kdbench itself (after `bash results/sweep_default.sh`; run both in the folder whose kdbench-out/ holds the runs).
# Usage: bash results/tables.sh
set -euo pipefail
out=results/default_benchmark
mkdir -p "$out"
for f in md tex csv html; do kdbench table -e kdbench-default --extra --out "$out/table.$f"; done
kdbench table -e kdbench-default --per-class --out "$out/per_class.md"
kdbench plot per-class -e kdbench-default --out "$out"
kdbench plot curves -e kdbench-default --out "$out"
kdbench plot predictions -e kdbench-default --images 0,1,2,3 --out "$out"
kdbench plot attention -e kdbench-default --out "$out"
