"""``kdbench eval``: a trained student or teacher on its recipe's val split, at one scale or several
and with or without flipped images, as papers report, logged to the MLflow run it belongs to.

    CHECKPOINT_OR_RUN_ID -> the weights (a run folder's last.pt, a cached teacher.pt, a model.pt
                            state_dict, or an MLflow run's ``kdbench.checkpoint``) and their run
      -> the recipe: the run's ``recipe.yaml``, else --recipe (default: the embedded benchmark); --set on top
      -> engine.evaluate with the recipe's eval settings, --scales and --flip replacing theirs
      -> MLflow: ``eval/SETTING/...`` metrics and ``evaluations/SETTING.json`` on that run (a new run,
         role ``eval``, for weights that belong to none); optionally one palette PNG per val image

The run's own final evaluation (the bare ``miou``) is never overwritten: each setting has its names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from kdbench.errors import UserError
from kdbench.metrics import SegMetrics
from kdbench.schema import Artifact, Metric, Role, Tag
from kdbench.trained import checkpoint_path, model_from_state, run_recipe, teacher_path

console = Console(stderr=True)

#: weights files a run folder or the teacher cache holds, the first found is evaluated
WEIGHT_FILES = ("last.pt", "teacher.pt", Artifact.MODEL)
TRAIN_HINT = "pass the --recipe and --set options it was trained with"


@dataclass
class Weights:
    """What is evaluated: a state_dict, the recipe sections it may belong to (tried in order) and the
    MLflow run it belongs to in this store (None: none)."""

    path: Path
    state: dict[str, Any]
    roles: tuple[str, ...]
    run_id: str | None = None
    step: int = 0
    recipe_hash: str | None = None
    #: the run id the file itself names (a kdbench checkpoint), whether or not this store has it
    named_run: str | None = None
    #: where the weights came from, as logged and shown: the file's absolute path, or the run's artifact
    source: str = ""

    def __post_init__(self) -> None:
        self.source = self.source or str(self.path.resolve())


@dataclass
class EvalResult:
    metrics: SegMetrics
    confusion: torch.Tensor
    class_names: list[str]
    setting: str  #: ``Metric.eval_setting``: the metrics are ``eval/SETTING/...``
    scales: tuple[float, ...]
    flip: bool
    images: int
    dataset: str
    model: str  #: "student deeplabv3plus/resnet18"
    checkpoint: str
    run_id: str
    new_run: bool
    predictions: Path | None
    seconds: float


def parse_scales(text: str | None) -> tuple[float, ...] | None:
    """``--scales 0.5,0.75,1`` -> (0.5, 0.75, 1.0), sorted; None keeps the recipe's."""
    if text is None:
        return None
    try:
        scales = [float(p) for p in text.split(",")]
    except ValueError:
        scales = []
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise UserError(f"--scales: expected comma-separated positive numbers such as 0.5,0.75,1,1.25,1.5,1.75, got {text!r}")
    twice = sorted({s for s in scales if scales.count(s) > 1})
    if twice:
        raise UserError(f"--scales: {twice[0]:g} is listed twice in {text!r}; name each scale once")
    return tuple(sorted(scales))


def palette(dataset: str) -> list[int]:
    """The 768 values of a PNG palette: class id i has the dataset's colour of class i (VOC's colour
    map for VOC and the synthetic benchmark, whose label files use it; Cityscapes' own colours)."""
    from kdbench.data.cityscapes import COLORS
    from kdbench.data.synthetic import voc_palette

    if dataset == "cityscapes":
        flat = [v for rgb in COLORS for v in rgb]
        return flat + [0] * (768 - len(flat))
    return voc_palette()


# ---------------------------------------------------------------------------------------------
# what is evaluated


def read_weights(path: Path) -> Weights:
    """A run's ``last.pt`` (its "student" weights: the student's, or a teacher's in training), a cached
    ``teacher.pt`` ({"model", "meta"}) or a plain state_dict (``model.pt``)."""
    from kdbench.checkpoint import load

    ckpt = load(path, "eval")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("student"), dict):
        run = ckpt.get("mlflow_run_id")
        return Weights(path, ckpt["student"], ("student", "teacher"), None, int(ckpt.get("step", 0)), ckpt.get("recipe_hash"), run)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
        return Weights(path, ckpt["model"], ("teacher",), named_run=meta.get("mlflow_run_id"))
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return Weights(path, ckpt, ("student", "teacher"))
    raise UserError(f"eval: {path} holds no model weights; pass a run folder's last.pt, a cached teacher.pt or a model.pt state_dict")


def _file(target: str) -> Path | None:
    """The weights file ``target`` names: a file, or the first of ``WEIGHT_FILES`` in a folder."""
    path = Path(target).expanduser()
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise UserError(f"eval: the folder {path} holds none of {', '.join(WEIGHT_FILES)}; pass the checkpoint file itself")
        return found[0]
    return path if path.is_file() else None


def _store_exists(uri: str) -> bool:
    from kdbench.outputs import sqlite_file

    db = sqlite_file(uri)
    return db is None or db.is_file()


def _get_run(run_id: str | None, uri: str) -> Any | None:
    """The MLflow run ``run_id`` of this store, or None (no such run, or no store yet: none is made)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id or not _store_exists(uri):
        return None
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None


def _run_of_file(path: Path, run_id: str | None, uri: str, store_named: bool) -> tuple[Any | None, str]:
    """(run, store) of the run that wrote checkpoint ``path``: in ``uri``, else, where no store was
    named, in the store of the output root the checkpoint sits in (``ROOT/METHOD-HASH/last.pt``
    beside ``ROOT/mlflow.db``: a run made with ``--set output_dir=ROOT``)."""
    from kdbench.outputs import STORE, use_tracking

    run = _get_run(run_id, uri)
    if run is not None or not run_id or store_named:
        return run, uri
    beside = use_tracking(f"sqlite:///{path.resolve().parent.parent / STORE}")
    if beside != uri and (run := _get_run(run_id, beside)) is not None:
        return run, beside
    return None, use_tracking(uri)


def _run_roles(run: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    tags = run.data.tags
    role = tags.get(Tag.ROLE)
    role = tags.get(Tag.EVALUATED) if role == Role.EVAL else role
    return (role,) if role in (Role.STUDENT, Role.TEACHER) else default


def _run_weights(run: Any, recipe: Any) -> Weights:
    """The weights of an MLflow run: its checkpoint (``Tag.CHECKPOINT``; a teacher run's: the teacher
    cache), else its logged ``model.pt``."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = run.info.run_id
    roles = _run_roles(run, ("student",))
    path = teacher_path(recipe) if roles == (Role.TEACHER,) else checkpoint_path(run.data.tags.get(Tag.CHECKPOINT), recipe)
    if path.is_file():
        weights = read_weights(path)
    else:  # trained elsewhere: the weights the run logged
        with tempfile.TemporaryDirectory() as tmp:
            try:
                logged = Path(mlflow.MlflowClient().download_artifacts(run_id, Artifact.MODEL, tmp))
            except (MlflowException, OSError):
                raise UserError(
                    f"eval: run {run_id}'s weights are not here ({path} is missing and the run logged no {Artifact.MODEL}); "
                    "evaluate it where it was trained, or pass its checkpoint file"
                ) from None
            weights = dataclasses.replace(read_weights(logged), source=f"{run.info.artifact_uri}/{Artifact.MODEL}")
    if weights.named_run not in (None, run_id):
        console.print(f"[yellow]note[/]: {path} was last written by run {weights.named_run} (the same recipe run again); logging to {run_id}")
    return dataclasses.replace(weights, roles=roles, run_id=run_id)


def _recipe(run: Any, weights: Weights | None, recipe: str | None, overrides: Sequence[str], uri: str) -> Any:
    from kdbench.recipe import load_recipe

    if recipe is None and run is not None:
        return run_recipe(run.info.run_id, overrides, what="eval", fix=TRAIN_HINT)
    if recipe is None and weights is not None and weights.named_run:
        raise UserError(
            f"eval: {weights.path} was written by MLflow run {weights.named_run}, which is not in the store {uri}; "
            f"{TRAIN_HINT}, or point --tracking-uri at the run's store"
        )
    return load_recipe(recipe, list(overrides))


def _model(weights: Weights, recipe: Any, num_classes: int) -> tuple[torch.nn.Module, str]:
    """The model of the first recipe section the weights fit; ("student ARCH/BACKBONE")."""
    errors = []
    for role in weights.roles:
        cfg = recipe.student if role == Role.STUDENT else recipe.teacher
        try:
            model = model_from_state(cfg, weights.state, num_classes, f"eval: {weights.source} ({role})", TRAIN_HINT)
        except UserError as err:
            errors.append(err)
            continue
        return model, f"{role} {cfg.arch}/{cfg.backbone}"
    raise errors[0]


# ---------------------------------------------------------------------------------------------
# the evaluation


def evaluate_checkpoint(
    target: str,
    *,
    recipe: str | None = None,
    overrides: Sequence[str] = (),
    scales: str | None = None,
    flip: bool | None = None,
    save_predictions: str | Path | None = None,
    tracking_uri: str | None = None,
    quiet: bool = False,
) -> EvalResult:
    """Evaluate the weights ``target`` names (a file or folder, else an MLflow run id) on the val
    split, log the result and return it. Every mistake a user can make is a one-line UserError."""
    from kdbench.data import class_names, load_splits
    from kdbench.engine import eval_loader, evaluate
    from kdbench.outputs import use_tracking
    from kdbench.runtime import make_runtime
    from kdbench.tracking import check_reachable

    scale_list = parse_scales(scales)
    store_named = tracking_uri is not None or "MLFLOW_TRACKING_URI" in os.environ  # before MLflow sets the variable
    uri = use_tracking(tracking_uri)
    check_reachable()
    path = _file(target)
    if path is not None:
        weights: Weights | None = read_weights(path)
        run, uri = _run_of_file(path, weights.named_run, uri, store_named)
        if run is not None:
            weights = dataclasses.replace(weights, run_id=run.info.run_id, roles=_run_roles(run, weights.roles))
    else:
        weights, run = None, _get_run(target, uri)
        if run is None:
            raise UserError(
                f"eval: no file {target} and no MLflow run {target!r} in {uri}; pass a checkpoint (a run folder's last.pt, "
                "a cached teacher.pt, a model.pt) or a run id (`mlflow ui` lists them)"
            )
    r = _recipe(run, weights, recipe, overrides, uri)
    weights = weights or _run_weights(run, r)
    names = class_names(r.data.dataset)
    model, description = _model(weights, r, len(names))  # before any data: weights of another model fail now
    if recipe is not None and weights.recipe_hash not in (None, r.hash()):
        console.print(f"[yellow]note[/]: {weights.source} was trained with another recipe (hash {weights.recipe_hash}, this one's is {r.hash()})")
    cfg = dataclasses.replace(r.eval, scales=scale_list or tuple(r.eval.scales), flip=r.eval.flip if flip is None else flip)
    folder = _prediction_folder(save_predictions)

    start = time.perf_counter()
    splits = load_splits(r, progress=not quiet)
    rt = make_runtime(r.runtime)
    if rt.distributed:
        raise UserError("eval: runs in one process (one GPU is plenty for an evaluation); start it without torchrun")
    model = rt.prepare_module(model)
    loader = eval_loader(splits.val, cfg, rt, rt.loader_workers(r.data.workers))
    writer = PaletteWriter(folder, splits.val, palette(r.data.dataset)) if folder is not None else None
    metrics, cm = evaluate(model, loader, splits.num_classes, cfg, progress=not quiet, rt=rt, on_batch=writer, normalize=splits.normalize)
    seconds = time.perf_counter() - start
    result = EvalResult(
        metrics=metrics,
        confusion=cm,
        class_names=list(splits.class_names),
        setting=Metric.eval_setting(cfg.scales, cfg.flip),
        scales=tuple(cfg.scales),
        flip=cfg.flip,
        images=len(splits.val),
        dataset=r.data.dataset,
        model=description,
        checkpoint=weights.source,
        run_id=weights.run_id or "",
        new_run=weights.run_id is None,
        predictions=folder,
        seconds=seconds,
    )
    result.run_id = _log(result, r, uri, weights, rt.describe())
    return result


def _prediction_folder(folder: str | Path | None) -> Path | None:
    if folder is None:
        return None
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--save-predictions: cannot write in {path} ({err.strerror or err}); choose another folder") from None
    return path


class PaletteWriter:
    """Writes the predicted class ids of each image of a split as a PNG in mode "P" (pixel value =
    class id, ``colors`` the palette), named after the image id (``<id>.png``), else its index;
    ``engine.evaluate`` calls it with every batch and its images' indices in the split."""

    def __init__(self, folder: Path, dataset: Any, colors: list[int]) -> None:
        ids = getattr(dataset, "ids", None)
        self.names = list(ids) if ids is not None and len(ids) == len(dataset) else [f"{i:05d}" for i in range(len(dataset))]
        self.folder, self.colors = folder, colors
        self.written: list[Path] = []

    def __call__(self, pred: torch.Tensor, indices: list[int]) -> None:
        from PIL import Image

        for label_map, index in zip(pred.to(torch.uint8).cpu().numpy(), indices, strict=True):
            png = Image.fromarray(label_map)
            png.putpalette(self.colors)
            self.written.append(self.folder / f"{Path(str(self.names[index])).name}.png")
            png.save(self.written[-1])


def _log(result: EvalResult, recipe: Any, uri: str, weights: Weights, runtime_tags: dict[str, str]) -> str:
    """The metrics and ``evaluations/SETTING.json`` on the weights' run, or on a new run (role eval,
    with the recipe, so `kdbench eval RUN_ID` can repeat it) when they belong to none."""
    from kdbench.recipe import dump_yaml, flatten
    from kdbench.tracking import Tracker

    m, setting = result.metrics, result.setting
    values = {Metric.evaluation(setting, Metric.MIOU): m.miou, Metric.evaluation(setting, Metric.PIXEL_ACC): m.pixel_acc}
    values |= {Metric.evaluation(setting, Metric.iou(n)): v for n, v in zip(result.class_names, m.iou) if v == v}  # NaN: absent class
    tracker = Tracker(uri, recipe.tracking.experiment or f"kdbench-{recipe.benchmark}")
    role, arch = result.model.split(" ", 1)
    if weights.run_id is None:
        tags = {
            Tag.ROLE: Role.EVAL,
            Tag.EVALUATED: role,
            Tag.DATASET: recipe.data.dataset,
            Tag.STUDENT: arch,
            Tag.RECIPE_HASH: recipe.hash(),
            Tag.EVAL_SPLIT: "val",
            Tag.CHECKPOINT: weights.source,
            **runtime_tags,
        }
        tracker.start(f"eval-{arch.replace('/', '-')}", tags, flatten(recipe.to_dict()))
        tracker.log_text(dump_yaml(recipe), Artifact.RECIPE)
    else:
        tracker.run_id = weights.run_id  # logged beside the run's own results; its status stays as it is
    tracker.log_metrics(values, weights.step)
    record = {
        "checkpoint": weights.source,
        "model": result.model,
        "scales": list(result.scales),
        "flip": result.flip,
        "images": result.images,
        "recipe_hash": recipe.hash(),
        "miou": m.miou,
        "pixel_acc": m.pixel_acc,
        "iou": dict(zip(result.class_names, m.iou)),
        "class_names": result.class_names,
        "rows_true_cols_pred": result.confusion.tolist(),
    }
    tracker.log_dict(record, f"{Artifact.EVALUATIONS}/{setting}.json")
    if weights.run_id is None:
        tracker.end("FINISHED")
    return tracker.run_id


def print_summary(result: EvalResult, out: Console) -> None:
    """mIoU, pixel accuracy and per-class IoU by class name, and where the result went."""
    from kdbench.progress import per_class_table

    m = result.metrics
    how = f"scales {', '.join(f'{s:g}' for s in result.scales)}" + (", flipped" if result.flip else "")
    title = f"{result.model} on {result.dataset} val ({result.images} images; {how}): mIoU {100 * m.miou:.2f}, pixel acc {100 * m.pixel_acc:.2f}"
    out.print(per_class_table(title, result.class_names, m.iou))
    where = "a new MLflow run" if result.new_run else "MLflow run"
    out.print(f"logged to {where} {result.run_id} as {Metric.evaluation(result.setting, '*')}", markup=False, highlight=False)
    if result.predictions is not None:
        out.print(f"predictions: {result.images} PNG files in {result.predictions}", markup=False, highlight=False)
