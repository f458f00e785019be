#!/usr/bin/env bash
# AttnFD's alpha on the default benchmark: an Optuna study of 12 trials (TPE seeded 0, median pruner,
# 300-iteration trials scored on the held-out 10% of the training split), then the best alpha and
# alpha = 2 (the paper's VOC value, kdbench's default) on the full training split at seeds 0, 1, 2,
# scored on the val split. Writes results/tuning/ (plots, trials table, best recipe; the Optuna
# storage itself, optuna.db, stays out of git). MLflow: the default store, kdbench-out/mlflow.db of the working directory.
#
#   bash results/tune_alpha.sh            # AttnFD's default preset (study attnfd-default)
#   bash results/tune_alpha.sh paper      # another preset (study attnfd-paper)
set -euo pipefail
preset=${1:-default}
store=results/tuning
study=attnfd-$preset
mkdir -p "$store"
kdbench tune --method attnfd --preset "$preset" --param alpha --trials 12 --budget-iters 300 \
    --study "$study" --storage "sqlite:///$store/optuna.db" --quiet | tee "$store/$study-study.txt"
for seed in 0 1 2; do
    kdbench run --from-study "$study" --storage "sqlite:///$store/optuna.db" --seed "$seed" --quiet
    kdbench run --method attnfd --preset "$preset" --set method.alpha=2.0 --seed "$seed" --quiet
done | tee "$store/$study-alpha-check.txt"
