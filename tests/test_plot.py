"""`kdbench plot`: figures from real runs of the tiny recipe (none, kd, attnfd), checked against what
the runs logged and against their models rebuilt independently of kdbench.plots."""

import math
import os
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kdbench import plots
from kdbench.data import load_splits
from kdbench.data.synthetic import CLASS_NAMES
from kdbench.data.transforms import normalize
from kdbench.engine import predict
from kdbench.errors import UserError
from kdbench.methods import method_for, resolve_config
from kdbench.models import build_model
from kdbench.recipe import load_recipe
from kdbench.run import load_teacher, run, teacher_cache_path
from kdbench.schema import Artifact, Metric, Tag, tag_col

SETS = ["train.iterations=6", "train.eval_interval=2"]  # evaluations at steps 2 and 4, the final one at 6
EXPERIMENT = "kdbench-tiny"


@pytest.fixture(scope="module")
def runs(shared_workdir):
    """method -> (RunResult, Recipe) of three real runs sharing one cached teacher."""
    out = {}
    for method in ("none", "kd", "attnfd"):
        recipe = load_recipe("tiny", SETS, method=method, seed=0)
        out[method] = (run(recipe, quiet=True), recipe)
    return out


@pytest.fixture
def frame(runs):
    return plots.find_runs(EXPERIMENT)


def _png_size(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def _figures(run_id):
    return {os.path.basename(a.path) for a in mlflow.MlflowClient().list_artifacts(run_id, Artifact.FIGURES)}


def _pixels(fig):
    w, h = fig.get_size_inches()
    return round(w * plots.DPI), round(h * plots.DPI)


def test_runs_are_found_and_labelled(runs, frame):
    assert set(frame["run_id"]) == {r.run_id for r, _ in runs.values()}
    for result, recipe in runs.values():  # the tag the qualitative figures load the model from
        tagged = frame.set_index("run_id").loc[result.run_id, tag_col(Tag.CHECKPOINT)]
        assert tagged == str(result.checkpoint.resolve())
    assert list(plots.run_labels(plots.ordered(frame))) == ["none (default)", "attnfd (default)", "kd (cirkd)"]  # the table's names
    assert list(plots.find_runs(run_ids=[runs["kd"][0].run_id, runs["none"][0].run_id])["run_id"]) == [runs["kd"][0].run_id, runs["none"][0].run_id]


def test_per_class_bars_are_the_logged_ious(runs, frame, tmp_path):
    table = plots.per_class_iou(frame)
    classes = list(table.columns)
    assert classes == [c for c in CLASS_NAMES if c in classes] and len(classes) >= 2  # the dataset's order
    assert list(table.index) == ["none (default)", "attnfd (default)", "kd (cirkd)"]
    fig = plots.per_class_figure(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == classes
    client = mlflow.MlflowClient()
    for container, method in zip(ax.containers, ("none", "attnfd", "kd")):
        logged = client.get_run(runs[method][0].run_id).data.metrics
        heights = [bar.get_height() for bar in container]
        np.testing.assert_allclose(heights, [100 * logged[Metric.iou(c)] for c in classes])
        assert container.get_label().startswith(table.index[list(ax.containers).index(container)])
    # the bars of a class sit side by side, centred on its tick
    lefts = [[bar.get_x() + bar.get_width() / 2 for bar in c] for c in ax.containers]
    np.testing.assert_allclose(np.mean(lefts, axis=0), np.arange(len(classes)), atol=1e-9)

    path = plots.plot_per_class(frame, tmp_path)
    assert path.name.startswith("per-class_synthetic_none-default+attnfd-default+kd-cirkd_")
    assert _png_size(path) == _pixels(fig) and _pixels(fig)[1] == 540  # 4.5 in at 120 dpi
    for result, _ in runs.values():
        assert path.name in _figures(result.run_id)


def test_per_class_mean_over_seeds():
    iou = [Metric.iou(c) for c in ("background", "disc")]
    frame = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            tag_col(Tag.METHOD): ["kd", "kd", "none"],
            tag_col(Tag.PRESET): ["cirkd", "cirkd", "default"],
            tag_col(Tag.SEED): ["0", "1", "0"],
            tag_col(Tag.DATASET): ["synthetic"] * 3,
            f"metrics.{iou[1]}": [0.2, 0.4, 0.1],
            f"metrics.{iou[0]}": [0.8, 0.6, float("nan")],
        }
    )
    table = plots.per_class_iou(frame)
    assert list(table.columns) == ["background", "disc"] and list(table.index) == ["none", "kd/cirkd"]
    assert table.loc["kd/cirkd"].tolist() == pytest.approx([0.7, 0.3])
    assert math.isnan(table.loc["none", "background"]) and table.attrs["n"] == {"kd/cirkd": 2, "none": 1}
    assert "(mean of 2 runs)" in plots.per_class_figure(table).axes[0].containers[1].get_label()


def test_curves_one_line_per_run_per_quantity(runs, frame, tmp_path):
    quantities = plots.curve_quantities(frame)
    assert quantities == [Metric.VAL_MIOU, Metric.LOSS_TOTAL, "loss/task", "loss/attnfd", "loss/kd"]
    history = plots.metric_histories(plots.ordered(frame), quantities)
    fig = plots.curves_figure(history, quantities)
    axes = {ax.get_title(): ax for ax in fig.axes}
    expected = {"val mIoU (%)": 3, "total loss": 3, "loss/task": 3, "loss/attnfd": 1, "loss/kd": 1}
    assert {t: len(ax.lines) for t, ax in axes.items()} == expected
    client = mlflow.MlflowClient()
    kd = runs["kd"][0]
    line = next(x for x in axes["val mIoU (%)"].lines if x.get_label() == "kd (cirkd) seed 0")
    assert list(line.get_xdata()) == [2, 4, 6]  # two evaluations during training, then the final one
    values = [m.value for m in client.get_metric_history(kd.run_id, Metric.VAL_MIOU)] + [kd.metrics.miou]
    np.testing.assert_allclose(line.get_ydata(), 100 * np.array(values))
    (kd_line,) = axes["loss/kd"].lines
    logged = sorted((m.step, m.value) for m in client.get_metric_history(kd.run_id, "loss/kd"))
    assert list(zip(kd_line.get_xdata(), kd_line.get_ydata())) == logged

    path = plots.plot_curves(frame, tmp_path)
    assert _png_size(path) == _pixels(fig) and _pixels(fig)[0] == 3 * 4 * plots.DPI
    for result, _ in runs.values():
        assert path.name in _figures(result.run_id)


def _independent_prediction(result, recipe, image):
    splits = load_splits(recipe, progress=False)
    model = build_model(recipe.student, splits.num_classes)
    model.load_state_dict(torch.load(result.checkpoint, weights_only=True)["student"])
    return predict(model.eval(), normalize(image[None], splits.normalize)).argmax(1)[0]


def test_predictions_grid(runs, frame, tmp_path):
    grid = plots.prediction_grid(frame, images=[4, 1])
    assert grid.columns == ["image", "ground truth", "none (default)", "attnfd (default)", "kd (cirkd)", "teacher"]
    assert grid.rows == ["val #4", "val #1"] and [len(r) for r in grid.cells] == [6, 6]
    val = load_splits(runs["none"][1], progress=False).val
    image, label = val[4]
    np.testing.assert_array_equal(grid.cells[0][1], plots.colorize(label))
    for col, method in ((2, "none"), (4, "kd")):
        expected = plots.colorize(_independent_prediction(*runs[method], image))
        np.testing.assert_array_equal(grid.cells[0][col], expected)
    assert grid.cells[0][0].shape == (*label.shape, 3) and grid.cells[0][0].dtype == np.uint8
    # fixed colors: one per class, the same in every column; the ignore label is black
    palette = plots.class_palette()
    assert len({tuple(c) for c in palette[: len(CLASS_NAMES)]}) == len(CLASS_NAMES) and palette[255].tolist() == [0, 0, 0]
    assert plots.colorize(torch.tensor([[255, 1]])).tolist() == [[[0, 0, 0], palette[1].tolist()]]

    fig = plots.predictions_figure(grid)
    assert len(fig.axes) == 2 * 6
    assert [ax.get_title() for ax in fig.axes[:6]] == grid.columns
    assert [fig.axes[6 * r].get_ylabel() for r in range(2)] == grid.rows

    path = plots.plot_predictions(frame, [4, 1], tmp_path)
    w, h = _png_size(path)
    assert (w, h) == _pixels(fig) and w == 6 * 2 * plots.DPI  # six 2-inch columns of square images
    for result, _ in runs.values():
        assert path.name in _figures(result.run_id)


def test_attention_maps_of_the_trained_cbam(runs, frame, tmp_path):
    result, recipe = runs["attnfd"]
    row = frame[frame["run_id"] == result.run_id].iloc[0]
    maps = plots.attention_maps(row, [2])
    assert maps.layer == "backbone" and maps.teacher_attention == "free"  # the default: the first distilled layer

    # the same maps, rebuilt here from the checkpoint and the cached teacher
    splits = load_splits(recipe, progress=False)
    image = normalize(splits.val[2][0][None], splits.normalize)
    ckpt = torch.load(result.checkpoint, weights_only=True)
    student = build_model(recipe.student, splits.num_classes)
    student.load_state_dict(ckpt["student"])
    teacher, _ = load_teacher(recipe, teacher_cache_path(recipe), splits.num_classes)
    _, cfg = resolve_config("attnfd", recipe.method.preset, recipe.method.params)
    method = method_for("attnfd", cfg, student, teacher, splits.num_classes)
    method.load_state_dict(ckpt["method"])
    with torch.no_grad():
        fs, ft = student.eval()(image)["backbone"], teacher(image)["backbone"]
        expected = {
            "teacher": ft,
            "teacher refined": method.refine_teacher("backbone", ft),
            "student": fs,
            "student refined": method.eval().student_cbam["backbone"](fs),
        }
    for name, f in expected.items():
        np.testing.assert_allclose(maps.maps[0][name], plots.feature_map(f, image.shape[-2:]), atol=1e-5, err_msg=name)
    assert not np.allclose(maps.maps[0]["student"], maps.maps[0]["student refined"])  # the CBAM did something

    path = plots.plot_attention(row, [0, 1], "encoder", tmp_path)
    assert "_encoder_img0-1_" in path.name
    assert _png_size(path) == (5 * 2 * plots.DPI, round((2 * 2 + 0.5) * plots.DPI))  # image + 4 maps, 2 rows; the title
    assert path.name in _figures(result.run_id) and path.name not in _figures(runs["kd"][0].run_id)
    with pytest.raises(UserError, match=r"--layer: 'low' is not distilled .* its AttnFD layers are backbone, encoder, decoder"):
        plots.attention_maps(row, [0], "low")
    kd = frame[frame["run_id"] == runs["kd"][0].run_id].iloc[0]
    with pytest.raises(UserError, match="is a 'kd' run; the attention figure needs an attnfd run"):
        plots.attention_maps(kd, [0])


def test_run_without_checkpoint(frame):
    row = frame.iloc[0].copy()
    row[tag_col(Tag.CHECKPOINT)] = "/nonexistent/last.pt"
    with pytest.raises(UserError, match=r"has no checkpoint at /nonexistent/last.pt"):
        plots.load_run(row)


def _cli(capsys, monkeypatch, *args):
    from kdbench.cli import main

    monkeypatch.setattr(sys, "argv", ["kdbench", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli(runs, tmp_path, capsys, monkeypatch):
    kd, none = runs["kd"][0].run_id, runs["none"][0].run_id
    code, out, err = _cli(capsys, monkeypatch, "plot", "curves", "--run", kd, "--run", none, "--out", str(tmp_path / "figs"), "--no-log")
    assert code == 0, err
    (line,) = out.strip().splitlines()
    assert line.startswith(str(tmp_path / "figs" / "curves_synthetic_none-default+kd-cirkd_")) and os.path.isfile(line)
    assert os.path.basename(line) not in _figures(kd)  # --no-log
    code, out, err = _cli(capsys, monkeypatch, "plot", "per-class", "--experiment", EXPERIMENT, "--out", str(tmp_path / "figs"))
    assert code == 0 and os.path.basename(out.strip()) in _figures(kd), err

    errors = {
        ("plot", "histogram"): "error: plot: unknown kind 'histogram'; choose one of per-class, predictions, attention, curves",
        ("plot", "curves", "--run", "0123abc"): "error: --run: no run '0123abc' in the MLflow store",
        ("plot", "curves", "--experiment", "nosuch"): "error: --experiment: no experiment 'nosuch'",
        ("plot", "predictions", "--images", "0,99"): "error: --images: 99 is out of range; the val split has 6 images (0-5)",
        ("plot", "per-class", "--layer", "encoder"): "error: --layer: only `kdbench plot attention` has a layer",
        ("plot", "attention", "--run", runs["kd"][0].run_id): "error: plot attention: no attnfd run among the selected runs (methods: kd)",
    }
    for args, message in errors.items():
        code, out, err = _cli(capsys, monkeypatch, *args)
        assert code == 2 and err.strip().startswith(message) and len(err.strip().splitlines()) == 1, (args, err)



def test_figures_that_run_models_leave_out_runs_without_weights_here(runs, frame, tmp_path):
    ckpt = runs["kd"][0].checkpoint
    moved = tmp_path / "away.pt"
    ckpt.rename(moved)
    try:
        grid = plots.prediction_grid(plots.with_checkpoints(frame, "predictions"), images=(0,), teacher=False)
        assert grid.columns == ["image", "ground truth", "none (default)", "attnfd (default)"]
        kd_only = frame[frame[tag_col(Tag.METHOD)] == "kd"]
        with pytest.raises(UserError, match="none of the selected runs has its checkpoint on this machine"):
            plots.with_checkpoints(kd_only, "predictions")
    finally:
        moved.rename(ckpt)
