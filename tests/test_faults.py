"""Faults lose nothing: real processes killed (SIGKILL) at a step, in the middle of a checkpoint
write and in the middle of an evaluation, interrupted (Ctrl-C) and failing to write (disk full),
then continued with `--resume`, end with the same weights and metrics as a run never interrupted.

Each command is its own process (tests/cli_fork.py), killed by `KDBENCH_FAULT` at an exact place.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import torch

from kdbench.recipe import load_recipe
from tests.cli_fork import ForkedCLI, store_env

# checkpoints at steps 3 and 6 (and the end, 8), an evaluation at step 4: every fault below strikes
# after the step-3 checkpoint and before the next one is in place
SETS = ["train.iterations=8", "train.checkpoint_interval=3", "train.eval_interval=4", "train.log_interval=1"]
ARGS = ["run", "--recipe", "tiny", "--method", "kd", "--quiet", *(a for s in SETS for a in ("--set", s))]

FAULTS = {  # KDBENCH_FAULT: the exit code, the MLflow status the run is left in
    "step:5": (-9, "RUNNING"),  # SIGKILL: nothing runs after it, not even MLflow's end of run
    "checkpoint:2": (-9, "RUNNING"),  # the step-6 checkpoint written to its temp file, not renamed
    "eval:1": (-9, "RUNNING"),  # the step-4 evaluation, after its first batch
    "step:5:int": (130, "KILLED"),  # Ctrl-C
    "checkpoint:2:enospc": (2, "FAILED"),  # disk full while writing the step-6 checkpoint
}


def _env(d: Path, fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in store_env(d).items() if k != "KDBENCH_FAULT"}
    return {**env, "KDBENCH_FAULT": fault} if fault else env


def _last(d: Path, out: str) -> dict:
    recipe = load_recipe("tiny", [*SETS, f"output_dir={out}"], method="kd")
    return torch.load(d / out / f"kd-{recipe.hash()}" / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """The uninterrupted run, then every fault and its resume (two at a time)."""
    d = tmp_path_factory.mktemp("faults")
    cli = ForkedCLI(d / "cli")
    full = cli.run((*ARGS, "--set", "output_dir=full"), d, _env(d), 600)
    assert full.returncode == 0, full.stderr

    def fault_then_resume(i_fault):
        i, fault = i_fault
        out = ("--set", f"output_dir=f{i}")
        hit = cli.run((*ARGS, *out), d, _env(d, fault), 600)
        after = _last(d, f"f{i}")
        stale = sorted(p.name for p in (d / f"f{i}").rglob("*.tmp"))
        status = mlflow.MlflowClient(f"sqlite:///{d / 'mlflow.db'}").get_run(after["mlflow_run_id"]).info.status
        resumed = cli.run((*ARGS, *out, "--resume"), d, _env(d), 600)
        left = sorted(p.name for p in (d / f"f{i}").rglob("*.tmp"))
        return fault, (hit, after, stale, status, resumed, _last(d, f"f{i}"), left)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(fault_then_resume, enumerate(FAULTS)))
    return _last(d, "full"), results, mlflow.MlflowClient(f"sqlite:///{d / 'mlflow.db'}")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_loses_nothing(outcome, fault, tmp_path):
    full, results, client = outcome
    hit, after, stale, status, resumed, final, left = results[fault]
    code, expected_status = FAULTS[fault]
    assert hit.returncode == code, hit.stderr[-2000:]
    assert after["step"] == 3  # the last complete checkpoint survived the fault
    assert status == expected_status  # SIGKILL leaves the MLflow run RUNNING: nothing could end it
    if code == 2:
        assert hit.stderr.strip().startswith("error: cannot write") and "previous one is intact" in hit.stderr and len(hit.stderr.strip().splitlines()) == 1
    if code == 130:
        assert "continue with --resume" in hit.stderr
    assert bool(stale) == (fault == "checkpoint:2")  # only a killed write leaves its temp file behind...
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not left  # ...and the next write clears it
    assert final["mlflow_run_id"] == after["mlflow_run_id"]  # the same MLflow run continues and ends
    assert client.get_run(final["mlflow_run_id"]).info.status == "FINISHED"
    assert final["step"] == full["step"] == 8
    for part in ("student", "method"):
        assert final[part].keys() == full[part].keys()
        assert all(torch.equal(final[part][k], full[part][k]) for k in full[part]), part
    assert final["history"] == full["history"]  # the evaluations, the one at step 4 included
    log = Path(client.download_artifacts(final["mlflow_run_id"], "run.log", str(tmp_path))).read_text()
    assert "resumed from step 3" in log and log.rstrip().endswith("ended FINISHED")  # the plain-text log spans both
    if code == 2:
        assert "ended FAILED: " in log and "No space left on device" in log
    students = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`kdbench.role` = 'student'")
    finals = {r.info.run_id: r.data.metrics["miou"] for r in students if "miou" in r.data.metrics}
    assert len(set(finals.values())) == 1 and final["mlflow_run_id"] in finals  # every run ends with the same mIoU


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "truncate, no checksum"])
def test_a_damaged_cached_teacher_is_never_used(workdir, damage):
    """A bit flip that still loads is caught by the checksum; a truncated file by the checksum, or
    by the load check for a teacher cached before checksums. `kdbench teacher --retrain` mends it."""
    from kdbench.errors import UserError
    from kdbench.run import run, teacher_cache_path, train_teacher_once

    recipe = load_recipe("tiny", ["train.iterations=2", "train.eval_interval=0"], method="kd")
    train_teacher_once(recipe, quiet=True)
    path = teacher_cache_path(recipe)
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0x01  # inside a weight tensor: torch.load still reads it
        torch.load(io.BytesIO(bytes(data)), weights_only=True)
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    if damage.endswith("no checksum"):
        Path(f"{path}.sha256").unlink()
    with pytest.raises(UserError, match=r"the cached teacher .*teacher\.pt is damaged .*kdbench teacher --retrain"):
        run(recipe, quiet=True)
    assert train_teacher_once(recipe, quiet=True) is None  # without --retrain the cache entry stays as it is
    assert train_teacher_once(recipe, quiet=True, retrain=True) is not None
    assert run(recipe, quiet=True).metrics.miou >= 0


def test_a_dataset_being_generated_is_waited_for(workdir):
    """While another process holds the dataset's lock (it is generating it), a run waits, says so,
    and goes on once the lock is free: never two writers, never half a dataset read."""
    import fcntl
    import time

    from kdbench.data.synthetic import synthetic_folder

    recipe = load_recipe("tiny", method="none")
    folder = synthetic_folder(workdir / "cache", **recipe.data.synthetic.generator_args())
    folder.parent.mkdir(parents=True)
    cli = ForkedCLI(workdir / "cli")
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = ThreadPoolExecutor(1).submit(cli.run, ("run", "--recipe", "tiny", "--method", "none", "--quiet"), workdir, dict(os.environ), 300)
        waited = 0.0
        while "generating this dataset" not in next(iter(sorted((workdir / "cli").glob("*.err"))), Path("/dev/null")).read_text() and waited < 120:
            time.sleep(0.2)
            waited += 0.2
        assert not done.done() and not folder.exists()  # waiting, and nothing written meanwhile
    result = done.result()
    assert result.returncode == 0, result.stderr
    assert "Another process is generating this dataset" in result.stderr and folder.is_dir()
