"""`kdbench eval`: a real run of the tiny recipe evaluated again from its checkpoint, its run id and
its cached teacher, checked against what the run logged and against evaluations made here with the
engine on a model rebuilt independently of kdbench.evaluate."""

import sys

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from kdbench.data import load_splits
from kdbench.data.synthetic import voc_palette
from kdbench.data.transforms import normalize
from kdbench.engine import evaluate, predict
from kdbench.evaluate import evaluate_checkpoint
from kdbench.models import build_model
from kdbench.recipe import EvalConfig, load_recipe
from kdbench.run import run, teacher_cache_path
from kdbench.schema import Artifact, Metric, Role, Tag

# a small learning rate keeps the student near its random init: it predicts many classes, so that
# flipped and rescaled images change its mIoU (after 4 steps at the recipe's lr it says "background")
SETS = ["train.iterations=4", "train.eval_interval=0", "train.lr=1e-5"]


@pytest.fixture(scope="module")
def trained(shared_workdir):
    """(RunResult, Recipe) of a kd run; its teacher is trained and cached (with its own run) on the way."""
    recipe = load_recipe("tiny", SETS)
    return run(recipe, quiet=True), recipe


def kdbench(capsys, monkeypatch, *args):
    """The `kdbench` script in this process: (exit code, stdout, stderr)."""
    from kdbench.cli import main

    monkeypatch.setattr(sys, "argv", ["kdbench", *args])
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def logged(run_id):
    return mlflow.MlflowClient().get_run(run_id).data.metrics


def student(result, recipe):
    model = build_model(recipe.student, 9)
    model.load_state_dict(torch.load(result.checkpoint, weights_only=True)["student"])
    return model.eval()


def evaluated_here(model, recipe, scales=(1.0,), flip=False):
    """The engine's evaluation of ``model`` on val at ``scales``/``flip``, made here."""
    splits = load_splits(recipe, progress=False)
    return evaluate(model, splits.val, 9, EvalConfig(flip=flip, scales=scales, batch_size=recipe.eval.batch_size), normalize=splits.normalize)[0]


def test_checkpoint_repeats_the_runs_evaluation_and_flip_is_logged_apart(trained, capsys, monkeypatch):
    result, recipe = trained
    code, out, err = kdbench(capsys, monkeypatch, "eval", str(result.checkpoint), "--quiet")
    assert code == 0, err
    metrics = logged(result.run_id)
    assert metrics[Metric.evaluation("s1", Metric.MIOU)] == pytest.approx(metrics[Metric.MIOU], abs=1e-9)
    assert metrics[Metric.evaluation("s1", Metric.MIOU)] == pytest.approx(result.metrics.miou, abs=1e-9)
    assert metrics[Metric.evaluation("s1", Metric.PIXEL_ACC)] == pytest.approx(metrics[Metric.PIXEL_ACC], abs=1e-9)
    for name in result.class_names:
        if Metric.iou(name) in metrics:
            assert metrics[Metric.evaluation("s1", Metric.iou(name))] == pytest.approx(metrics[Metric.iou(name)], abs=1e-9)
    lines = out.splitlines()
    assert lines[0].startswith("student deeplabv3plus/resnet10t on synthetic val (6 images; scales 1): ")
    assert f"mIoU {100 * result.metrics.miou:.2f}, pixel acc {100 * result.metrics.pixel_acc:.2f}" in lines[0]
    assert all(name in out for name in result.class_names)
    assert f"logged to MLflow run {result.run_id} as eval/s1/*" in out

    code, out, err = kdbench(capsys, monkeypatch, "eval", str(result.checkpoint.parent), "--flip", "-q")  # the run folder
    assert code == 0, err
    metrics = logged(result.run_id)
    flipped = evaluated_here(student(result, recipe), recipe, flip=True)
    assert metrics[Metric.evaluation("s1_flip", Metric.MIOU)] == pytest.approx(flipped.miou, abs=1e-12)
    assert abs(flipped.miou - result.metrics.miou) > 1e-4  # flipping changes it ...
    assert [m.value for m in mlflow.MlflowClient().get_metric_history(result.run_id, Metric.MIOU)] == [result.metrics.miou]  # ... not the run's own
    record = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/{Artifact.EVALUATIONS}/s1_flip.json")
    assert record["flip"] is True and record["scales"] == [1.0] and record["checkpoint"] == str(result.checkpoint.resolve())
    assert sum(map(sum, record["rows_true_cols_pred"])) == 6 * 32 * 32
    # and a table can be made of it: `kdbench table --metric eval/s1_flip/miou`
    code, out, err = kdbench(capsys, monkeypatch, "table", "--metric", "eval/s1_flip/miou", "--extra")
    assert code == 0, err
    assert f"{100 * flipped.miou:.2f}" in out and f"{100 * flipped.pixel_acc:.2f}" in out


def test_run_id_at_several_scales(trained, capsys, monkeypatch):
    result, recipe = trained
    code, out, err = kdbench(capsys, monkeypatch, "eval", result.run_id, "--scales", "1.25,0.75", "-q")
    assert code == 0, err
    assert "(6 images; scales 0.75, 1.25): " in out
    rescaled = evaluated_here(student(result, recipe), recipe, scales=(0.75, 1.25))
    assert logged(result.run_id)[Metric.evaluation("s0.75_1.25", Metric.MIOU)] == pytest.approx(rescaled.miou, abs=1e-12)
    assert abs(rescaled.miou - result.metrics.miou) > 1e-4


def test_predictions_are_palette_pngs(trained, tmp_path):
    result, recipe = trained
    folder = tmp_path / "predictions"
    evaluate_checkpoint(str(result.checkpoint), save_predictions=folder, quiet=True)
    val = load_splits(recipe, progress=False).val
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in val.ids] and len(val.ids) == 6
    model = student(result, recipe)
    for index, image_id in enumerate(val.ids):
        image, label = val[index]
        with Image.open(folder / f"{image_id}.png") as png:
            assert png.mode == "P" and png.size == (label.shape[1], label.shape[0])
            assert png.getpalette()[: 3 * 9] == voc_palette()[: 3 * 9]  # the dataset's colours
            with torch.no_grad():
                expected = predict(model, normalize(image[None], recipe.data.normalize)).argmax(1)[0].numpy()
            np.testing.assert_array_equal(np.array(png), expected)


def test_cached_teacher_goes_to_its_run(trained):
    _, recipe = trained
    path = teacher_cache_path(recipe)
    teacher_run = torch.load(path, weights_only=True)["meta"]["mlflow_run_id"]
    result = evaluate_checkpoint(str(path), quiet=True)
    assert result.run_id == teacher_run and not result.new_run and result.model == "teacher deeplabv3plus/resnet10t"
    metrics = logged(teacher_run)
    assert metrics[Metric.evaluation("s1", Metric.MIOU)] == pytest.approx(metrics[Metric.MIOU], abs=1e-9)


def test_weights_of_no_run_get_a_new_run(trained, tmp_path):
    result, recipe = trained
    weights = tmp_path / "model.pt"
    torch.save(torch.load(result.checkpoint, weights_only=True)["student"], weights)
    first = evaluate_checkpoint(str(weights), recipe="tiny", overrides=SETS, quiet=True)
    assert first.new_run and first.run_id != result.run_id
    new = mlflow.MlflowClient().get_run(first.run_id)
    assert new.info.status == "FINISHED"
    assert new.data.tags[Tag.ROLE] == Role.EVAL and new.data.tags[Tag.EVALUATED] == Role.STUDENT
    assert new.data.metrics[Metric.evaluation("s1", Metric.MIOU)] == pytest.approx(result.metrics.miou, abs=1e-9)
    again = evaluate_checkpoint(first.run_id, flip=True, quiet=True)  # by its id: its recipe.yaml and checkpoint tag
    assert again.run_id == first.run_id and not again.new_run
    assert Metric.evaluation("s1_flip", Metric.MIOU) in logged(first.run_id)


def test_bad_input_is_one_line(trained, tmp_path, capsys, monkeypatch):
    result, _ = trained
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    ckpt = str(result.checkpoint)
    errors = {
        ("nosuch.pt",): "error: eval: no file nosuch.pt and no MLflow run 'nosuch.pt' in sqlite:///",
        ("0123456789abcdef0123456789abcdef",): "error: eval: no file 0123456789abcdef0123456789abcdef and no MLflow run",
        (str(junk),): f"error: eval: cannot read {junk}",
        (ckpt, "--scales", "0.5,x"): "error: --scales: expected comma-separated positive numbers such as 0.5,0.75,1,1.25,1.5,1.75, got '0.5,x'",
        (ckpt, "--scales", "1,0"): "error: --scales: expected comma-separated positive numbers",
        (ckpt, "--scales", "1,0.5,1"): "error: --scales: 1 is listed twice in '1,0.5,1'; name each scale once",
        (ckpt, "--recipe", "default"): f"error: eval: {result.checkpoint.resolve()} (student) does not fit deeplabv3plus/mobilenetv2_050 with 9 classes",
    }
    before = logged(result.run_id)
    for args, message in errors.items():
        code, _, err = kdbench(capsys, monkeypatch, "eval", *args)
        assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, (args, err)
    assert err.strip().endswith("pass the --recipe and --set options it was trained with")
    assert logged(result.run_id) == before  # a refused evaluation logs nothing


def test_a_checkpoint_finds_its_run_in_the_store_beside_it(trained, tmp_path, monkeypatch):
    """A run made with `--set output_dir=ROOT` keeps its store in ROOT: `kdbench eval ROOT/.../last.pt`,
    from another folder and with no store named, logs to that run there (and makes no other store)."""
    import os
    import shutil

    from kdbench.errors import UserError
    from kdbench.outputs import sqlite_file

    result, _ = trained
    store = os.environ["MLFLOW_TRACKING_URI"]
    root = tmp_path / "exp1"
    ckpt = root / result.checkpoint.parent.name / "last.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(result.checkpoint, ckpt)
    shutil.copy(sqlite_file(store), root / "mlflow.db")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    try:
        out = evaluate_checkpoint(str(ckpt), flip=True, quiet=True)
        assert out.run_id == result.run_id and not out.new_run
        beside = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(result.run_id).data.metrics
        assert beside[Metric.evaluation("s1_flip", Metric.MIOU)] == pytest.approx(out.metrics.miou)
        assert list(elsewhere.iterdir()) == []  # no empty store where the command ran
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'named.db'}")  # a store named: only it
        with pytest.raises(UserError, match=f"which is not in the store sqlite:///{tmp_path / 'named.db'}"):
            evaluate_checkpoint(str(ckpt), quiet=True)
    finally:
        mlflow.set_tracking_uri(store)
