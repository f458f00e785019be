#!/usr/bin/env bash
# The multi-seed comparison of the README ("Results on the default benchmark"): none, kd and attnfd
# at 5 seeds (the positive control's paired tests), then every other method at its default preset
# and AttnFD's paper and code presets at 3 seeds. Runs go to kdbench-out/mlflow.db (experiment kdbench-default), the work list to kdbench-out/optuna.db. A rerun
# runs only the cells MLflow does not hold yet, so the grid can be completed over several sittings.
# Usage: bash results/sweep_default.sh   (then the table and figure commands at the end)
set -uo pipefail
kdbench sweep --name default -m none -m kd -m attnfd --seeds 0-4 -q "$@"
kdbench sweep --name default -m cwd -m skd -m ifvd --seeds 0-2 -q "$@"
kdbench sweep --name default -m attnfd:paper -m attnfd:code --seeds 0-2 -q "$@"
