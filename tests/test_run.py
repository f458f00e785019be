"""End-to-end runs of the tiny recipe: MLflow contents, teachers, resume, every method and preset."""

import math
import re

import mlflow
import pytest
import torch

from kdbench.errors import NonFiniteLoss, UserError
from kdbench.methods import registry
from kdbench.recipe import load_recipe
from kdbench.run import run, teacher_cache_path


class Kill(Exception):
    pass


def _runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="pandas")


def test_run_logs_everything_a_table_needs(workdir):
    recipe = load_recipe("tiny", ["data.synthetic.label_noise=0.7"], method="kd", seed=1)
    result = run(recipe, quiet=True)
    assert 0.0 <= result.metrics.miou <= 1.0
    runs = _runs()
    teacher = runs[runs["tags.kdbench.role"] == "teacher"]
    student = runs[runs["tags.kdbench.role"] == "student"].iloc[0]
    assert len(teacher) == 1 and teacher_cache_path(recipe).is_file()
    assert student["status"] == "FINISHED" and student["run_id"] == result.run_id
    for tag, value in {"method": "kd", "preset": "cirkd", "dataset": "synthetic", "seed": "1"}.items():
        assert student[f"tags.{tag}"] == value
    assert student["tags.student"] == "deeplabv3plus/resnet10t"
    # CPU results reproduce digit for digit only on the same kind of CPU: the run names it
    assert student["tags.runtime.cpu"].endswith(f" ({torch.backends.cpu.get_cpu_capability()})")
    assert student["params.method.params.temperature"] == "1.0" and student["params.train.lr"] == "0.01"
    assert math.isclose(student["metrics.miou"], result.metrics.miou)
    for key in ("metrics.loss/task", "metrics.loss/kd", "metrics.lr", "metrics.val/miou", "metrics.iou/background"):
        assert not math.isnan(student[key]), key
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"recipe.yaml", "confusion_matrix.json", "metrics.json", "run.log"} <= artifacts
    log = mlflow.artifacts.load_text(f"runs:/{result.run_id}/run.log").splitlines()
    assert f"run {result.run_id}" in log[0] and log[-1].endswith("ended FINISHED")
    assert any(" step 2: " in line and "loss/kd=" in line for line in log) and any("val/miou=" in line for line in log)
    # the student's run names its teacher's run (where the teacher's weights are logged, once)
    assert student["tags.teacher.run_id"] == teacher.iloc[0]["run_id"]
    # the student learnt from noisy labels, the teacher from the clean ones
    assert student["params.data.synthetic.label_noise"] == "0.7" and teacher.iloc[0]["params.data.synthetic.label_noise"] == "0.0"
    # the second run (clean labels: the same teacher) reuses the cached teacher instead of training another
    run(load_recipe("tiny", method="none"), quiet=True)
    assert (_runs()["tags.kdbench.role"] == "teacher").sum() == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_equals_uninterrupted(workdir, workers):
    # evaluations on both sides of the kill: the resumed run evaluates with a new loader
    sets = ["train.iterations=8", "train.checkpoint_interval=3", "train.eval_interval=2", f"data.workers={workers}"]
    full = run(load_recipe("tiny", sets + ["output_dir=full"]), quiet=True)

    recipe = load_recipe("tiny", sets + ["output_dir=killed"])

    def kill_at_5(step):
        if step == 5:
            raise Kill

    with pytest.raises(Kill):
        run(recipe, quiet=True, after_step=kill_at_5)
    ckpt = torch.load(workdir / "killed" / f"kd-{recipe.hash()}" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3  # the last checkpoint before the kill
    assert mlflow.get_run(ckpt["mlflow_run_id"]).info.status == "FAILED"
    resumed = run(recipe, quiet=True, resume=True)
    assert resumed.run_id == ckpt["mlflow_run_id"]  # the same MLflow run continues
    assert resumed.metrics == full.metrics
    a = torch.load(full.checkpoint, weights_only=True)["student"]
    b = torch.load(resumed.checkpoint, weights_only=True)["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert mlflow.get_run(resumed.run_id).info.status == "FINISHED"


def _same(a, b, where="") -> None:
    """Nested checkpoint entries equal exactly (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        equal = isinstance(b, torch.Tensor) and torch.equal(a, b)
        assert equal, f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


RESUMED = [("skd", "paper", ["method.adv_width=8"]), ("attnfd", "code", [])]


@pytest.mark.parametrize("name, preset, extra", RESUMED, ids=[f"{n}-{p}" for n, p, _ in RESUMED])
def test_resume_restores_the_method_and_its_optimizers(shared_workdir, name, preset, extra):
    """The KD resume test has no method state to lose. SKD paper has a discriminator (narrowed here,
    for speed) with its own SGD (momentum, poly lr) and a random gradient penalty; AttnFD code trains
    its connectors alone for one epoch (the student frozen), then freezes them, and runs the teacher
    in train mode, so the teacher's BatchNorm statistics are state too (``teacher_buffers``).
    24 images / batch 4 = 6 steps per epoch:
    the checkpoint (step 5) is inside the warm-up, the kill (step 7) after a step past it, so both
    the killed and the resumed run cross the boundary."""
    sets = ["train.iterations=8", "train.checkpoint_interval=5", "train.eval_interval=0", *extra]
    full = run(load_recipe("tiny", [*sets, f"output_dir=full-{name}"], method=name, preset=preset), quiet=True)
    recipe = load_recipe("tiny", [*sets, f"output_dir=killed-{name}"], method=name, preset=preset)

    def kill_at_7(step):
        if step == 7:
            raise Kill

    with pytest.raises(Kill):
        run(recipe, quiet=True, after_step=kill_at_7)
    assert torch.load(shared_workdir / f"killed-{name}" / f"{name}-{recipe.hash()}" / "last.pt", weights_only=True)["step"] == 5
    resumed = run(recipe, quiet=True, resume=True)
    assert resumed.metrics == full.metrics
    a, b = (torch.load(r.checkpoint, weights_only=True) for r in (full, resumed))
    assert a["method"] and (a["method_optimizers"] or name == "attnfd")  # there is method state to lose
    assert ("teacher_buffers" in a) == (name == "attnfd")  # the code preset's teacher runs in train mode
    for key in ("method", "method_optimizers", "student", "optimizer", "scheduler", *(["teacher_buffers"] if name == "attnfd" else [])):
        _same(a[key], b[key], key)


def test_teacher_checkpoint_that_does_not_fit(workdir):
    recipe = load_recipe("tiny")
    run(recipe, quiet=True)
    good = teacher_cache_path(recipe)
    wrong_arch = load_recipe("tiny", [f"teacher.checkpoint={good}", "teacher.backbone=resnet18"])
    with pytest.raises(UserError, match="teacher.checkpoint: .* has backbone='resnet10t' but the recipe wants 'resnet18'"):
        run(wrong_arch, quiet=True)
    state = torch.load(good, weights_only=True)["model"]
    torch.save(state, workdir / "raw.pt")  # a bare state_dict from elsewhere, with a different width
    wrong_width = load_recipe("tiny", [f"teacher.checkpoint={workdir / 'raw.pt'}", "teacher.aspp_channels=8"])
    with pytest.raises(UserError, match="does not fit teacher"):
        run(wrong_width, quiet=True)


ALL = [(name, preset) for name, cls in registry().items() for preset in ["default", *cls.presets]]


@pytest.mark.parametrize("name, preset", ALL, ids=[f"{n}-{p}" for n, p in ALL])
def test_every_method_and_preset_runs(shared_workdir, name, preset):
    recipe = load_recipe("tiny", ["train.iterations=2", "train.eval_interval=0"], method=name, preset=preset)
    result = run(recipe, quiet=True)
    assert 0.0 <= result.metrics.miou <= 1.0
    row = mlflow.get_run(result.run_id)
    assert row.info.status == "FINISHED"
    assert row.data.tags["method"] == name and row.data.tags["preset"] == preset
    assert any(k.startswith("loss/") and k != "loss/task" for k in row.data.metrics) or name == "none"


def test_two_first_runs_train_the_teacher_once(workdir):
    """Two processes that need the same uncached teacher: one trains it, the other waits for the
    lock and uses it; one teacher run in MLflow, both runs finish."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from tests.cli_fork import ForkedCLI

    cli = ForkedCLI(workdir / "cli")
    args = ("run", "--recipe", "tiny", "--method", "kd", "--set", "train.eval_interval=0", "--quiet")
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda s: cli.run((*args, "--seed", str(s)), workdir, dict(os.environ), 600), (0, 1)))
    assert all(r.returncode == 0 for r in outs), outs
    runs = _runs()
    assert (runs["tags.kdbench.role"] == "teacher").sum() == 1
    assert (runs["tags.kdbench.role"] == "student").sum() == 2
    assert sum("No trained teacher" in r.stderr for r in outs) == 1


def test_a_non_finite_loss_stops_the_run_before_its_checkpoint(workdir):
    """A learning rate of 1e8 blows the plain student up within a few steps: the run stops naming
    the step and the term, ends FAILED with that message, and its checkpoint is from before it."""
    sets = ["train.lr=1e8", "train.iterations=8", "train.checkpoint_interval=1", "train.eval_interval=0"]
    recipe = load_recipe("tiny", sets, method="none")
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step (\d+) \(loss/task=nan\)") as err:
        run(recipe, quiet=True)
    bad_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
    ckpt = torch.load(workdir / "kdbench-out" / f"none-{recipe.hash()}" / "last.pt", weights_only=True)
    assert 1 < bad_step <= 8 and ckpt["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())
    (failed,) = _runs().to_dict("records")
    assert failed["status"] == "FAILED" and "non-finite loss at step" in failed["tags.error"]

    skipping = run(load_recipe("tiny", [*sets, "train.on_nonfinite=skip", "output_dir=skip"], method="none"), quiet=True)
    skipped = mlflow.get_run(skipping.run_id).data.metrics["train/skipped_steps"]
    assert skipped == 8 - (bad_step - 1)  # every step from the first bad one on: the weights stay as they were
    weights = torch.load(skipping.checkpoint, weights_only=True)["student"]
    assert all(torch.isfinite(v).all() for v in weights.values()) and all(torch.equal(weights[k], ckpt["student"][k]) for k in weights)


def test_select_best_reports_the_best_evaluation_and_its_weights(workdir):
    sets = ["train.iterations=16", "train.eval_interval=1", "train.optimizer=adamw", "train.lr=0.003"]
    last = run(load_recipe("tiny", sets, method="none"), quiet=True)
    best = run(load_recipe("tiny", [*sets, "train.select=best"], method="none"), quiet=True)
    client = mlflow.MlflowClient()
    history = {m.step: m.value for m in client.get_metric_history(best.run_id, "val/miou")}
    top_step = max(history, key=history.get)
    # this setting peaks before its end (seeded, bit-exact on the CPU), so the choice is exercised
    assert history[top_step] > last.metrics.miou, "the scenario no longer peaks early: pick another lr"
    assert math.isclose(best.metrics.miou, history[top_step]) and not math.isclose(best.metrics.miou, last.metrics.miou)
    run_data = client.get_run(best.run_id).data
    assert run_data.metrics["selected_step"] == top_step and "selected_step" not in client.get_run(last.run_id).data.metrics
    chosen = run_data.tags["kdbench.checkpoint"]
    assert chosen.endswith("best.pt") and torch.load(chosen, weights_only=True)["step"] == top_step


def _weights(recipe_overrides):
    from kdbench.run import initial_student

    student = initial_student(load_recipe("tiny", overrides=recipe_overrides), num_classes=4)
    after = torch.rand(3)  # what dropout and the method's modules draw next
    return torch.cat([p.detach().flatten() for p in student.state_dict().values() if p.is_floating_point()]), after


def test_init_seed_fixes_the_students_first_weights_and_the_seed_the_rest():
    a, after_a = _weights(["seed=1", "student.init_seed=7"])
    b, after_b = _weights(["seed=2", "student.init_seed=7"])
    assert torch.equal(a, b)  # one start for every seed, as from one pretrained backbone
    assert not torch.equal(after_a, after_b)
    assert torch.equal(after_a, torch.manual_seed(1) and torch.rand(3))  # the run's own stream
    c, _ = _weights(["seed=1", "student.init_seed=8"])
    assert not torch.equal(a, c)
    # without it, the seed decides the weights too, as before init_seed existed
    d, after_d = _weights(["seed=1"])
    e, _ = _weights(["seed=2"])
    assert not torch.equal(d, e)
    assert torch.equal(d, _weights(["seed=7", "student.init_seed=1"])[0])
    assert not torch.equal(after_d, after_a)  # a fixed init is followed by a fresh draw from the seed


def test_a_run_stopped_by_an_exception_lets_its_loader_workers_go(workdir):
    """A stop that raises (a non-finite loss here, after an evaluation; a pruned trial, a failed
    sweep cell) leaves the run's frames in the traceback the caller keeps (Optuna keeps a pruned
    trial's). The persistent workers of the training and the evaluation loaders must not live on
    there: a process forked later (the next trial's loader worker) inherits them, and its garbage
    collection printed "Exception ignored ... can only test a child process" during `kdbench tune`."""
    import multiprocessing

    sets = ["train.lr=1e8", "train.iterations=8", "train.eval_interval=1", "train.checkpoint_interval=0", "data.workers=1"]
    with pytest.raises(NonFiniteLoss) as err:
        run(load_recipe("tiny", sets, method="none"), quiet=True)
    assert err.traceback  # held while we look
    assert multiprocessing.active_children() == []
