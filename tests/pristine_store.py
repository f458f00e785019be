"""A test's own MLflow store, made in milliseconds instead of seconds.

MLflow makes a new SQLite store by running its whole migration history, 2-5 s on the 2-core CI
machine; the suite gives some 30 tests a store of their own, which cost 86 s. The first test that
asks makes one pristine store through MLflow itself; every later test gets a byte copy of it
(0.01 s), the same file MLflow would have made. Store creation itself stays under test where no
copy is put: a run's default store in its output root, the sweep workers that create one store
together, every store a test names other than a test folder's ``mlflow.db``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_template: Path | None = None


def _make() -> Path:
    import mlflow

    folder = Path(tempfile.mkdtemp(prefix="kdbench-pristine-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    db = folder / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)  # the migrations
    return db


def seed_store(db: Path) -> Path:
    """``db`` made a new, empty MLflow store (unless it already is a file); returns ``db``."""
    global _template
    if not db.exists():
        if _template is None:
            _template = _make()
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template, db)
    return db
