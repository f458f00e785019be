"""One run: a recipe in, metrics out. `kdbench run`, `kdbench teacher` and tuning all call this.

    recipe -> data splits -> teacher (loaded, or trained once and cached) -> student -> method
           -> engine loop (evaluation through callbacks) -> final evaluation -> MLflow
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console

from kdbench.checkpoint import load, save_atomic, verify_checksum, write_checksum
from kdbench.data import Splits, load_splits, resolve_cache_dir
from kdbench.engine import BEST_FILE, LoopHooks, best_miou, best_weights, build_state, close_loader, eval_loader, evaluate, load_state, run_loop
from kdbench.errors import Stopped, UserError
from kdbench.folders import exclusive, writable_folder
from kdbench.methods import get_method_class, method_for, resolve_config
from kdbench.metrics import SegMetrics
from kdbench.models import RELEASED, build_model, from_released
from kdbench.models.complexity import multiply_adds
from kdbench.progress import make_console, per_class_table
from kdbench.recipe import ModelConfig, Recipe, dump_yaml, flatten, teacher_key, teacher_recipe
from kdbench.runtime import Runtime, make_runtime
from kdbench.schema import Artifact, Metric, Role, Tag
from kdbench.outputs import tracking_uri
from kdbench.tracking import NullTracker, Tracker, check_reachable

console = Console(stderr=True)


@dataclass
class RunResult:
    run_id: str | None
    metrics: SegMetrics
    class_names: list[str]
    seconds: float
    checkpoint: Path


def cache_dir(recipe: Recipe) -> Path:
    return resolve_cache_dir(recipe.cache_dir)


def _model_meta(cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    keys = ("arch", "backbone", "output_stride", "aspp_channels", "decoder_channels", "low_channels", "attention_taps")
    meta = {k: getattr(cfg, k) for k in keys}
    meta["attention_taps"] = list(meta["attention_taps"])
    return {**meta, "num_classes": num_classes}


def initial_student(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    """The student as training starts, from ``student.init_seed`` (else the run's seed); it leaves
    the global RNG, which dropout and the method's own modules draw from, seeded by the run's seed."""
    init_seed = recipe.student.init_seed
    torch.manual_seed(recipe.seed if init_seed is None else init_seed)
    student = build_model(recipe.student, num_classes)
    if init_seed is not None:
        torch.manual_seed(recipe.seed)
    return student


# ---------------------------------------------------------------------------------------------
# teachers


def teacher_cache_path(recipe: Recipe) -> Path:
    return cache_dir(recipe) / "teachers" / teacher_key(recipe) / "teacher.pt"


def load_teacher(recipe: Recipe, path: Path, num_classes: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A frozen teacher in eval mode; a checkpoint that does not fit the recipe is a UserError."""
    ckpt = load(path, "teacher.checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model", {}), dict):
        raise UserError(f"teacher.checkpoint: {path} holds a {type(ckpt).__name__}, not a model checkpoint (a state_dict, or a dict with 'model' and 'meta')")
    state, meta = (ckpt["model"], ckpt.get("meta", {})) if "model" in ckpt else (ckpt, {})
    expected = _model_meta(recipe.teacher, num_classes)
    for key in ("arch", "backbone", "num_classes", "attention_taps"):
        if key in meta and meta[key] != expected[key]:
            raise UserError(f"teacher.checkpoint: {path} has {key}={meta[key]!r} but the recipe wants {expected[key]!r}")
    model = build_model(recipe.teacher, num_classes, pretrained=False)  # the checkpoint holds every weight
    ref = model.state_dict()
    if recipe.teacher.arch in RELEASED and "model" not in ckpt and set(state) != set(ref):
        try:  # a teacher file as the released code saved it (AttnFD's teacher-pascal.pth.tar, CIRKD's *_best_model.pth)
            state = from_released(recipe.teacher.arch, state)
        except UserError as err:
            raise UserError(f"teacher.checkpoint: {path}: {err}") from None
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    wrong = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or wrong:
        first = (wrong or missing or unexpected)[:3]
        raise UserError(
            f"teacher.checkpoint: {path} does not fit teacher {recipe.teacher.arch}/{recipe.teacher.backbone} with "
            f"{num_classes} classes ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} mis-shaped keys, e.g. {first})"
        )
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model, meta


def ensure_teacher(recipe: Recipe, splits: Splits, quiet: bool = False, rt: Runtime | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The recipe's teacher checkpoint, or the cached teacher of this recipe, trained now if absent
    (by all processes of a multi-GPU run together; rank 0 decides and writes)."""
    rt = rt or make_runtime(recipe.runtime)
    if recipe.teacher.checkpoint:
        return load_teacher(recipe, Path(recipe.teacher.checkpoint), splits.num_classes)
    train_teacher_once(recipe, splits, quiet, rt)
    return load_cached_teacher(recipe, splits.num_classes)


def load_cached_teacher(recipe: Recipe, num_classes: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The cached teacher, checked against its checksum and loaded; a damaged one is never used."""
    path = teacher_cache_path(recipe)
    problem = verify_checksum(path)
    if problem is None:
        try:
            model, meta = load_teacher(recipe, path, num_classes)
        except UserError as err:
            problem = str(err).split(": ", 1)[-1]
        else:
            if not Path(f"{path}.sha256").is_file():  # cached before checksums: it loaded, so keep its sum from now on
                write_checksum(path)
            return model, meta
    raise UserError(
        f"the cached teacher {path} is damaged ({problem}); train it again with `kdbench teacher --retrain` "
        "and the recipe and --set options of this run"
    )


def train_teacher_once(recipe: Recipe, splits: Splits | None = None, quiet: bool = False, rt: Runtime | None = None, retrain: bool = False) -> RunResult | None:
    """Train and cache the recipe's teacher unless it is cached (None then; ``retrain``: train it
    anew all the same). Runs that start together on one cache (a sweep's workers, two terminals)
    train it once: the first holds a file lock, the others wait for it and then load what it wrote."""
    rt = rt or make_runtime(recipe.runtime)
    check_reachable(tracking_uri(recipe.tracking.uri, recipe.output_dir))  # before any message or work, not after the teacher's data
    path = teacher_cache_path(recipe)
    with _cache_lock(path, rt):
        if retrain and rt.is_main:
            for old in (path, Path(f"{path}.sha256"), path.parent / "last.pt"):
                old.unlink(missing_ok=True)
        if rt.broadcast(path.is_file()):
            return None
        t = recipe.teacher
        if rt.is_main:
            console.print(
                f"[bold]No trained teacher for this recipe yet[/]: training {t.arch}/{t.backbone} for {t.iterations} "
                f"iterations once; it is cached at {path} and reused by every later run."
            )
        return train_teacher(recipe, splits, quiet=quiet, rt=rt)


@contextmanager
def _cache_lock(path: Path, rt: Runtime) -> Iterator[None]:
    """An exclusive lock on a teacher's cache folder, held by the main process of a run (the other
    processes of a multi-GPU run train with it)."""
    if not rt.is_main:
        yield
        return
    with exclusive(path.parent / "training.lock", f"Another process is training this teacher ({path.parent}); waiting for it to finish"):
        yield


def train_teacher(recipe: Recipe, splits: Splits | None = None, quiet: bool = False, rt: Runtime | None = None) -> RunResult:
    """Train the recipe's teacher with the task loss alone and cache it (resumes if killed). It
    learns from ``teacher_recipe(recipe)``: the student's data, or the synthetic set's teacher labels."""
    rt = rt or make_runtime(recipe.runtime)
    if teacher_recipe(recipe) is not recipe:
        recipe, splits = teacher_recipe(recipe), None  # the same images with the teacher's labels
    splits = splits or _splits(recipe, rt, quiet)
    t = recipe.teacher
    torch.manual_seed(t.seed)
    model = build_model(t, splits.num_classes)
    train_cfg = dataclasses.replace(recipe.train, iterations=t.iterations, lr=t.lr or recipe.train.lr, eval_interval=0)
    path = teacher_cache_path(recipe)
    result = _train(
        recipe,
        role="teacher",
        model=model,
        model_cfg=t,
        method=None,
        method_name="none",
        teacher=None,
        splits=splits,
        train_cfg=train_cfg,
        seed=t.seed,
        run_dir=path.parent,
        resume=True,
        quiet=quiet,
        run_name=f"teacher-{t.arch}-{t.backbone}",
        rt=rt,
        weights_file=path,
    )
    if rt.is_main:
        meta = {**_model_meta(t, splits.num_classes), "miou": result.metrics.miou, "mlflow_run_id": result.run_id}
        save_atomic({"model": model.state_dict(), "meta": meta}, path)
        write_checksum(path)
        (path.parent / "last.pt").unlink(missing_ok=True)  # the resume point is of no use once cached
    rt.barrier()  # the others load it next
    return result


def _splits(recipe: Recipe, rt: Runtime, quiet: bool) -> Splits:
    with rt.main_first():  # rank 0 generates the synthetic data once; the others read it
        return load_splits(recipe, progress=not quiet and rt.is_main)


# ---------------------------------------------------------------------------------------------
# students


def run(
    recipe: Recipe,
    *,
    resume: bool = False,
    quiet: bool = False,
    parent_run_id: str | None = None,
    eval_split: Literal["val", "holdout"] = "val",
    on_eval: Callable[[int, SegMetrics], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    extra_tags: dict[str, str] | None = None,
) -> RunResult:
    """Distil the recipe's teacher into its student with the recipe's method."""
    rt = make_runtime(recipe.runtime)
    check_reachable(tracking_uri(recipe.tracking.uri, recipe.output_dir))  # a server that is not there: one line now, not after data and teacher
    m = recipe.method
    run_dir = Path(recipe.output_dir) / f"{m.name}-{recipe.hash()}"
    if resume and not rt.broadcast((run_dir / "last.pt").is_file()):  # before any work: a typo'd --set or
        # another seed names another run, which would silently start afresh
        raise UserError(f"--resume: no checkpoint of this recipe at {(run_dir / 'last.pt').resolve()}; run without --resume to start it")
    splits = _splits(recipe, rt, quiet)
    needs_teacher = get_method_class(m.name).needs_teacher
    teacher, teacher_meta = ensure_teacher(recipe, splits, quiet, rt) if needs_teacher else (None, {})
    student = initial_student(recipe, splits.num_classes)
    _, cfg = resolve_config(m.name, m.preset, m.params)
    method = method_for(m.name, cfg, student, teacher, splits.num_classes)
    tags = {Tag.ROLE: Role.STUDENT, Tag.TEACHER_MIOU: f"{teacher_meta.get('miou', float('nan')):.6f}", **(extra_tags or {})}
    if teacher_meta.get("mlflow_run_id"):
        tags[Tag.TEACHER_RUN] = teacher_meta["mlflow_run_id"]
    return _train(
        recipe,
        role="student",
        model=student,
        model_cfg=recipe.student,
        method=method,
        method_name=m.name,
        teacher=teacher,
        splits=splits,
        train_cfg=recipe.train,
        seed=recipe.seed,
        run_dir=run_dir,
        resume=resume,
        quiet=quiet,
        run_name=f"{m.name}-{m.preset}-seed{recipe.seed}",
        parent_run_id=parent_run_id,
        eval_split=eval_split,
        on_eval=on_eval,
        after_step=after_step,
        extra_tags=tags,
        rt=rt,
    )


def _train(
    recipe: Recipe,
    *,
    role: str,
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    method: Any,
    method_name: str,
    teacher: torch.nn.Module | None,
    splits: Splits,
    train_cfg: Any,
    seed: int,
    run_dir: Path,
    resume: bool,
    quiet: bool,
    run_name: str,
    parent_run_id: str | None = None,
    eval_split: str = "val",
    on_eval: Callable[[int, SegMetrics], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    extra_tags: dict[str, str] | None = None,
    rt: Runtime,
    weights_file: Path | None = None,
) -> RunResult:
    """The tracked training of one model (student or teacher), resumable from ``run_dir/last.pt``.
    Every process of a multi-GPU run calls it; only rank 0 talks to MLflow and writes files."""
    eval_set = splits.holdout if eval_split == "holdout" else splits.val
    if eval_set is None:
        raise UserError("data.holdout_fraction: evaluating on the held-out split needs data.holdout_fraction > 0")
    steps_per_epoch = max(1, len(splits.train) // train_cfg.batch_size)
    state = build_state(model, method, teacher, train_cfg, rt, steps_per_epoch, normalize=splits.normalize)
    quiet = quiet or not rt.is_main
    ckpt_path = run_dir / "last.pt"
    if rt.is_main:
        writable_folder(run_dir, "output_dir")
    run_id = None
    if resume and rt.broadcast(ckpt_path.is_file()):
        ckpt = load(ckpt_path, "--resume")
        if ckpt.get("recipe_hash") != recipe.hash():
            raise UserError(f"--resume: {ckpt_path} was written by a different recipe; drop --resume to start over")
        load_state(state, ckpt)
        run_id = ckpt.get("mlflow_run_id")
        if not quiet:
            console.print(f"Resuming {run_name} from step {state.step}/{state.total_steps} ({ckpt_path})")

    experiment = recipe.tracking.experiment or f"kdbench-{recipe.benchmark}"
    tracker = Tracker(recipe.tracking.uri, experiment, recipe.output_dir) if rt.is_main else NullTracker()
    d = recipe.data
    tags = {
        Tag.ROLE: role,
        Tag.METHOD: method_name,
        Tag.PRESET: str(recipe.method.preset) if role == Role.STUDENT else "-",
        Tag.DATASET: d.dataset,
        Tag.TEACHER: f"{recipe.teacher.arch}/{recipe.teacher.backbone}",
        Tag.STUDENT: f"{model_cfg.arch}/{model_cfg.backbone}",
        Tag.SEED: str(seed),
        Tag.RECIPE_HASH: recipe.hash(),
        Tag.EVAL_SPLIT: eval_split,
        **({Tag.CHECKPOINT: str(ckpt_path.resolve())} if role == Role.STUDENT else {}),  # `kdbench plot` loads it
        **rt.describe(),
        **(extra_tags or {}),
    }
    run_id = tracker.start(run_name, tags, flatten(recipe.to_dict()), run_id=run_id, parent_run_id=parent_run_id)
    tracker.keep_log(run_dir / Artifact.RUN_LOG)
    if state.step:
        tracker.note(f"resumed from step {state.step} ({ckpt_path})")
    start = time.perf_counter()
    workers = rt.loader_workers(d.workers)
    evaluation = eval_loader(eval_set, recipe.eval, rt, workers)  # one for the whole run: its workers persist

    def eval_hook(step: int, metrics: SegMetrics) -> None:
        if on_eval is not None:
            on_eval(step, metrics)

    hooks = LoopHooks(
        log=tracker.log_metrics,
        on_eval=eval_hook,
        after_step=after_step or (lambda step: None),
        checkpoint_extra={"recipe_hash": recipe.hash(), "mlflow_run_id": run_id},
    )
    try:
        run_loop(
            state,
            splits.train,
            evaluation,
            splits.num_classes,
            train_cfg,
            recipe.eval,
            seed,
            ckpt_path,
            hooks,
            workers=workers,
            progress=not quiet,
            label=f"{role} {run_name}",
        )
        metrics, cm = evaluate(model, evaluation, splits.num_classes, recipe.eval, progress=not quiet, rt=rt, normalize=splits.normalize)
        if train_cfg.select == "best" and (best := best_weights(state, metrics.miou, ckpt_path)) is not None:
            model.load_state_dict(best[1])  # the run ends with, and reports, its best evaluation's weights
            metrics, cm = evaluate(model, evaluation, splits.num_classes, recipe.eval, progress=not quiet, rt=rt, normalize=splits.normalize)
            tracker.log_metrics({Metric.SELECTED_STEP: best[0]}, state.step)
            if role == Role.STUDENT:
                weights_file = ckpt_path.with_name(BEST_FILE)
                tracker.set_tags({Tag.CHECKPOINT: str(weights_file.resolve())})
        eval_hook(state.step, metrics)
        if rt.is_main:
            _log_final(tracker, recipe, metrics, cm, splits.class_names, model, run_dir, state.step)
    except KeyboardInterrupt:
        tracker.end("KILLED", "interrupted; continue with --resume")
        raise
    except Stopped as err:
        tracker.set_tags(err.tags)
        tracker.end("KILLED", str(err))
        raise
    except BaseException as err:
        tracker.end("FAILED", "".join(traceback.format_exception_only(err)).strip())
        raise
    finally:
        close_loader(evaluation)
    tracker.end("FINISHED")
    seconds = time.perf_counter() - start
    if not quiet:
        # a teacher's weights end in the cache file (saved by the caller), a student's in its checkpoint
        _summary(run_name, metrics, state.history, splits.class_names, seconds, weights_file or ckpt_path, run_id)
    return RunResult(run_id, metrics, list(splits.class_names), seconds, ckpt_path)


def _summary(
    run_name: str, metrics: SegMetrics, history: list[dict[str, float]], class_names: list[str], seconds: float, ckpt: Path, run_id: str | None
) -> None:
    """What a researcher looks for when a run ends: the numbers, where the weights are, how to open the run."""
    import mlflow

    best = best_miou(metrics.miou, history)
    title = f"{run_name}: mIoU {100 * metrics.miou:.2f} (best {100 * best:.2f}), pixel acc {100 * metrics.pixel_acc:.2f}, {seconds:.0f} s"
    out = make_console()
    out.print(per_class_table(title, class_names, metrics.iou))
    out.print(f"weights: {ckpt.resolve()}", markup=False, highlight=False)
    uri = mlflow.get_tracking_uri()
    out.print(f"MLflow run {run_id}; to browse: mlflow ui --backend-store-uri {uri}", markup=False, highlight=False)


def _log_final(
    tracker: Tracker,
    recipe: Recipe,
    metrics: SegMetrics,
    cm: torch.Tensor,
    class_names: list[str],
    model: torch.nn.Module,
    run_dir: Path,
    step: int,
) -> None:
    final = {
        Metric.MIOU: metrics.miou,
        Metric.PIXEL_ACC: metrics.pixel_acc,
        Metric.PARAMS: sum(p.numel() for p in model.parameters()),
        Metric.MULTIPLY_ADDS: multiply_adds(model, recipe.train.crop_size),
    }
    for name, iou in zip(class_names, metrics.iou):
        if iou == iou:  # NaN: the class never occurs in this split
            final[f"iou/{name}"] = iou
    tracker.log_metrics(final, step)
    tracker.log_text(dump_yaml(recipe), "recipe.yaml")
    tracker.log_dict({"class_names": list(class_names), "rows_true_cols_pred": cm.tolist()}, "confusion_matrix.json")
    tracker.log_dict({"miou": metrics.miou, "pixel_acc": metrics.pixel_acc, "iou": dict(zip(class_names, metrics.iou))}, "metrics.json")
    if recipe.tracking.log_checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "model.pt"
            torch.save(model.state_dict(), p)
            tracker.log_file(p)
