"""Figures from MLflow runs: ``kdbench plot per-class|predictions|attention|curves``.

Every figure is built from what a run recorded (``kdbench.schema`` names it all): per-class IoU bars
and training curves from its metrics, qualitative figures from its checkpoint (the run's tag
``Tag.CHECKPOINT``) rebuilt with the run's own resolved recipe (the ``recipe.yaml`` artifact). A figure
is written as a PNG under ``out_dir`` and logged to each run it was made from under ``figures/``.

Each kind has a data function (what is drawn: testable without pixels), a ``*_figure`` function (a
matplotlib ``Figure``, no pyplot state, the Agg canvas) and a ``plot_*`` function that builds, saves
and logs it and returns the written path. Figures are ``figsize * DPI`` pixels exactly (tight layout
inside the canvas, never a tight bounding box that would change the size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console

from kdbench import trained
from kdbench.errors import UserError
from kdbench.schema import Artifact, Metric, Role, Tag, column, metric_col, tag_col
from kdbench.table import variant_labels

console = Console(stderr=True)

KINDS = ("per-class", "predictions", "attention", "curves")
DPI = 120
#: the label value kdbench uses for pixels without a class (drawn black)
IGNORE_INDEX = 255
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """kdbench's one figure style (font sizes, dpi), without touching the caller's global rcParams."""
    with matplotlib.rc_context(STYLE):
        yield


def _inches(x: float) -> float:
    """Round to 1/24 inch, so that figsize * DPI is a whole number of pixels."""
    return max(1.0, round(x * 24) / 24)


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (no pyplot, no GUI backend), ``width x height`` inches at DPI."""
    fig = Figure(figsize=(_inches(width), _inches(height)), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def layout(fig: Figure, reserve_bottom: float = 0.0, reserve_top: float = 0.0) -> None:
    """Tight layout inside the canvas, leaving ``reserve_*`` inches free (for a figure legend)."""
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, reserve_bottom / height, 1, 1 - reserve_top / height))


def save_figure(fig: Figure, path: str | Path) -> Path:
    """A PNG of exactly figsize * DPI pixels (the ``*_figure`` functions lay themselves out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with style():
        fig.savefig(path, dpi=DPI, format="png")
    return path


def log_figure(path: str | Path, run_ids: Sequence[str]) -> None:
    """The PNG as an artifact (``figures/NAME.png``) of every run it was made from."""
    import mlflow

    client = mlflow.MlflowClient()
    for run_id in dict.fromkeys(run_ids):
        client.log_artifact(run_id, str(path), Artifact.FIGURES)


def _slug(text: str, limit: int = 80) -> str:
    s = re.sub(r"-*\+-*", "+", re.sub(r"[^A-Za-z0-9.+-]+", "-", text)).strip("-")
    return s[:limit].rstrip("-") or "runs"


def figure_name(kind: str, runs: pd.DataFrame, *parts: str) -> str:
    """``KIND_DATASET_LABELS[_PARTS]_HASH.png``: readable, and unique for a set of runs."""
    labels = "+".join(dict.fromkeys(run_labels(ordered(runs))))
    datasets = "+".join(sorted(set(column(runs, tag_col(Tag.DATASET)).dropna())))
    digest = hashlib.sha1(",".join(sorted(runs["run_id"])).encode()).hexdigest()[:6]
    pieces = [kind, _slug(datasets, 30), _slug(labels), *(_slug(p, 40) for p in parts if p), digest]
    return "_".join(p for p in pieces if p) + ".png"


# ---------------------------------------------------------------------------------------------
# which runs


def find_runs(experiment: str | None = None, run_ids: Sequence[str] = (), uri: str | None = None) -> pd.DataFrame:
    """The runs to plot, as a ``search_runs`` frame.

    ``run_ids``: exactly those runs, in that order. Otherwise the finished student runs evaluated on
    val of ``experiment`` (default: every ``kdbench-*`` experiment), newest first, one per recipe hash
    (a rerun of the same recipe replaces the older run), from the store ``uri`` (see ``tracking_uri``).
    A user mistake is a ``UserError``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from kdbench.tracking import read_store

    uri = read_store(uri, "plot")
    if run_ids:
        client = mlflow.MlflowClient()
        experiments: dict[str, None] = {}
        for run_id in run_ids:
            try:
                experiments[client.get_run(run_id).info.experiment_id] = None
            except MlflowException:
                raise UserError(
                    f"--run: no run {run_id!r} in the MLflow store {mlflow.get_tracking_uri()} "
                    "(see the run ids with `mlflow ui`, or pick runs with --experiment)"
                ) from None
        ids = ", ".join(f"'{r}'" for r in dict.fromkeys(run_ids))
        frame = mlflow.search_runs(experiment_ids=list(experiments), filter_string=f"attributes.run_id IN ({ids})", output_format="pandas")
        return frame.set_index("run_id", drop=False).loc[list(dict.fromkeys(run_ids))].reset_index(drop=True)

    from kdbench.schema import search_runs

    if experiment is not None and mlflow.MlflowClient().get_experiment_by_name(experiment) is None:
        known = ", ".join(e.name for e in mlflow.search_experiments() if e.name.startswith("kdbench-")) or "none"
        raise UserError(f"--experiment: no experiment {experiment!r} in {mlflow.get_tracking_uri()} (kdbench experiments: {known})")
    where = f"attributes.status = 'FINISHED' and tags.`{Tag.ROLE}` = '{Role.STUDENT}'"
    frame = search_runs([experiment] if experiment else None, where, uri=uri)
    if len(frame):
        frame = frame[column(frame, tag_col(Tag.EVAL_SPLIT)).fillna("val") == "val"]  # not tuning trials
        frame = frame.drop_duplicates(subset=[tag_col(Tag.RECIPE_HASH)]) if tag_col(Tag.RECIPE_HASH) in frame else frame
    if not len(frame):
        where_text = f"experiment {experiment!r}" if experiment else f"any kdbench experiment of {mlflow.get_tracking_uri()}"
        raise UserError(f"plot: no finished student runs in {where_text}; train some with `kdbench run --method NAME`, or name runs with --run ID")
    return frame.reset_index(drop=True)


def _method_order(label: str, method: str) -> tuple[int, str]:
    return (0 if method == "none" else 1, label)


def run_labels(runs: pd.DataFrame, seed: bool = False) -> pd.Series:
    """``method/preset`` per run (the plain student is ``none``), with the student model when the runs
    have several, and `` seed N`` with ``seed``."""
    method = column(runs, tag_col(Tag.METHOD)).fillna("?").astype(str)
    preset = column(runs, tag_col(Tag.PRESET)).fillna("").astype(str)
    label = pd.Series([m if m == "none" or p in ("", "-") else f"{m}/{p}" for m, p in zip(method, preset)], index=runs.index)
    role = column(runs, tag_col(Tag.ROLE))
    label = label.where(role != Role.TEACHER, "teacher")
    table_labels = variant_labels(runs)  # the table's row names (options that differ from the preset)
    label = table_labels.reindex(runs.index).fillna(label).astype(str) if len(table_labels) else label
    students = column(runs, tag_col(Tag.STUDENT))
    if students.nunique() > 1:
        label = label + " (" + students.fillna("?").astype(str) + ")"
    if seed:
        label = label + " seed " + column(runs, tag_col(Tag.SEED)).fillna("?").astype(str)
    return label


def ordered(runs: pd.DataFrame) -> pd.DataFrame:
    """The plain student first, then the methods by label (stable within a label)."""
    labels = run_labels(runs)
    methods = column(runs, tag_col(Tag.METHOD)).fillna("")
    key = [_method_order(lbl, m) for lbl, m in zip(labels, methods)]
    order = sorted(range(len(runs)), key=lambda i: key[i])
    return runs.iloc[order].reset_index(drop=True)


def _one_dataset(runs: pd.DataFrame, kind: str) -> str:
    datasets = sorted(set(column(runs, tag_col(Tag.DATASET)).dropna()))
    if len(datasets) > 1:
        raise UserError(f"plot {kind}: the runs are on several datasets ({', '.join(datasets)}); pick one with --experiment or --run")
    return datasets[0] if datasets else "?"


# ---------------------------------------------------------------------------------------------
# per-class IoU


def _class_order(runs: pd.DataFrame, names: list[str]) -> list[str]:
    dataset = _one_dataset(runs, "per-class")
    from kdbench.data import CLASS_NAMES

    known = list(CLASS_NAMES.get(dataset, ()))
    return [c for c in known if c in names] + [c for c in names if c not in known]


def per_class_iou(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean IoU per label (rows: ``run_labels``, the plain student first) and class (columns: the
    dataset's class order); a class no run measured is left out. ``.attrs["n"]``: runs per label."""
    prefix = metric_col(Metric.IOU_PREFIX)
    names = [c[len(prefix) :] for c in runs.columns if c.startswith(prefix) and runs[c].notna().any()]
    if not names:
        raise UserError(f"plot per-class: none of the runs logged per-class IoU ({Metric.iou('CLASS')}); they may not have finished")
    classes = _class_order(runs, names)
    runs = ordered(runs)
    labels = run_labels(runs)
    values = runs[[metric_col(Metric.iou(c)) for c in classes]].astype(float)
    values.columns = classes
    table = values.groupby(labels.values, sort=False).mean()
    table.attrs["n"] = labels.value_counts().to_dict()
    return table


def per_class_figure(table: pd.DataFrame, title: str = "Per-class IoU") -> Figure:
    """Grouped bars: one group per class, one color per label (IoU in %); the legend gives each
    label's mIoU over these classes and the number of runs averaged."""
    n_labels, n_classes = len(table), len(table.columns)
    with style():
        fig = new_figure(min(32.0, max(6.0, 1.5 + n_classes * (0.3 + 0.14 * n_labels)) + 2.75), 4.5)
        ax = fig.add_subplot()
        x = np.arange(n_classes)
        width = 0.8 / max(n_labels, 1)
        colors = matplotlib.colormaps["tab10" if n_labels <= 10 else "tab20"]
        counts = table.attrs.get("n", {})
        for i, (label, row) in enumerate(table.iterrows()):
            n = counts.get(label, 1)
            mean = 100 * float(np.nanmean(row.values)) if row.notna().any() else math.nan
            name = f"{label}: mIoU {mean:.1f}" + (f" (mean of {n} runs)" if n > 1 else "")
            ax.bar(x + (i - (n_labels - 1) / 2) * width, 100 * row.values, width, label=name, color=colors(i % colors.N))
        ax.set_xticks(x, table.columns, rotation=40, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, n_classes - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("IoU (%)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        layout(fig)
    return fig


def plot_per_class(runs: pd.DataFrame, out_dir: str | Path = "figures", log: bool = True) -> Path:
    """Per-class IoU bars of the runs (mean over the runs sharing a label); returns the PNG's path."""
    table = per_class_iou(runs)
    dataset = _one_dataset(runs, "per-class")
    students = ", ".join(sorted(set(column(runs, tag_col(Tag.STUDENT)).dropna())))
    fig = per_class_figure(table, f"Per-class IoU on {dataset} val" + (f", student {students}" if students else ""))
    path = save_figure(fig, Path(out_dir) / figure_name("per-class", runs))
    if log:
        log_figure(path, runs["run_id"])
    return path


# ---------------------------------------------------------------------------------------------
# training curves


def curve_quantities(runs: pd.DataFrame) -> list[str]:
    """val mIoU, then the total loss, the task loss and every other ``loss/*`` term any run logged."""
    prefix = metric_col(Metric.LOSS_PREFIX)
    losses = sorted(c[len(metric_col("")) :] for c in runs.columns if c.startswith(prefix) and runs[c].notna().any())
    first = [Metric.LOSS_TOTAL, Metric.loss("task")]
    return [Metric.VAL_MIOU] + [k for k in first if k in losses] + [k for k in losses if k not in first]


def metric_histories(runs: pd.DataFrame, quantities: Sequence[str] | None = None) -> pd.DataFrame:
    """Long frame (run_id, label, quantity, step, value) of every logged value of each quantity.

    ``val/miou`` ends with the run's final evaluation (``miou``, on the same split) at its step."""
    import mlflow

    client = mlflow.MlflowClient()
    quantities = list(quantities or curve_quantities(runs))
    labels = run_labels(runs, seed=True)
    rows = []
    for (_, run), label in zip(runs.iterrows(), labels):
        for q in quantities:
            history = list(client.get_metric_history(run["run_id"], q))
            if q == Metric.VAL_MIOU:
                history += list(client.get_metric_history(run["run_id"], Metric.MIOU))
            rows += [(run["run_id"], label, q, m.step, m.value) for m in history]
    frame = pd.DataFrame(rows, columns=["run_id", "label", "quantity", "step", "value"])
    return frame.sort_values(["quantity", "run_id", "step"], kind="stable").reset_index(drop=True)


_CURVE_TITLES = {Metric.VAL_MIOU: "val mIoU (%)", Metric.LOSS_TOTAL: "total loss"}


def curves_figure(history: pd.DataFrame, quantities: Sequence[str] | None = None, title: str = "Training curves") -> Figure:
    """One subplot per quantity (in ``quantities`` order), one line per run that logged it."""
    quantities = list(quantities or dict.fromkeys(history["quantity"]))
    runs = list(dict.fromkeys(zip(history["run_id"], history["label"])))
    cols = min(3, len(quantities))
    rows = math.ceil(len(quantities) / cols)
    colors = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    with style():
        fig = new_figure(4.0 * cols, 3.0 * rows + 0.4)
        for i, q in enumerate(quantities):
            ax = fig.add_subplot(rows, cols, i + 1)
            part = history[history["quantity"] == q]
            for j, (run_id, label) in enumerate(runs):
                h = part[part["run_id"] == run_id]
                if len(h):
                    scale = 100.0 if q == Metric.VAL_MIOU else 1.0
                    ax.plot(h["step"], scale * h["value"], label=label, color=colors(j % colors.N), marker="o" if len(h) < 30 else None, ms=3)
            ax.set_title(_CURVE_TITLES.get(q, q))
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        handles: dict[str, Any] = {}
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        ncol = max(1, min(len(handles), int(4.0 * cols / 2.2)))
        legend_h = 0.22 * math.ceil(len(handles) / ncol) + 0.1
        fig.set_size_inches(fig.get_size_inches()[0], _inches(3.0 * rows + 0.4 + legend_h))
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=ncol, frameon=False)
        fig.suptitle(title)
        layout(fig, reserve_bottom=legend_h)
    return fig


def plot_curves(runs: pd.DataFrame, out_dir: str | Path = "figures", log: bool = True) -> Path:
    """val mIoU and every loss term against step, one line per run; returns the PNG's path."""
    quantities = curve_quantities(runs)
    history = metric_histories(ordered(runs), quantities)
    if history.empty:
        raise UserError("plot curves: the runs logged no val mIoU or loss values")
    quantities = [q for q in quantities if (history["quantity"] == q).any()]
    fig = curves_figure(history, quantities, f"Training curves on {_one_dataset(runs, 'curves')}")
    path = save_figure(fig, Path(out_dir) / figure_name("curves", runs))
    if log:
        log_figure(path, runs["run_id"])
    return path


# ---------------------------------------------------------------------------------------------
# trained models of runs


@dataclasses.dataclass
class LoadedRun:
    """A run's trained student (eval mode, CPU) with its resolved recipe and checkpoint."""

    run_id: str
    label: str
    recipe: Any
    student: Any
    checkpoint: dict[str, Any]
    path: Path


def checkpoint_path(run: pd.Series, recipe: Any) -> Path:
    """The run's checkpoint (``kdbench.trained.checkpoint_path`` of its ``Tag.CHECKPOINT``)."""
    return trained.checkpoint_path(run.get(tag_col(Tag.CHECKPOINT)), recipe)


def has_checkpoint(run: pd.Series) -> bool:
    """Whether this machine holds the run's trained weights (a figure that runs the model needs them)."""
    tagged = run.get(tag_col(Tag.CHECKPOINT))
    if isinstance(tagged, str) and tagged:
        return Path(tagged).is_file()
    try:
        return checkpoint_path(run, trained.run_recipe(run["run_id"])).is_file()
    except UserError:
        return False


def with_checkpoints(runs: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The runs whose weights are here, noting the labels left out for want of them."""
    here = runs[[has_checkpoint(r) for _, r in runs.iterrows()]] if len(runs) else runs
    missing = sorted(set(run_labels(runs)) - set(run_labels(here))) if len(here) else sorted(set(run_labels(runs)))
    if here.empty:
        raise UserError(f"plot {kind}: none of the selected runs has its checkpoint on this machine; run them here (or copy runs/) or pick others with --run")
    if missing:
        console.print(f"[yellow]note[/]: no checkpoint here for {', '.join(missing)}; left out of the {kind} figure")
    return here


def load_run(run: pd.Series, label: str | None = None) -> LoadedRun:
    """Rebuild a run's student from its logged recipe and load its checkpoint's weights."""
    from kdbench.checkpoint import load

    run_id = run["run_id"]
    recipe = trained.run_recipe(run_id)
    path = checkpoint_path(run, recipe)
    label = label or run_labels(run.to_frame().T).iloc[0]
    if not path.is_file():
        raise UserError(
            f"plot: run {run_id} ({label}) has no checkpoint at {path}; the figure needs the run's trained "
            "model (rerun it with `kdbench run`, or pick another with --run)"
        )
    ckpt = load(path, f"run {run_id} checkpoint")
    if ckpt.get("mlflow_run_id") not in (None, run_id):
        console.print(f"[yellow]note[/]: {path} was last written by run {ckpt['mlflow_run_id']} (the same recipe run again); using it for {run_id}")
    state = ckpt["student"]
    num_classes = int(state["classifier.weight"].shape[0])
    student = trained.model_from_state(recipe.student, state, num_classes, f"plot: run {run_id}'s checkpoint {path}", "pick another with --run")
    return LoadedRun(run_id, label, recipe, student, ckpt, path)


def load_run_teacher(recipe: Any, num_classes: int) -> Any | None:
    """The recipe's teacher (its checkpoint, else kdbench's cached one), or None when there is none."""
    from kdbench.run import load_teacher

    path = trained.teacher_path(recipe)
    if not path.is_file():
        return None
    no_download = dataclasses.replace(recipe, teacher=dataclasses.replace(recipe.teacher, pretrained=False))
    model, _ = load_teacher(no_download, path, num_classes)
    return model


def parse_images(text: str | None, default: Sequence[int]) -> list[int]:
    """``--images 0,3,7`` -> [0, 3, 7]."""
    if text is None or not text.strip():
        return list(default)
    try:
        out = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--images: expected comma-separated val image indices, e.g. 0,3,7, got {text!r}") from None
    if not out or min(out) < 0:
        raise UserError(f"--images: expected indices 0 or more, got {text!r}")
    return out


def _val_images(recipe: Any, indices: Sequence[int]) -> tuple[list[Any], list[Any], list[str]]:
    """(uint8 3 x H x W image tensors, label maps, class names) of val images ``indices``."""
    from kdbench.data import load_splits

    splits = load_splits(recipe, progress=False)
    n = len(splits.val)
    bad = [i for i in indices if i >= n]
    if bad:
        raise UserError(f"--images: {bad[0]} is out of range; the val split has {n} images (0-{n - 1})")
    pairs = [splits.val[i] for i in indices]
    return [p[0] for p in pairs], [p[1] for p in pairs], list(splits.class_names)


def picture(image: Any) -> np.ndarray:
    """A dataset's uint8 3 x H x W image as the H x W x 3 array imshow takes."""
    return image.permute(1, 2, 0).numpy()


@functools.cache
def class_palette() -> np.ndarray:
    """A fixed RGB color per class (uint8, 256 x 3): the ten tab20 hues, their light versions,
    tab20b, tab20c, then a seeded spread; the ignore label (255) is black."""
    tab20 = matplotlib.colormaps["tab20"].colors
    colors = [*tab20[0::2], *tab20[1::2], *matplotlib.colormaps["tab20b"].colors, *matplotlib.colormaps["tab20c"].colors]
    extra = np.random.default_rng(0).integers(40, 256, size=(256, 3)) / 255.0
    table = np.array([colors[i] if i < len(colors) else extra[i] for i in range(256)], dtype=float)
    palette = np.round(table[:, :3] * 255).astype(np.uint8)
    palette[IGNORE_INDEX] = 0
    return palette


def colorize(label_map: Any) -> np.ndarray:
    """H x W class ids (255 = ignore) -> H x W x 3 uint8 with ``class_palette``."""
    ids = np.asarray(label_map.cpu() if hasattr(label_map, "cpu") else label_map).astype(np.int64)
    return class_palette()[np.clip(ids, 0, 255)]


@dataclasses.dataclass
class PredictionGrid:
    """What the predictions figure shows: ``cells[row][col]`` are H x W x 3 arrays."""

    columns: list[str]
    rows: list[str]
    cells: list[list[np.ndarray]]
    class_names: list[str]
    run_ids: list[str]


def prediction_grid(runs: pd.DataFrame, images: Sequence[int] = (0, 1, 2), teacher: bool = True) -> PredictionGrid:
    """Rows: val images; columns: image, ground truth, each label's prediction (the plain student
    first; the lowest seed, newest first, of each label), then the teacher's when one is available."""
    import torch

    from kdbench.data.transforms import normalize
    from kdbench.engine import predict

    _one_dataset(runs, "predictions")
    runs = ordered(runs)
    labels = run_labels(runs)
    seeds = pd.to_numeric(column(runs, tag_col(Tag.SEED)), errors="coerce").fillna(0)
    pick = runs.assign(_label=labels.values, _seed=seeds.values).sort_values("_seed", kind="stable").drop_duplicates("_label")
    pick = pick.loc[sorted(pick.index)]  # back to the plain-student-first label order
    loaded = [load_run(run, run["_label"]) for _, run in pick.iterrows()]
    recipe = loaded[0].recipe
    xs, ys, names = _val_images(recipe, images)
    models = [(lr.label, lr.student, lr.recipe) for lr in loaded]
    if teacher:
        source = next((lr.recipe for lr in loaded if lr.recipe.method.name != "none"), recipe)
        t = load_run_teacher(source, len(names))
        if t is None:
            console.print("[yellow]note[/]: no trained teacher for these runs' recipe is cached here; the teacher column is left out")
        else:
            models.append(("teacher", t, source))
    cells = []
    with torch.no_grad():
        for x, y in zip(xs, ys):
            row = [picture(x), colorize(y)]
            for _, model, r in models:
                pred = predict(model, normalize(x[None], r.data.normalize), tuple(r.eval.scales), r.eval.flip).argmax(1)[0]
                row.append(colorize(pred))
            cells.append(row)
    columns = ["image", "ground truth", *[m[0] for m in models]]
    return PredictionGrid(columns, [f"val #{i}" for i in images], cells, names, [lr.run_id for lr in loaded])


def _cell_size(cell: np.ndarray, height: float = 2.0) -> tuple[float, float]:
    aspect = min(3.0, max(0.33, cell.shape[1] / cell.shape[0]))
    return height * aspect, height


def _class_legend(fig: Figure, names: Sequence[str], ncol: int) -> None:
    from matplotlib.patches import Patch

    palette = class_palette() / 255.0
    handles = [Patch(facecolor=palette[i], edgecolor="none", label=n) for i, n in enumerate(names)]
    handles.append(Patch(facecolor="black", label="ignore"))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, handlelength=1.2, columnspacing=1.0)


def predictions_figure(grid: PredictionGrid, title: str = "Predictions") -> Figure:
    """The grid (titles on the first row, image names on the first column) with a class legend below."""
    n_rows, n_cols = len(grid.rows), len(grid.columns)
    cw, ch = _cell_size(grid.cells[0][0])
    ncol = max(1, min(len(grid.class_names) + 1, int(n_cols * cw / 1.3)))
    legend_h = 0.25 * math.ceil((len(grid.class_names) + 1) / ncol) + 0.1
    width, height = n_cols * cw, n_rows * ch + 0.5 + legend_h
    with style():
        fig = new_figure(width, height)
        for r in range(n_rows):
            for c in range(n_cols):
                ax = fig.add_subplot(n_rows, n_cols, r * n_cols + c + 1)
                ax.imshow(grid.cells[r][c], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_frame_on(False)
                if r == 0:
                    ax.set_title(grid.columns[c])
                if c == 0:
                    ax.set_ylabel(grid.rows[r])
        _class_legend(fig, grid.class_names, ncol)
        fig.suptitle(title)
        layout(fig, reserve_bottom=legend_h)
    return fig


def plot_predictions(runs: pd.DataFrame, images: Sequence[int] = (0, 1, 2), out_dir: str | Path = "figures", log: bool = True) -> Path:
    """Qualitative grid of the runs' predictions on val images; returns the PNG's path."""
    grid = prediction_grid(runs, images)
    fig = predictions_figure(grid, f"Predictions on {_one_dataset(runs, 'predictions')} val")
    path = save_figure(fig, Path(out_dir) / figure_name("predictions", runs, "img" + "-".join(map(str, images))))
    if log:
        log_figure(path, grid.run_ids)
    return path


# ---------------------------------------------------------------------------------------------
# AttnFD attention maps


@dataclasses.dataclass
class AttentionMaps:
    """Channel-mean |feature| maps at ``layer`` (each H x W at the image size, scaled to [0, 1]) of
    every image: ``maps[row]`` = {name: map} with the names of ``COLUMNS``."""

    layer: str
    teacher_attention: str
    images: list[np.ndarray]
    rows: list[str]
    maps: list[dict[str, np.ndarray]]

    COLUMNS = ("teacher", "teacher refined", "student", "student refined")


def feature_map(f: Any, size: tuple[int, int]) -> np.ndarray:
    """Channel-mean |f| of a 1 x C x h x w feature, resized (bilinear) to ``size``, scaled to [0, 1]."""
    import torch.nn.functional as F

    m = f.detach().float().abs().mean(dim=1, keepdim=True)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    low, high = float(m.min()), float(m.max())
    return (m - low) / (high - low) if high > low else np.zeros_like(m)


def attention_maps(run: pd.Series, images: Sequence[int] = (0,), layer: str | None = None) -> AttentionMaps:
    """An AttnFD run's features at ``layer`` (default: its first distilled layer) before and after
    refinement: the teacher's (AttnFD's teacher-side attention: parameter-free, random frozen or the
    teacher's own CBAM) and the student's (its trained CBAM, before the connector)."""
    import torch

    from kdbench.data.transforms import normalize
    from kdbench.methods import method_for, resolve_config

    run_id, method = run["run_id"], run.get(tag_col(Tag.METHOD))
    if method != "attnfd":
        raise UserError(f"plot attention: run {run_id} is a {method!r} run; the attention figure needs an attnfd run (pick one with --run)")
    lr = load_run(run)
    r = lr.recipe
    _, cfg = resolve_config(r.method.name, r.method.preset, r.method.params)
    layer = layer or cfg.layers[0]
    if layer not in cfg.layers:
        raise UserError(f"--layer: {layer!r} is not distilled by run {run_id}; its AttnFD layers are {', '.join(cfg.layers)}")
    xs, _, names = _val_images(r, images)
    teacher = load_run_teacher(r, len(names))
    if teacher is None:
        raise UserError(f"plot attention: run {run_id}'s teacher is not here (no teacher.checkpoint, none cached); run `kdbench teacher` with its recipe")
    method_module = method_for(r.method.name, cfg, lr.student, teacher, len(names))
    method_module.load_state_dict(lr.checkpoint["method"])
    method_module.eval()
    seen: dict[str, Any] = {}
    own = getattr(teacher, "attention", {})
    hook = own[layer].register_forward_hook(lambda m, i, o: seen.update(before=i[0], after=o)) if layer in own else None
    rows, pictures = [], []
    try:
        with torch.no_grad():
            for image in xs:
                size, x = tuple(image.shape[-2:]), normalize(image[None], r.data.normalize)
                fs = lr.student(x)[layer]
                ft = teacher(x)[layer]
                t_before, t_after = (seen["before"], seen["after"]) if hook else (ft, method_module.refine_teacher(layer, ft))
                rows.append(
                    {
                        "teacher": feature_map(t_before, size),
                        "teacher refined": feature_map(t_after, size),
                        "student": feature_map(fs, size),
                        "student refined": feature_map(method_module.student_cbam[layer](fs), size),
                    }
                )
                pictures.append(picture(image))
    finally:
        if hook:
            hook.remove()
    return AttentionMaps(layer, cfg.teacher_attention, pictures, [f"val #{i}" for i in images], rows)


def attention_figure(maps: AttentionMaps, title: str = "AttnFD attention") -> Figure:
    """Rows: images; columns: the image, then the teacher's and the student's maps before and after
    refinement (channel-mean |feature|, each scaled to [0, 1])."""
    titles = {
        "teacher": f"teacher {maps.layer}",
        "teacher refined": f"teacher refined ({maps.teacher_attention})",
        "student": f"student {maps.layer}",
        "student refined": "student refined (CBAM)",
    }
    n_rows, n_cols = len(maps.rows), 1 + len(AttentionMaps.COLUMNS)
    cw, ch = _cell_size(maps.images[0])
    with style():
        fig = new_figure(n_cols * cw, n_rows * ch + 0.5)
        for r in range(n_rows):
            cells = [("image", maps.images[r])] + [(titles[k], maps.maps[r][k]) for k in AttentionMaps.COLUMNS]
            for c, (name, cell) in enumerate(cells):
                ax = fig.add_subplot(n_rows, n_cols, r * n_cols + c + 1)
                if c == 0:
                    ax.imshow(cell, interpolation="nearest")
                else:
                    ax.imshow(cell, cmap="jet", vmin=0.0, vmax=1.0, interpolation="bilinear")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_frame_on(False)
                if r == 0:
                    ax.set_title(name)
                if c == 0:
                    ax.set_ylabel(maps.rows[r])
        fig.suptitle(title)
        layout(fig)
    return fig


def plot_attention(
    run: pd.Series, images: Sequence[int] = (0,), layer: str | None = None, out_dir: str | Path = "figures", log: bool = True
) -> Path:
    """The AttnFD feature-map figure of one run; returns the PNG's path."""
    maps = attention_maps(run, images, layer)
    label = run_labels(run.to_frame().T, seed=True).iloc[0]
    fig = attention_figure(maps, f"AttnFD features at '{maps.layer}' (channel-mean |f|), {label}")
    frame = run.to_frame().T
    path = save_figure(fig, Path(out_dir) / figure_name("attention", frame, maps.layer, "img" + "-".join(map(str, images))))
    if log:
        log_figure(path, [run["run_id"]])
    return path


# ---------------------------------------------------------------------------------------------
# what `kdbench plot` calls


def plot(
    kind: str,
    *,
    experiment: str | None = None,
    run_ids: Sequence[str] = (),
    out_dir: str | Path = "figures",
    images: str | None = None,
    layer: str | None = None,
    log: bool = True,
    tracking_uri: str | None = None,
) -> list[Path]:
    """One ``kdbench plot`` command: the runs (``find_runs``), then the figure(s) of ``kind``."""
    if kind not in KINDS:
        raise UserError(f"plot: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if layer is not None and kind != "attention":
        raise UserError(f"--layer: only `kdbench plot attention` has a layer, not {kind}")
    if images is not None and kind not in ("predictions", "attention"):
        raise UserError(f"--images: only predictions and attention show images, not {kind}")
    runs = find_runs(experiment, run_ids, tracking_uri)
    if kind == "per-class":
        return [plot_per_class(runs, out_dir, log)]
    if kind == "curves":
        return [plot_curves(runs, out_dir, log)]
    if kind == "predictions":
        runs = runs if run_ids else with_checkpoints(runs, kind)  # named runs must have theirs
        return [plot_predictions(runs, parse_images(images, (0, 1, 2)), out_dir, log)]
    picked = runs[column(runs, tag_col(Tag.METHOD)) == "attnfd"]
    if picked.empty:
        methods = ", ".join(sorted(set(column(runs, tag_col(Tag.METHOD)).dropna()))) or "none"
        raise UserError(f"plot attention: no attnfd run among the selected runs (methods: {methods}); pick one with --run ID")
    if not run_ids:
        picked = with_checkpoints(picked, kind).iloc[:1]  # the newest with its weights here
    return [plot_attention(run, parse_images(images, (0,)), layer, out_dir, log) for _, run in picked.iterrows()]
