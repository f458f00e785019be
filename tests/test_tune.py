"""Tuning: the search space and its errors, studies on the tiny recipe through the CLI (MLflow parent
and child runs, pruning, a failing trial, resuming, two processes on one SQLite study) and
`run --from-study`."""

import dataclasses

import mlflow
import optuna
import pytest

from kdbench.errors import UserError
from kdbench.methods import registry
from kdbench.tune import Param, parse_param
from tests.cli_fork import store_env


def test_declared_ranges_overrides_and_recipe_keys():
    assert parse_param("alpha", "attnfd") == Param("alpha", "float", 0.001, 20.0, True)
    assert parse_param("alpha=0.5:8:log", "attnfd") == Param("alpha", "float", 0.5, 8.0, True)
    assert parse_param("temperature=1:6", "cwd") == Param("temperature", "float", 1.0, 6.0, False)
    assert parse_param("reduction=int:4:32", "attnfd") == Param("reduction", "int", 4, 32, False)
    assert parse_param("normalize", "attnfd") == Param("normalize", "categorical", choices=("batch", "channel"))
    assert parse_param("alpha=1,2,4", "attnfd") == Param("alpha", "categorical", choices=(1, 2, 4))
    p = parse_param("train.lr=1e-3:1e-1:log", "kd")
    assert (p.low, p.high, p.log, p.override) == (0.001, 0.1, True, "train.lr")
    assert parse_param("alpha", "attnfd").override == "method.alpha"


@pytest.mark.parametrize(
    "text, method, message",
    [
        ("alpha=8:0.5", "attnfd", "the range needs LOW < HIGH, got \\[8.0, 0.5\\]"),
        ("alpha=0:8:log", "attnfd", "a log range needs LOW > 0, got 0.0"),
        ("beta", "attnfd", "'attnfd' has no hyper-parameter 'beta'"),
        ("teacher_attention", "attnfd", "teacher_attention cannot be tuned: 'pretrained' needs a teacher"),
        ("layers=backbone", "attnfd", "layers cannot be tuned"),
        ("squared", "attnfd", "squared has no declared search range"),
        ("train.lr", "kd", "a recipe key has no declared range; give one"),
        ("train.speed=1:2", "kd", "'train.speed' is not a recipe key"),
        ("alpha=a:b", "attnfd", "'a' is not a number"),
        ("alpha=1:2:lin", "attnfd", "expected NAME=LOW:HIGH"),
        ("reduction=int:1.5:8", "attnfd", "int bounds must be whole numbers"),
    ],
)
def test_search_space_errors(text, method, message):
    with pytest.raises(UserError, match=message):
        parse_param(text, method)


def test_every_declared_range_of_every_method_is_valid():
    count = 0
    for name, cls in registry().items():
        for f in dataclasses.fields(cls.Config):
            meta = f.metadata
            if f.name in cls.structural or (meta.get("low") is None and not meta.get("choices")):
                continue
            p = parse_param(f.name, name)  # raises on an inverted range or a log range from <= 0
            default = f.default
            if p.kind == "categorical":
                assert default in p.choices, (name, f.name)
            count += 1
    assert count >= 25


# ---------------------------------------------------------------------------------------------
# studies through the CLI


@pytest.fixture
def kdbench(forked):
    def command(*args, cwd, check=True):
        r = forked.run(args, cwd, store_env(cwd), 600)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    return command


TINY = ["--recipe", "tiny", "--set", "train.iterations=4", "--quiet"]


def _runs():
    return mlflow.search_runs(search_all_experiments=True)


def _study(path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path / 'kdbench-out' / 'optuna.db'}")


def test_a_study_logs_prunes_resumes_and_reruns_its_best(workdir, kdbench):
    r = kdbench("tune", "--method", "attnfd", "--param", "alpha", "--trials", "4", *TINY, cwd=workdir)
    assert "study attnfd-tiny: 4 trials" in r.stdout and "kdbench run --recipe kdbench-out/attnfd-tiny-best.yaml" in r.stdout
    study = _study(workdir, "attnfd-tiny")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") >= 1 and states.count("PRUNED") >= 1, states  # seeded: 2 and 2 here
    runs = _runs()
    parent = runs[runs["tags.kdbench.role"] == "study"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    parent_id = parent.iloc[0]["run_id"]
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id
    assert parent.iloc[0]["metrics.best_holdout_miou"] == pytest.approx(study.best_value)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent_id)}
    assert {"attnfd-tiny-trials.csv", "plots", "attnfd-tiny-best.yaml"} <= artifacts
    assert (workdir / "kdbench-out" / "attnfd-tiny-optimization_history.png").is_file() and (workdir / "kdbench-out" / "attnfd-tiny-slice.png").is_file()
    children = runs[runs["tags.mlflow.parentRunId"] == parent_id]
    assert sorted(children["tags.kdbench.trial"].astype(int)) == [0, 1, 2, 3]
    assert set(children["tags.eval_split"]) == {"holdout"} and set(children["params.data.holdout_fraction"]) == {"0.1"}
    for t in study.trials:  # Optuna's state and the run's MLflow status agree, pruned is not failed
        row = children[children["tags.kdbench.trial"] == str(t.number)].iloc[0]
        want = {"COMPLETE": ("FINISHED", "complete"), "PRUNED": ("KILLED", "pruned")}[t.state.name]
        assert (row["status"], row["tags.kdbench.trial_state"]) == want
        assert float(row["params.method.params.alpha"]) == pytest.approx(t.params["alpha"])
    # the same command with more trials resumes the study under the same parent run
    kdbench("tune", "--method", "attnfd", "--param", "alpha", "--trials", "5", *TINY, cwd=workdir)
    assert len(_study(workdir, "attnfd-tiny").trials) == 5
    runs = _runs()
    assert (runs["tags.kdbench.role"] == "study").sum() == 1 and (runs["tags.mlflow.parentRunId"] == parent_id).sum() == 5
    # --from-study reruns the best values on the full training split
    best = _study(workdir, "attnfd-tiny").best_trial
    r = kdbench("run", "--from-study", "attnfd-tiny", "--quiet", cwd=workdir)
    run_id = r.stdout.split("MLflow run ")[1].split("]")[0]
    params = mlflow.get_run(run_id).data.params
    assert float(params["method.params.alpha"]) == pytest.approx(best.params["alpha"])
    assert params["data.holdout_fraction"] == "0.0" and params["benchmark"] == "tiny" and params["train.iterations"] == "4"


def test_a_failing_trial_does_not_stop_the_study(workdir, kdbench):
    # lr 1e30 blows the loss up: that trial fails with the reason, the other one completes
    kdbench("tune", "--method", "kd", "--param", "train.lr=0.01,1e30", "--sampler", "grid", "--pruner", "none", "--trials", "2", *TINY, cwd=workdir)
    study = _study(workdir, "kd-tiny")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL"]
    runs = _runs()
    failed = runs[runs["status"] == "FAILED"]
    assert len(failed) == 1 and "non-finite loss" in failed.iloc[0]["tags.error"]


def test_two_processes_share_one_sqlite_study(workdir, kdbench):
    kdbench("tune", "--method", "kd", "--param", "temperature", "--pruner", "none", "--trials", "4", "--n-jobs", "2", *TINY, cwd=workdir)
    study = _study(workdir, "kd-tiny")
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))) and 4 <= len(numbers) <= 5  # a worker may start one more
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    runs = _runs()
    children = runs[runs["tags.kdbench.role"] == "student"]
    assert sorted(children["tags.kdbench.trial"].astype(int)) == numbers  # every trial ran once
    assert (runs["tags.kdbench.role"] == "study").sum() == 1
