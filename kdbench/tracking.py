"""MLflow tracking: one run per training run, everything a table needs on the run itself.

MLflow is imported where it is used, not with this module: a run's other processes (torchrun's
ranks above 0) never log, and MLflow's import costs seconds on each of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kdbench
from kdbench.folders import exclusive
from kdbench.outputs import OUTPUT_ROOT, STORE, artifact_location, sqlite_file, use_tracking
from kdbench.schema import Tag, encode_param

if TYPE_CHECKING:
    import mlflow


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """A tracking server that does not answer is one UserError now, not minutes of MLflow's retries.

    Any HTTP answer (even 401 or 404) counts as reachable, and so does a TLS failure (MLflow may be
    told to trust that certificate); only a refused, unresolvable or silent server does not."""
    import requests

    from kdbench.errors import UserError

    if not uri:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.exceptions.SSLError:
        return
    except requests.exceptions.RequestException as err:
        raise UserError(
            f"MLflow tracking server {uri} is not reachable ({type(err).__name__}); start it, or point "
            "MLFLOW_TRACKING_URI (or tracking.uri, --tracking-uri) at one that runs, or unset it to use the local store in kdbench-out/"
        ) from None


def open_store(uri: str | None = None, root: str | Path = OUTPUT_ROOT) -> tuple[str, mlflow.MlflowClient]:
    """MLflow pointed at the store (see ``use_tracking``), its tables made: the URI and a client.

    Every first use of a store goes through here. MLflow makes a SQLite store's file and tables (or
    upgrades them) on first use, and two processes doing that at once (a sweep's workers) break
    each other's migration; so a local store is first used under a lock file beside it, unless its
    folder is read-only (then nothing can be made there, only read)."""
    import mlflow

    uri = use_tracking(uri, root)
    check_reachable()
    db = sqlite_file(uri)
    if db is None or (db.is_file() and not os.access(db.parent, os.W_OK)):
        return uri, mlflow.MlflowClient()
    with exclusive(db.parent / f".{db.name}.lock", what="output_dir"):
        client = mlflow.MlflowClient()
        client.search_experiments(max_results=1)  # the first use
    return uri, client


def read_store(uri: str | None = None, command: str = "table") -> str:
    """MLflow pointed at a store that must already exist: reading (``command``) must not leave an
    empty store behind where the user mistyped a path. Returns the URI."""
    from kdbench.errors import UserError

    uri = use_tracking(uri)
    db = sqlite_file(uri)
    if db is not None and not db.is_file():
        found = sorted(Path.cwd().glob(f"*/{STORE}"))[:3]  # output roots here (`--set output_dir=...`)
        here = f"; stores in this folder: {', '.join(f'--tracking-uri sqlite:///{f}' for f in found)}" if found else ""
        raise UserError(
            f"no MLflow store at {uri}; run the {command} where the runs were made (or `kdbench run --method kd` first), "
            f"or point --tracking-uri (or MLFLOW_TRACKING_URI) at the store that has them{here}"
        )
    check_reachable()
    return uri


class Tracker:
    """A thin, explicit wrapper: start (or reopen) a run, log, end with a status."""

    def __init__(self, uri: str | None, experiment: str, root: str | Path = OUTPUT_ROOT) -> None:
        self.uri, self.client = open_store(uri, root)
        self.experiment = experiment
        self.run_id: str | None = None
        self.text_log: Path | None = None

    def _experiment_id(self) -> str:
        """The experiment's id, created if absent; another process may create it at the same moment."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=artifact_location(self.uri))
        except MlflowException:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def keep_log(self, path: Path) -> None:
        """Also write everything logged as plain text lines to ``path`` (appended to on a resume),
        logged as the run's ``run.log`` artifact when it ends, however it ends."""
        self.text_log = path
        self.note(f"run {self.run_id} ({self.experiment}) in {Path.cwd()}: {' '.join(sys.argv)}")

    def note(self, text: str) -> None:
        if self.text_log is not None:
            with open(self.text_log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def start(
        self,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """A new run, or the run ``run_id`` reopened (resume). Returns the run id."""
        from mlflow.entities import Param

        exp_id = self._experiment_id()
        if run_id is None:
            tags = {**tags, Tag.VERSION: kdbench.__version__, Tag.COMMIT: git_commit()}
            if parent_run_id:
                tags[Tag.PARENT] = parent_run_id
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            items = [Param(k, encode_param(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.note(f"step {step}: " + " ".join(f"{k}={float(v):.6g}" for k, v in metrics.items()))
        from mlflow.entities import Metric

        items = [Metric(_metric_key(k), float(v), _now_ms(), step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(obj, indent=1), name)

    def log_file(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        if self.run_id is None:
            return
        if error:
            self.client.set_tag(self.run_id, Tag.ERROR, error[:5000])
        if self.text_log is not None:
            self.note(f"ended {status}" + (f": {error}" if error else ""))
            self.client.log_artifact(self.run_id, str(self.text_log))
        from mlflow.entities import RunStatus

        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


def _metric_key(k: str) -> str:
    return k.replace("@", "_")


def _now_ms() -> int:
    return int(time.time() * 1000)


class NullTracker(Tracker):
    """What the processes other than rank 0 of a multi-GPU run log to: nothing."""

    def __init__(self) -> None:
        self.run_id = None

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any], run_id: str | None = None, parent_run_id: str | None = None) -> str | None:  # type: ignore[override]
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def keep_log(self, path: Path) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        pass
