"""Two processes with torchrun and the gloo backend on the CPU: the same gradients as one process,
one MLflow run and one checkpoint written by rank 0, and a killed run resumed to the same end."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import torch

from kdbench.recipe import load_recipe
from tests.cli_fork import store_env

ROOT = Path(__file__).resolve().parent.parent


def _env(cwd: Path) -> dict[str, str]:
    (cwd / "tmp").mkdir(exist_ok=True)  # torchrun's torchelastic_* folders: gone with tmp_path, not left in /tmp
    return {
        **store_env(cwd),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(cwd / "tmp"),
    }


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def test_one_ddp_step_has_the_gradients_of_one_process_on_the_global_batch(tmp_path):
    from tests.ddp_step import main

    script = str(ROOT / "tests" / "ddp_step.py")
    main(str(tmp_path / "one.pt"))  # one process: this one
    two = subprocess.run(torchrun(script, str(tmp_path / "two.pt")), env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a.keys() == b.keys() and "method.connector.weight" in a
    for key in a:  # float32 sums in another order: agree to about 1e-6 of each gradient's scale
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5 * float(a[key].abs().max()), msg=key)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


RUN = ["-m", "kdbench", "run", "--recipe", "tiny", "--method", "kd", "--set", "train.eval_interval=0"]


def _sets(iterations: int, output_dir: str) -> list[str]:
    return ["--set", f"train.iterations={iterations}", "--set", "train.checkpoint_interval=2", "--set", f"output_dir={output_dir}"]


def test_two_processes_log_once_and_a_killed_run_resumes_to_the_same_end(workdir):
    tmp_path = workdir  # this process reads the same MLflow store as the runs write
    env, total = _env(tmp_path), 12  # two epochs of the tiny recipe (24 images, batch 4): the resumed run crosses one
    full = subprocess.run(torchrun(*RUN, *_sets(total, "full")), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    # rank 0 alone prints, logs to MLflow and writes files
    assert full.stdout.count("kd (cirkd) seed 0: mIoU") == 1, full.stdout
    assert full.stderr.count("No trained teacher for this recipe yet") == 1
    runs = mlflow.search_runs(search_all_experiments=True)
    assert sorted(runs["tags.kdbench.role"]) == ["student", "teacher"]
    assert set(runs["tags.runtime.world_size"]) == {"2"} and set(runs["status"]) == {"FINISHED"}
    assert [p.name for p in (tmp_path / "full").rglob("*.pt")] == ["last.pt"]

    recipe = load_recipe("tiny", ["train.eval_interval=0", f"train.iterations={total}", "train.checkpoint_interval=2", "output_dir=killed"], method="kd")
    ckpt = tmp_path / "killed" / f"kd-{recipe.hash()}" / "last.pt"
    proc = subprocess.Popen(torchrun(*RUN, *_sets(total, "killed")), cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not ckpt.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
    finally:  # both workers (torchrun starts each in its own session), then torchrun, mid-run
        for pid in [*_children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < total
    resumed = subprocess.run(torchrun(*RUN, *_sets(total, "killed"), "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {killed_at}/{total}" in resumed.stderr
    a = torch.load(tmp_path / "full" / f"kd-{load_recipe('tiny', ['train.eval_interval=0', f'train.iterations={total}', 'train.checkpoint_interval=2', 'output_dir=full'], method='kd').hash()}" / "last.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["step"] == b["step"] == total
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    last = lambda out: [line for line in out.splitlines() if "mIoU" in line][-1].split("[")[0]  # noqa: E731  (the final line)
    assert last(full.stdout) == last(resumed.stdout)
