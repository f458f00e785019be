"""The command line: a real run of the tiny recipe, and bad input as one line with exit code 2."""

import json
import os
import re
import subprocess
import sys

import pytest

from kdbench.recipe import load_recipe
from tests.cli_fork import store_env


def kdbench(*args, cwd, env=None):
    """`python -m kdbench.cli ARGS` as a user types it (the tests below that need no fresh
    interpreter use the warm, forked `cli` fixture instead: the same entry point, seconds faster)."""
    return subprocess.run([sys.executable, "-m", "kdbench.cli", *args], cwd=cwd, env=env or store_env(cwd), capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli(forked):
    return lambda *args, cwd: forked.run(args, cwd, store_env(cwd), 300)


def test_a_run_writes_nothing_outside_its_output_root(tmp_path):
    """No MLFLOW_TRACKING_URI: the MLflow store, its artifacts and the run folder all go to
    ./kdbench-out of the folder the run started in; the teacher to the machine's cache."""
    here, cache = tmp_path / "elsewhere", tmp_path / "cache"
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"KDBENCH_CACHE": str(cache)}
    r = kdbench("run", "--recipe", "tiny", "--method", "kd", "--set", "method.temperature=2", "--seed", "3", "--quiet", cwd=here, env=env)
    assert r.returncode == 0, r.stderr
    assert "kd (cirkd) seed 3: mIoU" in r.stdout
    assert [p.name for p in here.iterdir()] == ["kdbench-out"]
    root = here / "kdbench-out"
    assert {p.name for p in root.iterdir()} == {"mlflow.db", ".mlflow.db.lock", "mlartifacts", f"kd-{load_recipe('tiny', ['method.temperature=2'], method='kd', seed=3).hash()}"}
    assert list((root / "mlartifacts").rglob("recipe.yaml")) and list(cache.rglob("teacher.pt"))


def test_a_piped_run_logs_plain_lines_evaluations_and_a_summary(cli, tmp_path):
    """Output to a file or pipe (nohup, a cluster job): timestamped step lines, one line per
    evaluation, the end-of-run summary; no frames of a progress bar."""
    import re

    sets = ["--set", "train.iterations=8", "--set", "train.log_interval=4", "--set", "train.eval_interval=4"]
    r = cli("run", "--recipe", "tiny", "--method", "kd", *sets, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    steps = [ln for ln in lines if re.match(r"^\d\d:\d\d:\d\d student kd-cirkd-seed0 step [48]/8 loss \d+\.\d{4} lr \S+ \d+ img/s, \d+ s left$", ln)]
    assert len(steps) == 2, r.stdout
    assert any(re.match(r"^student kd-cirkd-seed0 step 4/8: val mIoU \d+\.\d\d \(best \d+\.\d\d\)$", ln) for ln in lines), r.stdout
    assert any(ln.startswith("kd-cirkd-seed0: mIoU ") and "pixel acc" in ln for ln in lines)
    weights = [ln.split(": ", 1)[1] for ln in lines if ln.startswith("weights: /")]
    assert len(weights) == 2 and all(os.path.isfile(w) for w in weights)  # the teacher's and the student's
    assert any("mlflow ui --backend-store-uri sqlite:///" in ln for ln in lines)
    assert not re.search(r"━+ *\d+/\d+", r.stdout) and "\r" not in r.stdout  # no frames of a bar


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--recipe", "tiny", "--set", "train.lr=fast"], "error: train.lr: expected float, got 'fast'"),
        (["run", "--recipe", "tiny", "--method", "magic"], "error: method: unknown method 'magic'"),
        (["run", "--recipe", "nosuch"], "error: --recipe: no recipe named 'nosuch'"),
        (["teacher", "--recipe", "tiny", "--set", "teacher.checkpoint=/no/t.pt"], "error: teacher.checkpoint: no checkpoint file"),
        (["run", "--recipe", "tiny", "--resume"], "error: --resume: no checkpoint of this recipe at "),
        (["run", "--recipe", "empty.yaml"], "error: empty.yaml: the recipe file is empty"),
        # usage errors, raised by typer's own copy of click
        (["run", "--seed", "abc"], "error: Invalid value for '--seed'"),
        (["run", "--methd", "kd"], "error: No such option: --methd (Possible options: --method"),
        (["runn"], "error: No such command 'runn'. Did you mean 'run'?"),
        (["run", "--method"], "error: Option '--method' requires an argument"),
        (["bench", "--steps", "1.5"], "error: Invalid value for '--steps'"),
        (["bench", "--eval-size", "513"], "error: --eval-size: expected H,W in pixels such as 513,684, got '513'"),
        (["sweep", "-m", "kd", "--seeds", "1-"], "error: --seeds: expected seeds like 0,1,2 or 0-4"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, message):
    (tmp_path / "empty.yaml").write_text("")
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_version_and_methods(cli, tmp_path):
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "run" in r.stdout and "methods" in r.stdout and "--method attnfd" in r.stdout
    r = cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "kdbench 0.1.0"
    r = cli("methods", cwd=tmp_path)
    assert r.returncode == 0
    for name, presets in {"kd": "default, cirkd*", "cwd": "default, paper*, pure, cirkd, mmrazor", "attnfd": "default*, paper, code"}.items():
        assert re.search(rf"│ {name} +│.*│ {re.escape(presets)} +│", r.stdout), name
    # one method in full: every option uncut, what each preset sets (* = the one a run uses)
    r = cli("methods", "ifvd", cwd=tmp_path)
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]] for ln in r.stdout.splitlines() if ln.startswith("│")}
    header = next(ln for ln in r.stdout.splitlines() if ln.startswith("┃"))
    assert [c.strip() for c in header.split("┃")[1:-1]][:6] == ["option (--set method.OPTION=...)", "type", "default", "cirkd*", "paper", "pure"]
    assert rows["dilute_ignore"][:5] == ["bool", "True", "True", "True", "False"]  # pure divides by labelled pixels
    assert rows["adv_weight_decay"][2:5] == ["·", "·", "·"]  # no preset sets it
    assert rows["adv_weight"][1] == "0.001" and rows["adv_weight"][4] == "0.0"  # pure: no discriminator
    assert "recipe 'default' sets: adv_width=32" in r.stdout  # the default benchmark's methods: section
    assert "recipe 'tiny' sets" not in cli("methods", "ifvd", "--recipe", "tiny", cwd=tmp_path).stdout
    r = cli("methods", "kd", cwd=tmp_path)  # the preset a kd run uses, with its values
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]] for ln in r.stdout.splitlines() if ln.startswith("│")}
    assert "cirkd*" in next(ln for ln in r.stdout.splitlines() if ln.startswith("┃"))
    assert rows["temperature"][:3] == ["float", "1.0", "1.0"] and rows["on"][2] == "·"
    r = cli("methods", "magic", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: method: unknown method 'magic'")


def test_commands_that_read_runs_start_without_what_only_training_needs(tmp_path):
    """Start-up is most of a short command: the MLflow side, recipes, tuning and sweeps import
    without torch (about 4 s here); the table, the method registry and `kdbench methods` without
    timm, torchvision and torch._dynamo (2-3 s more; only the recipe's backbone check needs timm). And no module imports MLflow or Optuna before it uses them:
    torchrun's ranks above 0 never log (MLflow's import alone is about 3 s of each process)."""
    code = (
        "import sys\n"
        "import kdbench.tracking, kdbench.schema, kdbench.recipe, kdbench.tune, kdbench.sweep\n"
        "print(*sorted(m for m in ('torch', 'pandas') if m in sys.modules))\n"
        "import kdbench.table\n"
        "from kdbench.methods import registry\n"
        "assert len(registry()) >= 6\n"
        "import contextlib, io\n"
        "from kdbench.cli import app\n"
        "with contextlib.redirect_stdout(io.StringIO()) as listing:\n"
        "    app(['methods'], standalone_mode=False)\n"
        "assert 'attnfd' in listing.getvalue()\n"
        "print(*sorted(m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules))\n"
        "import kdbench.run, kdbench.cli, kdbench.evaluate, kdbench.plots\n"
        "print(*sorted(m for m in ('mlflow', 'optuna') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["pandas", "", ""]  # pandas: sweep tabulates the runs it found


def test_bench_runs_without_mlflow_or_optuna_and_writes_json(tmp_path):
    """A GPU machine may lack MLflow and Optuna: bench must not import them. Its typer may be older
    (0.27 on the lent H100s, without the hook the CLI uses to hide flags' types)."""
    code = (
        "import sys; sys.modules['mlflow'] = None; sys.modules['optuna'] = None; "
        "import typer.core as t; [delattr(k, 'display_type_rich') for k in t.TyperOption.__mro__ if 'display_type_rich' in vars(k)]; "
        "sys.argv = ['kdbench'] + sys.argv[1:]; from kdbench.cli import main; main()"
    )
    args = ["bench", "--recipe", "tiny", "--steps", "1", "--rounds", "3", "--warmup", "1", "-m", "none", "-m", "kd", "-m", "attnfd", "-m", "skd:pure"]
    args += ["--set", "student.pretrained=absent.pth", "--json", "b.json", "--quiet"]  # random init: no weights file needed
    args += ["--eval-images", "8", "--eval-size", "24,40"]
    env = {**os.environ, "KDBENCH_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for row in ("floor", "none", "kd", "attnfd", "paper", "x floor"):  # AttnFD's paper preset: a CBAM teacher
        assert row in r.stdout
    assert "images/s with 0 workers" in r.stdout  # the loader line
    assert "attnfd code runs the teacher in train mode: " in r.stdout  # and so has a floor that does too
    assert "ms per image evaluated: the student, 24x40 images" in r.stdout
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["setting"]["device"] == "cpu" and data["setting"]["batch_size"] == 4
    assert f"ms per training step on cpu: {data['setting']['cpu']}, fp32" in r.stdout  # which CPU: timings depend on it
    from kdbench.models import build_model
    from kdbench.models.complexity import multiply_adds

    tiny = load_recipe("tiny")
    macs = {role: multiply_adds(build_model(getattr(tiny, role), 9, pretrained=False), tiny.train.crop_size) for role in ("teacher", "student")}
    assert data["setting"]["multiply_adds"] == macs and macs["teacher"] > 0 and macs["student"] > 0
    step, ms = 4 * (macs["teacher"] + 3 * macs["student"]), data["rows"][0]["ms_per_step"]["median"]
    assert f"the floor's step (a backward counted as two forwards) {step / 1e9:.1f} G, {2 * step / ms / 1e9:.3g} TFLOP/s" in r.stdout
    floor, *rows = data["rows"]
    assert floor["method"] == "floor" and floor["x_floor"]["rounds"] == [1.0, 1.0, 1.0]
    presets = [(row["method"], row["presets"], row["runs_by_default"]) for row in rows]
    assert ("kd", ["default", "cirkd"], True) in presets and ("skd", ["pure"], False) in presets  # one row per distinct options
    assert [m for m, *_ in presets].count("skd") == 1 and [m for m, *_ in presets].count("attnfd") == 3
    for row in rows:  # one ratio per round, each against that round's floor
        assert len(row["ms_per_step"]["rounds"]) == len(row["x_floor"]["rounds"]) == 3
        want = [ms / f for ms, f in zip(row["ms_per_step"]["rounds"], floor["ms_per_step"]["rounds"])]
        assert row["x_floor"]["rounds"] == want
        assert row["overlaps_floor"] == (min(want) <= 1.0 <= max(want) or (row["method"] != "none" and max(want) < 1.0))
    # the student's evaluation at batch 1 and at the tiny recipe's eval.batch_size, once per round
    assert data["setting"]["eval"] == {"images": 8, "size": [24, 40], "scales": [1.0], "flip": False, "cudnn_benchmark": False}
    assert [(e["batch_size"], len(e["ms_per_image"]["rounds"])) for e in data["evaluation"]] == [(1, 3), (6, 3)]


def test_cuda_asked_for_without_a_gpu_is_one_line_exit_2(cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = cli("run", "--recipe", "tiny", "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: runtime.device: 'cuda' asked for, but torch") and len(r.stderr.strip().splitlines()) == 1, r.stderr
