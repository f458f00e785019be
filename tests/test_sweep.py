"""`kdbench sweep`: the grid runs once, a rerun fills only the holes, a failed cell does not stop
the others, and two workers on one work list never run a cell twice. Real tiny runs throughout."""

import os
import sys

from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from kdbench.cli import parse_seeds
from kdbench.errors import UserError
from kdbench.schema import Role, Tag, tag_col
from kdbench.sweep import SweepSpec, sweep
from tests.cli_fork import ForkedCLI

SETS = ("train.eval_interval=0",)


def _students():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="pandas")
    return runs[runs[tag_col(Tag.ROLE)] == Role.STUDENT]


def _trials(name):
    study = optuna.load_study(study_name=f"kdbench-sweep:{name}", storage="sqlite:///kdbench-out/optuna.db")
    return study.get_trials(deepcopy=False)


def test_a_rerun_runs_only_the_holes(workdir):
    spec = SweepSpec(("none", "kd:cirkd"), (0, 1), ("tiny",), SETS, name="s")
    first = sweep(spec, quiet=True)
    assert first.count("ran") == 4 and first.count("done") == 0
    students = _students()
    assert len(students) == 4 and (students["status"] == "FINISHED").all()
    assert set(students[tag_col(Tag.SWEEP)]) == {"s"}
    assert sorted(zip(students[tag_col(Tag.METHOD)], students[tag_col(Tag.SEED)])) == [("kd", "0"), ("kd", "1"), ("none", "0"), ("none", "1")]

    again = sweep(SweepSpec(("none", "kd:cirkd"), (0, 1, 2), ("tiny",), SETS, name="s"), quiet=True)
    assert again.count("done") == 4 and again.count("ran") == 2  # only seed 2 of each method
    earlier = {r.run_id: r.miou for r in first.results}
    assert all(earlier[r.run_id] == r.miou for r in again.results if r.state == "done")  # shown with their runs' mIoU
    assert len(_students()) == 6
    assert sorted(t.state.name for t in _trials("s")) == ["COMPLETE"] * 6


def test_a_failed_cell_is_reported_and_the_others_run(workdir):
    # a second recipe that diverges (a non-finite loss): its cell fails, the tiny recipe's runs
    raw = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "tiny.yaml").read_text())
    raw["train"].update(lr=1e12, log_interval=1)
    (workdir / "diverges.yaml").write_text(yaml.safe_dump(raw))
    spec = SweepSpec(("none",), (0,), ("diverges.yaml", "tiny"), SETS, name="f")
    result = sweep(spec, quiet=True)
    assert [r.state for r in result.results] == ["failed", "ran"]
    assert "non-finite loss" in result.results[0].error
    assert sorted(t.state.name for t in _trials("f")) == ["COMPLETE", "FAIL"]
    # the failed cell is a hole: the next sweep tries it again, the rest is done; the command exits 1
    cli = ForkedCLI(workdir / "cli")
    retry = cli.run(("sweep", "-m", "none", "--seeds", "0", "-r", "diverges.yaml", "-r", "tiny", "--set", SETS[0], "--name", "f", "-q"), workdir, dict(os.environ), 300)
    assert retry.returncode == 1, retry.stderr
    assert "0 ran, 1 already done, 1 failed" in " ".join(retry.stdout.split()) and "non-finite loss" in retry.stdout


def test_two_workers_share_one_grid_without_running_a_cell_twice(workdir):
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ)
    cli = ForkedCLI(workdir / "cli")  # each command a process of its own, forked from a warm server
    teacher = cli.run(("teacher", "-r", "tiny", "--set", SETS[0]), workdir, env, 300)
    assert teacher.returncode == 0, teacher.stderr
    args = ("sweep", "-m", "none", "-m", "kd", "--seeds", "0-2", "-r", "tiny", "--set", SETS[0], "--name", "two", "-q")
    with ThreadPoolExecutor(2) as pool:
        workers = list(pool.map(lambda _: cli.run(args, workdir, env, 600), range(2)))
    outs = [(w.stdout, w.stderr) for w in workers]
    assert all(w.returncode == 0 for w in workers), outs
    students = _students()
    finished = students[students["status"] == "FINISHED"]
    cells = list(zip(finished[tag_col(Tag.METHOD)], finished[tag_col(Tag.SEED)]))
    assert sorted(cells) == sorted({(m, str(s)) for m in ("none", "kd") for s in range(3)})  # each once
    assert len(students) == 6  # and nothing started twice
    complete = [t for t in _trials("two") if t.state.name == "COMPLETE"]
    assert len(complete) == 6 and len({t.user_attrs["cell"] for t in complete}) == 6
    ran = [out.count(" ran ") for out, _ in outs]
    assert sum(ran) == 6, outs


_CLAIMER = """
import sys
from kdbench.sweep import _claim, _claim_lock
from kdbench.tune import resolve_storage
import optuna
url = sys.argv[1]
storage = resolve_storage(url)
study = optuna.load_study(study_name="claims", storage=storage)
mine = []
while (trial := _claim(study, storage, {str(i) for i in range(100)}, _claim_lock(url))) is not None:
    mine.append(trial.number)
print(*mine)
"""


def test_two_processes_never_claim_one_cell_twice_on_sqlite(tmp_path):
    # SQLite reads a trial's state and moves it in two transactions: without the claim lock two
    # processes claimed 3-9 of these 100 trials twice (measured), so this fails without it
    import subprocess

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="claims", storage=url)
    for i in range(100):
        study.enqueue_trial({}, user_attrs={"cell": str(i)})
    workers = [subprocess.Popen([sys.executable, "-c", _CLAIMER, url], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    claimed = [set(w.communicate(timeout=120)[0].split()) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    assert not claimed[0] & claimed[1] and len(claimed[0] | claimed[1]) == 100


_STARTER = """
import sys, time
from pathlib import Path
from kdbench.schema import search_runs
from kdbench.tracking import Tracker
url, folder, me = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
def wait(name):
    while not (folder / name).exists():
        time.sleep(0.01)
(folder / f"ready{me}").touch()
wait("go")
if int(me) % 2:
    search_runs(["together"], uri=url)  # a sweep worker looking for finished cells
t = Tracker(url, "together")  # makes the store's tables, if the search did not
(folder / me).touch()
wait("start")
t.start("run", {}, {"a": 1})  # makes the experiment
t.end()
"""


def test_workers_that_start_together_create_one_store_between_them(tmp_path):
    # Four processes at each of the two moments a store or experiment is made: MLflow making a new
    # SQLite store's tables in two processes at once broke the migration (`No such index:
    # 'index_jobs_function_status_creation_time'`, seen with two runs started together), and two
    # creating one experiment at once failed the second. Two of the four first search the store
    # (as a sweep's workers do), two start with the Tracker: both are a store's first use
    import subprocess
    import time

    url, n = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", 4
    workers = [subprocess.Popen([sys.executable, "-c", _STARTER, url, str(tmp_path), str(i)], stderr=subprocess.PIPE, text=True) for i in range(n)]
    def wait_all(prefix: str) -> None:
        deadline = time.time() + 120
        while not all((tmp_path / f"{prefix}{i}").exists() for i in range(n)) and time.time() < deadline and all(w.poll() is None for w in workers):
            time.sleep(0.01)

    wait_all("ready")  # every worker has imported MLflow and waits for the same moment
    (tmp_path / "go").touch()
    wait_all("")
    (tmp_path / "start").touch()
    errors = [w.communicate(timeout=120)[1] for w in workers]
    assert [w.returncode for w in workers] == [0] * n, errors
    client = mlflow.MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert len(runs) == n and {r.info.status for r in runs} == {"FINISHED"}


def test_seeds_and_grid_errors_are_one_line():
    assert parse_seeds("0-2,7") == (0, 1, 2, 7)
    for bad in ("a", "0,0", "1-"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(UserError, match="the same run"):
        SweepSpec(("kd", "kd"), (0,), ("tiny",)).cells()


def test_sweeps_of_other_grids_under_one_name_leave_each_others_cells_alone(workdir):
    from kdbench.sweep import _enqueue, _open_study

    other = SweepSpec(("none",), (0,), ("tiny",), SETS, name="shared")
    cells = other.cells()
    study, storage = _open_study(other, cells)
    _enqueue(study, storage, cells, reclaim=False)  # another worker's grid, not started yet
    mine = sweep(SweepSpec(("kd:cirkd",), (0,), ("tiny",), SETS, name="shared"), quiet=True)
    assert mine.count("ran") == 1
    states = {t.user_attrs["label"]: t.state.name for t in _trials("shared")}
    assert states == {"none (default) seed 0 [tiny]": "WAITING", "kd (cirkd) seed 0 [tiny]": "COMPLETE"}
    assert sweep(other, quiet=True).count("ran") == 1  # its own worker runs it
