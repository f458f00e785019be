"""Every test that runs kdbench gets its own cache, MLflow store and working directory."""

import os

import pytest

# Under pytest-xdist each worker would start torch with a thread per core, so two workers on two
# cores would run four busy threads: the suite took 1.5x as long here as with one thread per worker.
# Set before torch is imported (OpenMP reads it once); subprocesses (the forked CLI, torchrun)
# inherit it. A value the user set wins.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))

from tests.cli_fork import store_env


def _isolate(mp: pytest.MonkeyPatch, path) -> None:
    env = store_env(path)
    mp.chdir(path)
    for key in ("KDBENCH_CACHE", "MLFLOW_TRACKING_URI"):
        mp.setenv(key, env[key])
    # MLflow keeps the URI it was last given for the whole process (kdbench sets it at every entry
    # point, the tests' own mlflow.search_runs does not): start each test on its own store
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def shared_workdir(tmp_path_factory):
    """One store and one cached teacher for a module's many short runs (the MLflow schema set-up
    and the teacher are the slow part of a tiny run)."""
    path = tmp_path_factory.mktemp("shared")
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, path)
        yield path


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    """The `kdbench` command line, warm: each command a forked child of the session's one process
    that imported torch, MLflow and Optuna (tests/cli_fork.py), seconds faster than a fresh interpreter."""
    from tests.cli_fork import ForkedCLI

    return ForkedCLI(tmp_path_factory.mktemp("cli"))
