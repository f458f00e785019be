"""The `kdbench` command line. Every user error ends as one line on stderr and exit code 2."""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from kdbench.errors import UserError

app = typer.Typer(
    help="kdbench: knowledge distillation for semantic segmentation, every method on the same models, "
    "data, recipe and evaluation, every run in MLflow.\n\n"
    "Start with `kdbench run --method kd` (the embedded synthetic benchmark; the teacher is trained "
    "once and cached). `kdbench methods` lists methods, presets and hyper-parameters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(soft_wrap=True)

RecipeOpt = Annotated[
    Optional[str],
    typer.Option("--recipe", "-r", help="Recipe name (recipes/NAME.yaml) or path to a YAML file. Default: the embedded benchmark."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override any recipe key, e.g. --set train.lr=0.02 --set method.temperature=4 (repeatable)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (for scripts and logs).")]


@app.command()
def run(
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Distillation method (see `kdbench methods`); default: the recipe's.")] = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Method preset, same as --set method.preset=NAME.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the student run (data order, init, augmentation).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue this recipe's killed run from its last checkpoint.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Distil the teacher into the student with one method and log the run to MLflow.

    Trains the teacher first if the recipe names no checkpoint and none is cached. Prints the final
    mIoU; everything else (loss terms, lr, throughput, per-class IoU, confusion matrix, the resolved
    recipe) is in the MLflow run.
    """
    from kdbench.recipe import load_recipe
    from kdbench.run import run as run_fn

    r = load_recipe(recipe, list(set_ or []), method=method, preset=preset, seed=seed)
    result = run_fn(r, resume=resume, quiet=quiet)
    out.print(
        f"{r.method.name} ({r.method.preset}) seed {r.seed}: mIoU {100 * result.metrics.miou:.2f}  "
        f"pixel acc {100 * result.metrics.pixel_acc:.2f}  [{result.seconds:.0f} s, MLflow run {result.run_id}]"
    )


@app.command()
def teacher(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train the recipe's teacher once and cache it (also done automatically by `kdbench run`)."""
    from kdbench.recipe import load_recipe
    from kdbench.run import teacher_cache_path, train_teacher

    r = load_recipe(recipe, overrides=list(set_ or []))
    if r.teacher.checkpoint:
        raise UserError(f"teacher.checkpoint: this recipe uses the trained teacher {r.teacher.checkpoint}; nothing to train")
    path = teacher_cache_path(r)
    if path.is_file():
        out.print(f"Teacher already trained and cached: {path}")
        return
    result = train_teacher(r, quiet=quiet)
    out.print(f"teacher {r.teacher.arch}/{r.teacher.backbone}: mIoU {100 * result.metrics.miou:.2f} -> {path}")


@app.command()
def bench(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", "-m", help="Only these methods (repeatable); default: all.")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per method/preset (the median is reported).")] = 10,
    quiet: QuietOpt = False,
) -> None:
    """Time one training step of every method and preset against the floor (teacher forward +
    plain student step) and against KD, on the recipe's models and data."""
    from kdbench.bench import benchmark
    from kdbench.recipe import load_recipe

    r = load_recipe(recipe, list(set_ or []))
    timings = benchmark(r, method, steps=steps, quiet=quiet)
    floor = timings[0].ms_per_step
    kd = next((t.ms_per_step for t in timings if t.method == "kd" and t.preset == "default"), None)
    table = Table(title=f"ms per training step, batch {r.train.batch_size}, crop {list(r.train.crop_size)}, {torch_threads()} threads")
    for col in ("method", "preset", "ms/step", "x floor", "x kd"):
        table.add_column(col, justify="right" if col.startswith(("ms", "x")) else "left")
    for t in timings:
        table.add_row(t.method, t.preset, f"{t.ms_per_step:.0f}", f"{t.ms_per_step / floor:.2f}", f"{t.ms_per_step / kd:.2f}" if kd else "")
    out.print(table)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@app.command()
def methods(recipe: RecipeOpt = None) -> None:
    """List the distillation methods with their presets and hyper-parameters (defaults, search ranges),
    and the settings the recipe's `methods:` section adds for each."""
    from kdbench.methods import registry
    from kdbench.recipe import load_recipe

    r = load_recipe(recipe)

    for name, cls in registry().items():
        table = Table(title=f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}", title_justify="left", expand=False)
        table.add_column("hyper-parameter")
        table.add_column("default")
        table.add_column("search range")
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
            table.add_row(f.name, str(default), rng, meta.get("help", ""))
        presets = ", ".join(["default", *cls.presets]) if cls.presets else "default"
        table.caption = f"presets: {presets} (default preset: {cls.default_preset})"
        if r.methods.get(name):
            settings = ", ".join(f"{k}={v}" for k, v in r.methods[name].items())
            table.caption += f"\nrecipe {r.benchmark!r} sets: {settings}"
        table.caption_justify = "left"
        out.print(table)


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as err:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
