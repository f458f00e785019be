"""The command line: a real run of the tiny recipe, and bad input as one line with exit code 2."""

import json
import os
import subprocess
import sys

import pytest


def kdbench(*args, cwd):
    env = {**os.environ, "KDBENCH_CACHE": str(cwd / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", "kdbench.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_run_of_the_tiny_recipe(tmp_path):
    r = kdbench("run", "--recipe", "tiny", "--method", "kd", "--set", "method.temperature=2", "--seed", "3", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "kd (cirkd) seed 3: mIoU" in r.stdout
    assert (tmp_path / "mlflow.db").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--recipe", "tiny", "--set", "train.lr=fast"], "error: train.lr: expected float, got 'fast'"),
        (["run", "--recipe", "tiny", "--method", "magic"], "error: method: unknown method 'magic'"),
        (["run", "--recipe", "nosuch"], "error: --recipe: no recipe named 'nosuch'"),
        (["teacher", "--recipe", "tiny", "--set", "teacher.checkpoint=/no/t.pt"], "error: teacher.checkpoint: no checkpoint file"),
        # usage errors, raised by typer's own copy of click
        (["run", "--seed", "abc"], "error: Invalid value for '--seed'"),
        (["run", "--methd", "kd"], "error: No such option: --methd (Possible options: --method"),
        (["runn"], "error: No such command 'runn'. Did you mean 'run'?"),
        (["run", "--method"], "error: Option '--method' requires an argument"),
        (["bench", "--steps", "1.5"], "error: Invalid value for '--steps'"),
        (["sweep", "-m", "kd", "--seeds", "1-"], "error: --seeds: expected seeds like 0,1,2 or 0-4"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    r = kdbench(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_and_methods(tmp_path):
    r = kdbench("--help", cwd=tmp_path)
    assert r.returncode == 0 and "run" in r.stdout and "methods" in r.stdout
    r = kdbench("methods", cwd=tmp_path)
    assert r.returncode == 0
    for name in ("none", "kd", "cwd", "skd", "ifvd", "attnfd"):
        assert f"{name}:" in r.stdout
    assert "presets: default, cirkd" in r.stdout
    assert "recipe 'default' sets: adv_width=32" in r.stdout  # the default benchmark's methods: section
    assert "recipe 'tiny' sets" not in kdbench("methods", "--recipe", "tiny", cwd=tmp_path).stdout


def test_bench_runs_without_mlflow_or_optuna_and_writes_json(tmp_path):
    """A GPU machine may lack MLflow and Optuna: bench must not import them."""
    code = (
        "import sys; sys.modules['mlflow'] = None; sys.modules['optuna'] = None; "
        "sys.argv = ['kdbench'] + sys.argv[1:]; from kdbench.cli import main; main()"
    )
    args = ["bench", "--recipe", "tiny", "--steps", "1", "--rounds", "3", "--warmup", "1", "-m", "none", "-m", "kd", "-m", "attnfd", "--json", "b.json", "--quiet"]
    env = {**os.environ, "KDBENCH_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for row in ("floor", "none", "kd", "attnfd", "paper", "x floor"):  # AttnFD's paper preset: a CBAM teacher
        assert row in r.stdout
    assert "images/s with 0 workers" in r.stdout  # the loader line
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["setting"]["device"] == "cpu" and data["setting"]["batch_size"] == 4
    floor, *rows = data["rows"]
    assert floor["method"] == "floor" and floor["x_floor"]["rounds"] == [1.0, 1.0, 1.0]
    for row in rows:  # one ratio per round, each against that round's floor
        assert len(row["ms_per_step"]["rounds"]) == len(row["x_floor"]["rounds"]) == 3
        want = [ms / f for ms, f in zip(row["ms_per_step"]["rounds"], floor["ms_per_step"]["rounds"])]
        assert row["x_floor"]["rounds"] == want
        assert row["overlaps_floor"] == (min(want) <= 1.0 <= max(want))


def test_cuda_asked_for_without_a_gpu_is_one_line_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = kdbench("run", "--recipe", "tiny", "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: runtime.device: 'cuda' asked for, but torch") and len(r.stderr.strip().splitlines()) == 1, r.stderr
