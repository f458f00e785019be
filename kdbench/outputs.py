"""Where kdbench writes: one output root per working folder (``output_dir``, default
``./kdbench-out``) holding everything a run leaves behind, so running from another folder never
scatters files:

    kdbench-out/
      mlflow.db          MLflow's store (unless tracking.uri, --tracking-uri or $MLFLOW_TRACKING_URI names another)
      .mlflow.db.lock    held while a process makes that store's tables (a sweep's workers start together)
      mlartifacts/       the artifacts of runs in that store (recipe, metrics, weights, figures, logs)
      optuna.db          the work lists of `kdbench tune` and `kdbench sweep` (unless --storage names another)
      <method>-<hash>/   one folder per run: its resumable checkpoint last.pt

Trained teachers and generated data are cached per machine, outside it (``cache_dir``:
$KDBENCH_CACHE or ~/.cache/kdbench).
"""

from __future__ import annotations

import os
from pathlib import Path

OUTPUT_ROOT = "kdbench-out"
STORE, ARTIFACTS, STUDIES = "mlflow.db", "mlartifacts", "optuna.db"


def tracking_uri(explicit: str | None = None, root: str | Path = OUTPUT_ROOT) -> str:
    """The MLflow store: ``explicit`` (tracking.uri, --tracking-uri), else $MLFLOW_TRACKING_URI,
    else the SQLite store in the output root (absolute, so the printed `mlflow ui` command works
    from anywhere)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(root).resolve() / STORE}"


def use_tracking(explicit: str | None = None, root: str | Path = OUTPUT_ROOT) -> str:
    """Point MLflow at ``tracking_uri(explicit, root)`` and return it. Always set, even where
    $MLFLOW_TRACKING_URI decides: MLflow keeps the URI it was last given for the whole process
    (and ``set_tracking_uri(None)`` deletes the variable), so every entry point sets it afresh."""
    import mlflow

    uri = tracking_uri(explicit, root)
    mlflow.set_tracking_uri(uri)
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (None for a server or another database)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.split("///", 1)[1].split("?")[0])


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: beside the store (MLflow
    would use ./mlruns of whatever folder the run started in). None: the server decides."""
    db = sqlite_file(uri)
    return (db.resolve().parent / ARTIFACTS).as_uri() if db else None


def study_storage(root: str | Path = OUTPUT_ROOT) -> str:
    """The default Optuna storage of `tune` and `sweep`: never MLflow's own file."""
    return f"sqlite:///{Path(root) / STUDIES}"
