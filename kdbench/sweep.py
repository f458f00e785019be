"""`kdbench sweep`: the grid of a comparison table (methods x seeds x recipes), run to completion.

A cell is one resolved recipe; it is done when MLflow holds a FINISHED student run with its recipe
hash, so a rerun of the same command runs only the holes (new seeds, new methods, failed cells).

The work list is an Optuna study on ordinary Optuna storage (SQLite here, a shared RDB or journal
file across machines): every cell still to run is a WAITING trial, and a worker takes one by
moving it to RUNNING through the storage, which lets only one worker make that move. So N workers
running the same command on N machines split the grid without running a cell twice. Two workers
that start together may both add a cell's trial; the trial with the higher number then yields to
the lower one (see ``_duplicate``), so the cell still runs once.
"""

from __future__ import annotations

import math
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kdbench.errors import UserError
from kdbench.outputs import study_storage, tracking_uri
from kdbench.progress import make_progress
from kdbench.recipe import Recipe, load_recipe
from kdbench.schema import Metric, Role, RunCol, Tag, column, metric_col, search_runs, tag_col

CELL, LABEL, ERROR, RUN_ID = "cell", "label", "error", "run_id"


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a method (and preset) at a seed on a recipe."""

    method: str
    preset: str | None
    seed: int
    recipe_name: str | None
    recipe: Recipe = field(compare=False, repr=False)

    @property
    def key(self) -> str:
        return self.recipe.hash()

    @property
    def label(self) -> str:
        where = f" [{self.recipe_name}]" if self.recipe_name else ""
        return f"{self.method} ({self.recipe.method.preset}) seed {self.seed}{where}"


@dataclass(frozen=True)
class SweepSpec:
    methods: tuple[str, ...]  #: NAME or NAME:PRESET
    seeds: tuple[int, ...]
    recipes: tuple[str | None, ...] = (None,)
    sets: tuple[str, ...] = ()
    name: str | None = None  #: default: sweep-<benchmark of the first recipe>
    storage: str = field(default_factory=study_storage)
    reclaim: bool = False  #: treat RUNNING cells as abandoned (no other worker is alive)

    def cells(self) -> list[Cell]:
        if not self.methods or not self.seeds:
            raise UserError("sweep: name at least one --method and one seed")
        out: list[Cell] = []
        for recipe_name in self.recipes:
            for entry in self.methods:
                method, _, preset = entry.partition(":")
                for seed in self.seeds:
                    r = load_recipe(recipe_name, list(self.sets), method=method, preset=preset or None, seed=seed)
                    out.append(Cell(method, preset or None, seed, recipe_name, r))
        if len({c.key for c in out}) != len(out):
            raise UserError("sweep: two cells of the grid are the same run (a method or seed named twice?)")
        return out

    def study_name(self, cells: list[Cell]) -> str:
        return f"kdbench-sweep:{self.name or 'sweep-' + cells[0].recipe.benchmark}"


@dataclass
class CellResult:
    cell: Cell
    state: str  #: done (before this sweep), ran, failed, elsewhere (another worker has it)
    miou: float | None = None
    seconds: float = 0.0
    error: str = ""
    run_id: str | None = None


@dataclass
class SweepResult:
    study: str
    results: list[CellResult]

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.results)


def finished_cells(cells: list[Cell]) -> dict[str, CellResult]:
    """The cells (by recipe hash) that MLflow already holds a FINISHED student run of, as results
    of that run (the newest, where there are several)."""
    found: dict[str, CellResult] = {}
    by_key = {c.key: c for c in cells}
    store = {c.key: tracking_uri(c.recipe.tracking.uri, c.recipe.output_dir) for c in cells}
    for uri in set(store.values()):
        experiments = sorted({c.recipe.tracking.experiment or f"kdbench-{c.recipe.benchmark}" for c in cells if store[c.key] == uri})
        runs = search_runs(experiments, f"attributes.status = 'FINISHED' and tags.`{Tag.ROLE}` = '{Role.STUDENT}'", uri=uri)
        if not len(runs) or tag_col(Tag.RECIPE_HASH) not in runs:
            continue
        seconds = (pd.to_datetime(column(runs, RunCol.END)) - pd.to_datetime(column(runs, RunCol.START))).dt.total_seconds()
        miou = pd.to_numeric(column(runs, metric_col(Metric.MIOU)), errors="coerce")
        for i in reversed(range(len(runs))):  # newest first in the frame: the newest wins
            key = runs[tag_col(Tag.RECIPE_HASH)].iloc[i]
            if key in by_key:
                found[key] = CellResult(by_key[key], "done", None if math.isnan(miou.iloc[i]) else float(miou.iloc[i]), float(seconds.iloc[i]), run_id=runs[RunCol.RUN_ID].iloc[i])
    return found


def _open_study(spec: SweepSpec, cells: list[Cell]) -> tuple[Any, Any]:
    """The sweep's study and its storage (whose state moves are what workers coordinate through)."""
    import optuna

    from kdbench.tune import resolve_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = resolve_storage(spec.storage)
    study = optuna.create_study(study_name=spec.study_name(cells), storage=storage, load_if_exists=True, direction="maximize")
    return study, storage


def _enqueue(study: Any, storage: Any, todo: list[Cell], reclaim: bool) -> None:
    """A WAITING trial for every cell to run that has no WAITING or RUNNING trial yet."""
    from optuna.trial import TrialState

    live = (TrialState.WAITING, TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False)
    if reclaim:
        for t in trials:
            if t.state == TrialState.RUNNING:
                storage.set_trial_user_attr(t._trial_id, ERROR, "reclaimed: its worker is gone")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
    taken = {t.user_attrs.get(CELL) for t in trials if t.state in live}
    for c in todo:
        if c.key not in taken:
            study.enqueue_trial({}, user_attrs={CELL: c.key, LABEL: c.label})


def _claim(study: Any, storage: Any, cells: set[str], lock: Path | None) -> Any | None:
    """The first WAITING trial of one of ``cells`` that this worker manages to move to RUNNING, or
    None when none is left. Trials of other cells (a sweep of another grid under the same name)
    are left for their own workers."""
    from optuna.trial import TrialState

    from kdbench.folders import exclusive

    with exclusive(lock, what="--storage") if lock is not None else nullcontext():
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if t.user_attrs.get(CELL) not in cells:
                continue
            try:
                if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                    return t
            except RuntimeError:  # finished meanwhile by another worker
                continue
    return None


def _claim_lock(url: str) -> Path | None:
    """A file lock that makes a claim atomic on SQLite, or None where the storage does it. SQLite
    reads the trial's state and moves it to RUNNING in two transactions, so two workers on one file
    can both claim the same trial (measured: 7 of 200 trials claimed twice by two processes). A
    server row-locks the read (SELECT ... FOR UPDATE) and a journal file replays the moves in order."""
    from kdbench.tune import storage_file

    file = storage_file(url) if url.startswith("sqlite") else None
    return None if file is None else file.parent / f".{file.name}.claim.lock"


def _duplicate(study: Any, trial: Any) -> bool:
    """Whether an earlier trial of the same cell is running or done: then this one yields."""
    from optuna.trial import TrialState

    cell = trial.user_attrs.get(CELL)
    return any(
        t.user_attrs.get(CELL) == cell and t.number < trial.number and t.state in (TrialState.RUNNING, TrialState.COMPLETE)
        for t in study.get_trials(deepcopy=False)
    )


def sweep(spec: SweepSpec, quiet: bool = False, echo: Any = print) -> SweepResult:
    """Run every cell of the grid that MLflow does not hold yet; a failed cell does not stop the others."""
    from optuna.trial import TrialState

    from kdbench.run import run

    cells = spec.cells()
    done = finished_cells(cells)
    by_key = {c.key: c for c in cells}
    results = [done[c.key] for c in cells if c.key in done]
    todo = [c for c in cells if c.key not in done]
    study, storage = _open_study(spec, cells)
    _enqueue(study, storage, todo, spec.reclaim)
    name = study.study_name.split(":", 1)[1]
    with make_progress(enabled=not quiet, transient=True) as bar:
        say = bar.console.print if hasattr(bar, "console") else echo  # above the bar, not through it
        task = bar.add_task(f"sweep {name}", total=len(cells), completed=len(results))
        lock = _claim_lock(spec.storage)
        while (trial := _claim(study, storage, set(by_key), lock)) is not None:
            cell = by_key[trial.user_attrs[CELL]]
            if _duplicate(study, trial):  # two workers enqueued this cell; the earlier trial runs it
                storage.set_trial_user_attr(trial._trial_id, ERROR, "duplicate")
                storage.set_trial_state_values(trial._trial_id, TrialState.PRUNED)
                continue
            start = time.perf_counter()
            try:
                result = run(cell.recipe, quiet=True, extra_tags={Tag.SWEEP: name})
            except KeyboardInterrupt:
                storage.set_trial_user_attr(trial._trial_id, ERROR, "interrupted")
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                raise
            except Exception as err:  # noqa: BLE001  (a failed cell is reported, the sweep goes on)
                error = "".join(traceback.format_exception_only(err)).strip().splitlines()[-1][:500]
                storage.set_trial_user_attr(trial._trial_id, ERROR, error)
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                results.append(CellResult(cell, "failed", seconds=time.perf_counter() - start, error=error))
                say(f"FAILED {cell.label}: {error}")
            else:
                storage.set_trial_user_attr(trial._trial_id, RUN_ID, result.run_id)
                storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, values=[result.metrics.miou])
                seconds = time.perf_counter() - start
                results.append(CellResult(cell, "ran", result.metrics.miou, seconds, run_id=result.run_id))
                say(f"{cell.label}: mIoU {100 * result.metrics.miou:.2f} [{seconds:.0f} s]")
            bar.advance(task)
    mine = {r.cell.key for r in results}
    results += [CellResult(c, "elsewhere") for c in cells if c.key not in mine]
    return SweepResult(study.study_name, results)
