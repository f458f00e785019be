"""The `kdbench` command line. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from kdbench.errors import UserError
from kdbench.outputs import study_storage

app = typer.Typer(
    help="kdbench: knowledge distillation for semantic segmentation, every method on the same models, "
    "data, recipe and evaluation, every run in MLflow.\n\n"
    "Start with `kdbench run --method attnfd` (the embedded synthetic benchmark; the teacher is trained "
    "once and cached). `kdbench methods` lists methods, presets and hyper-parameters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",  # docstrings reflow to the terminal's width; a blank line is a paragraph
)


def _flags_without_a_type() -> None:
    """typer (0.29) shows every option's type, `--resume <bool>` too, as if a flag took a value:
    show none for flags."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None:  # older typer (the GPU machines' 0.2x) has no such hook: nothing to change
        return
    TyperOption.display_type_rich = lambda self, ctx: None if getattr(self, "is_flag", False) else shown(self, ctx)


_flags_without_a_type()
# wide enough for tables when the output is a file or a pipe (logs, CI), where rich assumes 80 columns
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)

RecipeOpt = Annotated[
    Optional[str],
    typer.Option("--recipe", "-r", help="Recipe name (recipes/NAME.yaml) or path to a YAML file. Default: the embedded benchmark."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override any recipe key, e.g. --set train.lr=0.02 --set method.temperature=4 (repeatable)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (for scripts and logs).")]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", help="auto (a GPU if there is one), cpu, cuda or cuda:N; same as --set runtime.device=..."),
]
PrecisionOpt = Annotated[
    Optional[str],
    typer.Option("--precision", help="auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16; losses stay float32. Same as --set runtime.precision=..."),
]
CompileOpt = Annotated[
    Optional[bool],
    typer.Option("--compile/--no-compile", help="torch.compile student, teacher and method (slow first steps). Same as --set runtime.compile=..."),
]


def _show_version(value: bool) -> None:
    if value:
        import kdbench

        print(f"kdbench {kdbench.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


def runtime_overrides(device: str | None, precision: str | None, compile_: bool | None) -> list[str]:
    """The runtime flags as --set overrides, so the recipe (and its hash) records them."""
    out = []
    if device is not None:
        out.append(f"runtime.device={device}")
    if precision is not None:
        out.append(f"runtime.precision={precision}")
    if compile_ is not None:
        out.append(f"runtime.compile={str(compile_).lower()}")
    return out


@app.command()
def run(
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Distillation method (see `kdbench methods`); default: the recipe's.")] = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Method preset, same as --set method.preset=NAME.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the student run (data order, init, augmentation).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue this recipe's killed run from its last checkpoint.")] = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    compile_: CompileOpt = None,
    from_study: Annotated[Optional[str], typer.Option("--from-study", help="Use the best trial of this `kdbench tune` study (its method, preset, --set and values).")] = None,
    storage: Annotated[str, typer.Option(help="The study's Optuna storage (with --from-study).")] = study_storage(),
    quiet: QuietOpt = False,
) -> None:
    """Distil the teacher into the student with one method and log the run to MLflow.

    Trains the teacher first if the recipe names no checkpoint and none is cached. Ends with a
    summary: final and best mIoU, pixel accuracy, per-class IoU, the weights file and the command that
    opens the run in the MLflow UI. Everything (loss terms, lr, throughput, confusion matrix, the
    resolved recipe, a plain-text log) is in the MLflow run. On several GPUs: torchrun --nproc_per_node=N -m kdbench run ...
    (train.batch_size is the global batch).
    """
    from kdbench.recipe import load_recipe
    from kdbench.runtime import is_main_process

    overrides = runtime_overrides(device, precision, compile_) + list(set_ or [])
    if from_study:
        from kdbench.tune import from_study as best_of

        study_method, study_preset, study_recipe, study_sets = best_of(from_study, storage)
        if method and method != study_method:
            raise UserError(f"--from-study: study {from_study!r} tuned {study_method!r}, not {method!r}")
        method, preset, recipe = study_method, preset or study_preset, recipe or study_recipe
        overrides = study_sets + overrides  # the user's own --set still wins
    r = load_recipe(recipe, overrides, method=method, preset=preset, seed=seed)
    from kdbench.run import run as run_fn  # after the recipe: a bad one fails before MLflow and the data code load

    result = run_fn(r, resume=resume, quiet=quiet)
    if not is_main_process():
        return
    out.print(
        f"{r.method.name} ({r.method.preset}) seed {r.seed}: mIoU {100 * result.metrics.miou:.2f}  "
        f"pixel acc {100 * result.metrics.pixel_acc:.2f}  [{result.seconds:.0f} s, MLflow run {result.run_id}]"
    )


@app.command()
def teacher(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    quiet: QuietOpt = False,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train it again even if cached (a damaged cache entry).")] = False,
) -> None:
    """Train the recipe's teacher once and cache it (also done automatically by `kdbench run`)."""
    from kdbench.recipe import load_recipe
    from kdbench.run import teacher_cache_path, train_teacher_once

    r = load_recipe(recipe, overrides=runtime_overrides(device, precision, None) + list(set_ or []))
    if r.teacher.checkpoint:
        raise UserError(f"teacher.checkpoint: this recipe uses the trained teacher {r.teacher.checkpoint}; nothing to train")
    path = teacher_cache_path(r)
    result = train_teacher_once(r, quiet=quiet, retrain=retrain)
    if result is None:
        out.print(f"Teacher already trained and cached: {path}")
        return
    out.print(f"teacher {r.teacher.arch}/{r.teacher.backbone}: mIoU {100 * result.metrics.miou:.2f} -> {path}")


@app.command("eval")
def eval_(
    checkpoint: Annotated[
        str,
        typer.Argument(
            metavar="CHECKPOINT_OR_RUN_ID",
            help="The weights: a run folder's last.pt (or the folder), a cached teacher's teacher.pt, a model.pt state_dict, "
            "or an MLflow run id (its kdbench.checkpoint).",
        ),
    ],
    recipe: Annotated[
        Optional[str],
        typer.Option("--recipe", "-r", help="Recipe name or YAML file to evaluate with. Default: the one the checkpoint's run was made with (its recipe.yaml); for weights of no run, the embedded benchmark."),
    ] = None,
    set_: SetOpt = None,
    scales: Annotated[Optional[str], typer.Option("--scales", help="Input scales whose class probabilities are averaged, comma-separated, e.g. 0.5,0.75,1,1.25,1.5,1.75. Default: the recipe's eval.scales.")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Also average the horizontally flipped image at every scale. Default: the recipe's eval.flip.")] = None,
    save_predictions: Annotated[Optional[str], typer.Option("--save-predictions", help="Also write one PNG per val image to this folder: the predicted class ids in palette mode with the dataset's colours, named after the image id.")] = None,
    device: DeviceOpt = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store holding the run and getting the result; default: $MLFLOW_TRACKING_URI, else ./kdbench-out/mlflow.db, and for a run's checkpoint whose run is not there, the store of the output folder it sits in.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a trained student or teacher on the val split, at several scales and/or flipped as papers report.

    The result goes to the checkpoint's MLflow run as eval/SETTING/miou, eval/SETTING/pixel_acc and
    eval/SETTING/iou/CLASS, SETTING naming the scales and the flip (eval/s1_flip/miou,
    eval/s0.5_0.75_1_1.25_1.5_1.75_flip/miou), with evaluations/SETTING.json (confusion matrix); the
    run's own miou is never overwritten. Weights that belong to no run get a new run (role eval).
    """
    from kdbench.evaluate import evaluate_checkpoint, print_summary

    overrides = runtime_overrides(device, None, None) + list(set_ or [])
    result = evaluate_checkpoint(
        checkpoint, recipe=recipe, overrides=overrides, scales=scales, flip=flip, save_predictions=save_predictions, tracking_uri=tracking_uri, quiet=quiet
    )
    print_summary(result, out)


@app.command()
def bench(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    method: Annotated[
        Optional[list[str]],
        typer.Option("--method", "-m", help="Only these methods (repeatable): NAME for all its presets, NAME:PRESET for one; default: all."),
    ] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    compile_: CompileOpt = None,
    steps: Annotated[int, typer.Option(help="Timed steps per row in each round.")] = 5,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds (every row once per round); the spread is over rounds.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps per row first (autotuning, compilation).")] = 3,
    loader_batches: Annotated[int, typer.Option(help="Batches read to time the recipe's data loader (0: skip).")] = 20,
    eval_images: Annotated[int, typer.Option(help="Images the student evaluates per round, at batch 1 and at eval.batch_size (0: skip).")] = 32,
    eval_size: Annotated[
        Optional[str], typer.Option(help="H,W of the evaluated images, e.g. 513,684 (a 375x500 VOC image at eval.resize_short 513); default: the crop.")
    ] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    profile: Annotated[int, typer.Option(help="Also profile every row and show its N costliest operations (device time on a GPU).")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Time one training step of every method and preset against the floor (teacher forward + plain
    student step) on the recipe's models, batch and crop, with random tensors and random weights (no
    dataset, teacher or weights file needed).

    Presets with the same options are one row ('default = cirkd'); '*' marks what `kdbench run
    --method NAME` gets. Rows are interleaved over rounds; ratios to the floor are taken within each
    round and shown as median [min-max]; '~' marks a ratio whose spread reaches 1, or lies below 1 for
    a method that runs the teacher (noise: such a step cannot be cheaper than the floor). Where a row
    runs its teacher in train mode (AttnFD 'code'), a second floor does too, and a line gives that
    row's ratio to it: its distillation terms' cost apart from the teacher's mode. On a GPU
    the table also shows the extra memory one step allocates. A second table times the student's
    evaluation (the run's eval loader, scales and flip) per image at batch 1 and at eval.batch_size.
    A line gives the models' multiply-adds per image at the crop and the rate the floor's step
    reaches (TFLOP/s, a backward counted as two forwards: against the device's peak, how busy it is).
    The loader line times the recipe's training data with its workers.
    """
    import json
    from pathlib import Path

    from kdbench.bench import bench_recipe, benchmark, print_result

    if min(steps, rounds) < 1 or min(warmup, loader_batches, eval_images) < 0:
        raise UserError("bench: --steps and --rounds must be at least 1, --warmup, --loader-batches and --eval-images at least 0")
    size = None
    if eval_size is not None:
        parts = eval_size.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"--eval-size: expected H,W in pixels such as 513,684, got {eval_size!r}")
        size = (int(parts[0]), int(parts[1]))
    r = bench_recipe(recipe, runtime_overrides(device, precision, compile_) + list(set_ or []))
    result = benchmark(
        r, method, steps=steps, rounds=rounds, warmup=warmup, loader_batches=loader_batches, profile=profile, quiet=quiet, eval_images=eval_images, eval_size=size
    )
    print_result(result, out)
    if json_out:
        Path(json_out).write_text(json.dumps(result.to_dict(), indent=1))
        out.print(f"JSON: {json_out}")


@app.command()
def tune(
    method: Annotated[str, typer.Option("--method", "-m", help="The method whose hyper-parameters are searched.")],
    param: Annotated[
        list[str],
        typer.Option(
            "--param",
            "-p",
            help="Searched parameter (repeatable): NAME (the method's declared range), NAME=LOW:HIGH[:log], "
            "NAME=int:LOW:HIGH, NAME=a,b,c; NAME may be a recipe key, e.g. train.lr=1e-3:1e-1:log.",
        ),
    ],
    trials: Annotated[int, typer.Option(help="Trials the study should hold (a resumed study runs only the missing ones).")] = 20,
    study: Annotated[Optional[str], typer.Option(help="Study name; an existing study in --storage is resumed. Default: METHOD-BENCHMARK.")] = None,
    storage: Annotated[str, typer.Option(help="Optuna storage: sqlite:///FILE.db, postgresql://..., or journal:FILE.log. Never MLflow's own file.")] = study_storage(),
    sampler: Annotated[str, typer.Option(help="tpe (seeded), random, grid (over NAME=a,b,c lists), gp or cmaes.")] = "tpe",
    pruner: Annotated[str, typer.Option(help="median, hyperband or none; trials report every evaluation (train.eval_interval).")] = "median",
    budget_iters: Annotated[Optional[int], typer.Option(help="Train each trial for this many iterations instead of the recipe's.")] = None,
    seeds: Annotated[str, typer.Option(help="Seeds averaged per trial, e.g. 0,1.")] = "0",
    n_jobs: Annotated[int, typer.Option(help="Processes on this machine sharing the study (the same command on other machines shares it too).")] = 1,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Method preset the search starts from.")] = None,
    worker: Annotated[bool, typer.Option("--worker", hidden=True)] = False,
    quiet: QuietOpt = False,
) -> None:
    """Search a method's hyper-parameters with Optuna; every trial is a run logged to MLflow.

    Trials train on the training split minus a held-out part (data.holdout_fraction, 0.1 unless the
    recipe sets it) and are scored by its mIoU, never by the val split that tables report. The
    study is one MLflow parent run (search space, best values, Optuna's plots) with one child run per
    trial. At the end: the best trials, and a recipe file and command that rerun the best values on
    the full training split (or `kdbench run --from-study NAME`).
    """
    import sys

    from kdbench.recipe import load_recipe
    from kdbench.tune import StudySpec, parse_param
    from kdbench.tune import tune as tune_fn

    if sampler not in ("tpe", "random", "grid", "gp", "cmaes"):
        raise UserError(f"--sampler: expected tpe, random, grid, gp or cmaes, got {sampler!r}")
    if pruner not in ("median", "hyperband", "none"):
        raise UserError(f"--pruner: expected median, hyperband or none, got {pruner!r}")
    if trials < 1 or n_jobs < 1 or (budget_iters is not None and budget_iters < 1):
        raise UserError("tune: --trials, --n-jobs and --budget-iters must be at least 1")
    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, e.g. 0,1, got {seeds!r}") from None
    base = load_recipe(recipe, list(set_ or []), method=method, preset=preset)
    params = tuple(parse_param(p, method) for p in param)
    if len({p.name for p in params}) != len(params):
        raise UserError("--param: a parameter is named twice")
    spec = StudySpec(
        recipe=recipe,
        method=method,
        preset=preset,
        sets=tuple(set_ or []),
        params=params,
        trials=trials,
        study=study or f"{method}-{base.benchmark}",
        storage=storage,
        sampler=sampler,  # type: ignore[arg-type]
        pruner=pruner,  # type: ignore[arg-type]
        budget_iters=budget_iters,
        seeds=seed_list,
    )
    argv = [a for a in sys.argv[1:] if a not in ("--worker", "--quiet", "-q")] + ["--quiet"]
    result = tune_fn(spec, quiet=quiet, n_jobs=n_jobs, worker_argv=argv, worker=worker)
    if worker:
        return
    import optuna

    done = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    done.sort(key=lambda t: t.value, reverse=True)
    table = Table(title=f"study {spec.study}: {len(result.study.trials)} trials in {storage} (held-out mIoU, %)")
    for col in ("rank", "trial", "held-out mIoU", *[p.name for p in params]):
        table.add_column(col, justify="right")
    for rank, t in enumerate(done[:10], 1):
        table.add_row(str(rank), str(t.number), f"{100 * t.value:.2f}", *[f"{t.params[p.name]:.4g}" if isinstance(t.params[p.name], float) else str(t.params[p.name]) for p in params])
    out.print(table)
    states = ", ".join(f"{n} {k}" for k, n in sorted(result.counts.items()) if n)
    out.print(f"trials: {states}; MLflow parent run {result.parent_run_id}")
    if result.command:
        out.print(f"best values on the full training split: {result.command}   (or: kdbench run --from-study {spec.study} --storage {storage})")


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """``0,1,2`` or ``0-4`` (or both: ``0-2,7``)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    except ValueError:
        raise UserError(f"{option}: expected seeds like 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"{option}: expected distinct seeds like 0,1,2 or 0-4, got {text!r}")
    return tuple(seeds)


@app.command()
def sweep(
    method: Annotated[list[str], typer.Option("--method", "-m", help="NAME or NAME:PRESET (repeatable); `none` is the plain student.")],
    seeds: Annotated[str, typer.Option(help="Seeds of every method: 0,1,2 or 0-4.")] = "0",
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", "-r", help="Recipe(s) of the grid (repeatable); default: the embedded benchmark.")] = None,
    set_: SetOpt = None,
    name: Annotated[Optional[str], typer.Option(help="Sweep name (its work list in --storage); default: sweep-BENCHMARK.")] = None,
    storage: Annotated[str, typer.Option(help="Optuna storage holding the work list: sqlite:///FILE.db, postgresql://... or journal:FILE.log; shared by workers on other machines.")] = study_storage(),
    reclaim: Annotated[bool, typer.Option(help="Rerun cells left RUNNING by a worker that died (only when no other worker is running).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a grid of methods x seeds (x recipes): the runs of a comparison table.

    A cell MLflow already holds as FINISHED (same resolved recipe) is skipped, so rerunning the
    command fills only the holes. A failed cell does not stop the others; failures are listed at
    the end (exit code 1). Workers on several machines that run the same command with a shared
    --storage (and MLflow store) split the grid without running a cell twice. Then: `kdbench table`.
    """
    from kdbench.sweep import SweepSpec
    from kdbench.sweep import sweep as sweep_fn

    spec = SweepSpec(tuple(method), parse_seeds(seeds), tuple(recipe or [None]), tuple(set_ or []), name, storage, reclaim)
    result = sweep_fn(spec, quiet=quiet, echo=out.print)
    table = Table(title=f"{result.study.split(':', 1)[1]}: {result.count('ran')} ran, {result.count('done')} already done, "
                  f"{result.count('failed')} failed, {result.count('elsewhere')} with other workers")
    for col in ("cell", "state", "mIoU", "seconds", "error"):
        table.add_column(col, justify="right" if col in ("mIoU", "seconds") else "left")
    for r in result.results:
        miou = f"{100 * r.miou:.2f}" if r.miou is not None else ""
        table.add_row(r.cell.label, r.state, miou, f"{r.seconds:.0f}" if r.seconds else "", r.error)
    out.print(table)
    if result.count("failed"):
        raise typer.Exit(1)


@app.command()
def methods(
    name: Annotated[Optional[str], typer.Argument(help="One method to show in full; default: the list of all.")] = None,
    recipe: RecipeOpt = None,
) -> None:
    """List the distillation methods, or show one in full: every option (type, default, search
    range, meaning), what each preset sets (* marks the preset a run uses by default) and what the
    recipe's `methods:` section adds. Pass options as --set method.OPTION=VALUE."""
    from kdbench.methods import get_method_class, registry
    from kdbench.recipe import load_recipe

    if name is None:  # nothing in the list depends on a recipe: no recipe (and no timm import, ~4 s) for it
        table = Table(title="methods (`kdbench methods NAME` for one in full)", title_justify="left")
        for col in ("method", "what it distils", "presets (* = default)", "options"):
            table.add_column(col, no_wrap=col in ("method", "presets (* = default)"))
        for key, cls in registry().items():
            presets = ", ".join(p + ("*" if p == cls.default_preset else "") for p in ["default", *cls.presets])
            table.add_row(key, (cls.__doc__ or "").strip().splitlines()[0], presets, str(len(dataclasses.fields(cls.Config))))
        out.print(table)
        return
    cls = get_method_class(name)
    r = load_recipe(recipe)
    hints = typing.get_type_hints(cls.Config)
    presets = {"default": {}, **cls.presets}
    table = Table(title=f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}", title_justify="left")
    table.add_column("option (--set method.OPTION=...)", no_wrap=True)
    table.add_column("type", no_wrap=True)
    for preset in presets:
        table.add_column(preset + ("*" if preset == cls.default_preset else ""), no_wrap=True)
    table.add_column("search range", no_wrap=True)
    table.add_column("meaning")
    for f in dataclasses.fields(cls.Config):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if meta.get("choices"):
            rng = " | ".join(map(str, meta["choices"]))
        elif meta.get("low") is not None:
            rng = f"[{meta['low']}, {meta['high']}]" + (" log" if meta.get("log") else "")
        else:
            rng = ""
        kind = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        values = [str(default)] + [str(v[f.name]) if f.name in v else "·" for v in list(presets.values())[1:]]
        table.add_row(f.name, kind, *values, rng, meta.get("help", ""))
    table.caption = "· = the preset keeps the default"
    if r.methods.get(name):
        table.caption += f"; recipe {r.benchmark!r} sets: " + ", ".join(f"{k}={v}" for k, v in r.methods[name].items())
    table.caption_justify = "left"
    out.print(table)


@app.command()
def plot(
    kind: Annotated[str, typer.Argument(help="per-class, predictions, attention or curves.")],
    experiment: Annotated[Optional[str], typer.Option("--experiment", "-e", help="MLflow experiment whose finished student runs are plotted; default: every kdbench-* experiment.")] = None,
    run_: Annotated[Optional[list[str]], typer.Option("--run", help="Plot exactly these MLflow run ids (repeatable) instead of an experiment's runs.")] = None,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Folder the PNG files go to.")] = "figures",
    images: Annotated[Optional[str], typer.Option("--images", help="Val image indices for predictions/attention, e.g. 0,3,7 (default: 0,1,2 / 0).")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="attention: the AttnFD layer (backbone, encoder, decoder); default: the run's first.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else ./kdbench-out/mlflow.db.")] = None,
    log: Annotated[bool, typer.Option("--log/--no-log", help="Also log each figure to the runs it shows, under figures/.")] = True,
) -> None:
    """Figures from MLflow runs, written as PNG files and logged to the runs they show.

    - per-class: per-class IoU bars, one color per method/preset (mean over seeds).
    - predictions: val images, ground truth and each method's prediction (the plain student first,
      the teacher last).
    - attention: an AttnFD run's teacher and student feature maps before and after refinement.
    - curves: val mIoU and every loss term against step, one line per run.

    The qualitative figures load each run's checkpoint, so run them where the runs were trained.
    """
    from kdbench.plots import KINDS
    from kdbench.plots import plot as plot_fn

    if kind not in KINDS:
        raise UserError(f"plot: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    for path in plot_fn(kind, experiment=experiment, run_ids=list(run_ or []), out_dir=out_dir, images=images, layer=layer, log=log, tracking_uri=tracking_uri):
        out.print(str(path))


@app.command("table")
def table_cmd(
    experiment: Annotated[Optional[list[str]], typer.Option("--experiment", "-e", help="MLflow experiment to read (repeatable); default: every experiment named kdbench-* (one per benchmark).")] = None,
    format_: Annotated[Optional[str], typer.Option("--format", "-f", help="md, latex (booktabs), csv (one numeric row per method and column) or html; default: from --out's suffix (.md .tex .csv .html), else md.")] = None,
    metric: Annotated[str, typer.Option(help="miou or pixel_acc: the final evaluation on val; or a kdbench eval result, e.g. eval/s1_flip/miou.")] = "miou",
    per_class: Annotated[bool, typer.Option("--per-class", help="The per-class IoU table instead (mean over seeds), one per (dataset, student) column, or the one --group names.")] = False,
    group: Annotated[Optional[str], typer.Option(help="With --per-class: only the column whose name (DATASET: ARCH/BACKBONE) contains this, e.g. resnet18.")] = None,
    extra: Annotated[bool, typer.Option("--extra", help="Also the other metric, the model's parameters and multiply-adds (GMACs, one image at the training crop: what papers call FLOPs), wall time per run (MLflow start to end) and training throughput (images/s). Runs logged before kdbench counted multiply-adds show – there.")] = False,
    out_file: Annotated[Optional[str], typer.Option("--out", "-o", help="Write the table to this file instead of printing it.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow store to read; default: $MLFLOW_TRACKING_URI, else ./kdbench-out/mlflow.db.")] = None,
) -> None:
    """Paper-style comparison table of the FINISHED runs in MLflow.

    Rows: the teacher, the plain student (method none), then one row per method variant: method,
    preset, and every option whose value differs from the preset's (e.g. `attnfd (default)
    alpha=0.5`); recipe keys that differ between runs of one column are added after a `;`. Columns:
    one group per (dataset, student). A cell is mean ± std over seeds (n runs) in %, the newest run
    per seed; bold: the best student. Δ: difference to the plain student's mean; p: paired t-test,
    and a bootstrap 95% CI of the mean difference, over the seeds both have; `~` marks a difference
    within seed noise (CI contains 0 or p >= 0.05). Tuning trials are left out. Make the runs with
    `kdbench run --method M --seed S` (or `kdbench sweep`).
    """
    from pathlib import Path

    from kdbench.table import build_table, check_metric, format_for, load_runs, per_class_tables, render, render_classes

    fmt = format_for(out_file, format_)
    check_metric(metric)
    if group is not None and not per_class:
        raise UserError("--group: only with --per-class (the comparison table shows every column)")
    runs = load_runs(experiment, tracking_uri)
    if per_class:
        text = render_classes(per_class_tables(runs, group), fmt)  # type: ignore[arg-type]
    else:
        text = render(build_table(runs, metric), fmt, extra=extra)  # type: ignore[arg-type]
    if out_file:
        Path(out_file).write_text(text)
        print(f"table: {out_file}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def main() -> None:
    try:
        _main()
    finally:
        if "kdbench.runtime" in sys.modules:  # else nothing started a process group (and torch stays unimported)
            from kdbench.runtime import shutdown

            shutdown()


def _main() -> None:
    try:
        # without standalone mode typer returns the code of a typer.Exit (130 for Ctrl-C) instead of exiting
        code = app(standalone_mode=False)
    except UserError as err:
        message = str(err)
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: keep the worker's own last line
            message = message.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    except Exception as err:  # usage errors (bad option, bad value) arrive here with standalone_mode=False
        if isinstance(err, _click_errors()):
            command = getattr(getattr(err, "ctx", None), "command_path", None) or "kdbench"
            print(f"error: {err.format_message()} (see `{command} --help`)", file=sys.stderr)
            sys.exit(2)
        raise
    if code == 130:
        print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


def _click_errors() -> tuple[type, ...]:
    """Click's exception class and the copy typer vendors (typer >= 0.29 raises its own)."""
    import click

    types: list[type] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException

        types.append(ClickException)
    except ImportError:
        pass
    return tuple(types)


if __name__ == "__main__":
    main()
