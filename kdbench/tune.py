"""Hyper-parameter search with Optuna: `kdbench tune`.

A study is an Optuna study (its storage is the work list that several processes or machines share)
and one MLflow parent run; every trial is a kdbench run, a child run of it, evaluated on the
held-out part of the training split, never on the split that tables report. Trials report each
evaluation, so a pruner can stop hopeless ones.

    search space:  --param NAME (the method's declared range), NAME=LOW:HIGH[:log], NAME=int:LOW:HIGH,
                   NAME=a,b,c; NAME may also be a recipe key (train.lr=1e-3:1e-1:log)
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from kdbench.errors import Stopped, UserError
from kdbench.outputs import study_storage, tracking_uri
from kdbench.recipe import Recipe, dump_yaml, flatten, load_recipe, read_yaml
from kdbench.schema import Role, Tag

#: the held-out fraction a study uses when the recipe holds none out
DEFAULT_HOLDOUT = 0.1


# ---------------------------------------------------------------------------------------------
# the search space


@dataclass(frozen=True)
class Param:
    """One searched hyper-parameter: a method option (``alpha``) or a recipe key (``train.lr``)."""

    name: str
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def override(self) -> str:
        """The recipe key a value goes to."""
        return self.name if "." in self.name else f"method.{self.name}"

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.name} in [{self.low}, {self.high}]" + (" log" if self.log else "") + (" int" if self.kind == "int" else "")


def _number(text: str, where: str) -> float:
    try:
        return float(read_yaml(text) if text.strip() else "")
    except (TypeError, ValueError, yaml.YAMLError):
        raise UserError(f"--param {where}: {text!r} is not a number") from None


def _checked(p: Param, where: str) -> Param:
    if p.kind == "categorical":
        if len(p.choices) < 1:
            raise UserError(f"--param {where}: list at least one value, e.g. {p.name}=a,b,c")
        return p
    if not p.low < p.high:
        raise UserError(f"--param {where}: the range needs LOW < HIGH, got [{p.low}, {p.high}]")
    if p.log and p.low <= 0:
        raise UserError(f"--param {where}: a log range needs LOW > 0, got {p.low}")
    if p.kind == "int" and (p.low != int(p.low) or p.high != int(p.high)):
        raise UserError(f"--param {where}: int bounds must be whole numbers, got [{p.low}, {p.high}]")
    return p


def parse_param(text: str, method: str) -> Param:
    """``NAME``, ``NAME=LOW:HIGH[:log]``, ``NAME=int:LOW:HIGH[:log]`` or ``NAME=a,b,c``."""
    from kdbench.methods import get_method_class

    name, _, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    cls = get_method_class(method)
    if "." in name:  # a recipe key: its range must be given
        if name.startswith("method."):
            raise UserError(f"--param {text}: name a method option without 'method.' (e.g. --param {name[7:]})")
        if name not in flatten(Recipe().to_dict()):
            raise UserError(f"--param {text}: {name!r} is not a recipe key (e.g. train.lr, train.weight_decay)")
        if not spec:
            raise UserError(f"--param {text}: a recipe key has no declared range; give one, e.g. {name}=1e-3:1e-1:log")
    else:
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise UserError(f"--param {text}: {method!r} has no hyper-parameter {name!r} (it has: {known})")
        if name in cls.structural:
            raise UserError(f"--param {text}: {name} cannot be tuned: {cls.structural[name]}")
        if not spec:
            meta = fields[name].metadata
            if meta.get("choices"):
                return _checked(Param(name, "categorical", choices=tuple(meta["choices"])), text)
            if meta.get("low") is None:
                raise UserError(f"--param {text}: {name} has no declared search range; give one, e.g. {name}=LOW:HIGH or {name}=a,b")
            kind = "int" if fields[name].type in (int, "int") else "float"
            return _checked(Param(name, kind, meta["low"], meta["high"], bool(meta.get("log"))), text)
    parts = spec.split(":")
    if len(parts) == 1:
        values = tuple(read_yaml(v) if v.strip() else v for v in spec.split(","))
        return _checked(Param(name, "categorical", choices=values), text)
    kind: Literal["float", "int"] = "float"
    if parts[0] == "int":
        kind, parts = "int", parts[1:]
    log = len(parts) == 3 and parts[2] == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise UserError(f"--param {text}: expected NAME=LOW:HIGH, NAME=LOW:HIGH:log, NAME=int:LOW:HIGH or NAME=a,b,c")
    return _checked(Param(name, kind, _number(parts[0], text), _number(parts[1], text), log), text)


# ---------------------------------------------------------------------------------------------
# studies


@dataclass(frozen=True)
class StudySpec:
    recipe: str | None
    method: str
    preset: str | None
    sets: tuple[str, ...]
    params: tuple[Param, ...]
    trials: int
    study: str
    storage: str
    sampler: Literal["tpe", "random", "grid", "gp", "cmaes"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    budget_iters: int | None = None
    seeds: tuple[int, ...] = (0,)
    sampler_seed: int = 0

    def trial_overrides(self, values: dict[str, Any]) -> list[str]:
        return [f"{p.override}={json.dumps(values[p.name])}" for p in self.params]

    def recipe_for(self, values: dict[str, Any], seed: int, tuning: bool = True) -> Recipe:
        """The recipe of one trial (tuning: held-out evaluation, the tuning budget) or of the
        best values on the full training split."""
        base = load_recipe(self.recipe, list(self.sets), method=self.method, preset=self.preset)
        sets = list(self.sets) + self.trial_overrides(values)
        if tuning:
            if base.data.holdout_fraction == 0:
                sets.append(f"data.holdout_fraction={DEFAULT_HOLDOUT}")
            if self.budget_iters:
                sets.append(f"train.iterations={self.budget_iters}")
                if base.train.eval_interval == 0 or base.train.eval_interval >= self.budget_iters:
                    sets.append(f"train.eval_interval={max(1, self.budget_iters // 4)}")
        return load_recipe(self.recipe, sets, method=self.method, preset=self.preset, seed=seed)


def _is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith(".log")


def storage_file(url: str) -> Path | None:
    """The file a storage lives in (an SQLite database or a journal), None for a server."""
    if url.startswith("sqlite:///"):
        return Path(url.split("///", 1)[1])
    return Path(url.removeprefix("journal:")) if _is_journal(url) else None


def resolve_storage(url: str) -> Any:
    """An Optuna storage: an RDB URL (sqlite:///file.db, postgresql://...) or a journal file
    (journal:PATH or a path ending in .log), which works without a database server."""
    import optuna

    own, mlflows = storage_file(url), storage_file(tracking_uri())
    if own is not None and mlflows is not None and own.resolve() == mlflows.resolve():
        raise UserError(f"--storage: {url} is MLflow's store; Optuna and MLflow cannot share one SQLite file (the default is {study_storage()})")
    if own is not None:
        own.parent.mkdir(parents=True, exist_ok=True)
    if _is_journal(url):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(own)))
    # several processes on one SQLite file wait for each other's writes instead of failing
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=60 if not url.startswith("sqlite") else None)
        except Exception as err:
            # two workers that create a new database at once: one of them loses the race to
            # write its schema (IntegrityError); the schema is there on the next try
            if type(err).__name__ == "IntegrityError" and attempt < 2:
                time.sleep(1 + attempt)
                continue
            raise UserError(f"--storage: cannot open {url} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    raise AssertionError("unreachable")


def make_sampler(spec: StudySpec) -> Any:
    import optuna

    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.sampler_seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.sampler_seed)
    if spec.sampler == "grid":
        bad = [p.name for p in spec.params if p.kind != "categorical"]
        if bad:
            raise UserError(f"--sampler grid: list the values of {', '.join(bad)} (e.g. --param {bad[0]}=1,2,4)")
        return optuna.samplers.GridSampler({p.name: list(p.choices) for p in spec.params}, seed=spec.sampler_seed)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=spec.sampler_seed)
    try:
        return optuna.samplers.CmaEsSampler(seed=spec.sampler_seed)
    except ImportError as err:
        raise UserError(f"--sampler cmaes: {err} (pip install cmaes)") from None


def make_pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


@dataclass
class StudyResult:
    study: Any
    parent_run_id: str | None
    best_recipe_path: Path | None
    command: str | None
    #: trials per state (complete, pruned, fail, running, ...)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


def tune(spec: StudySpec, quiet: bool = False, n_jobs: int = 1, worker_argv: list[str] | None = None, worker: bool = False) -> StudyResult:
    """Run (or resume) the study until it holds ``spec.trials`` trials; returns it with the best.

    ``n_jobs`` > 1 starts that many - 1 more processes (``kdbench <worker_argv> --worker``) on the
    same storage once the study and the teacher exist; a worker runs trials and leaves the summary
    to the process that started it."""
    import optuna

    from kdbench.data import load_splits
    from kdbench.methods import get_method_class
    from kdbench.run import ensure_teacher, run
    from kdbench.runtime import sharing_cores
    from kdbench.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    some = {p.name: _any_value(p) for p in spec.params}
    first = spec.recipe_for(some, spec.seeds[0])
    # the teacher is trained once, before any trial (several workers must not train it together),
    # on the whole training split as for any run: only the student's tuning holds images out
    if get_method_class(spec.method).needs_teacher:
        full = spec.recipe_for(some, spec.seeds[0], tuning=False)
        ensure_teacher(full, load_splits(full, progress=not quiet), quiet)
    storage = resolve_storage(spec.storage)
    study = optuna.create_study(
        study_name=spec.study,
        storage=storage,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec.pruner),
        direction="maximize",
        load_if_exists=True,
    )
    tracker = Tracker(first.tracking.uri, first.tracking.experiment or f"kdbench-{first.benchmark}", first.output_dir)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    params = {
        "study": spec.study,
        "storage": spec.storage,
        "sampler": spec.sampler,
        "pruner": spec.pruner,
        "trials": spec.trials,
        "budget_iters": spec.budget_iters,
        "seeds": list(spec.seeds),
        "search_space": [p.describe() for p in spec.params],
        "method": spec.method,
        "sets": list(spec.sets),
    }
    tags = {Tag.ROLE: Role.STUDY, Tag.METHOD: spec.method, Tag.PRESET: str(first.method.preset), Tag.DATASET: first.data.dataset, Tag.STUDY: spec.study}
    parent = tracker.start(f"study-{spec.study}", tags, params, run_id=parent)
    if "mlflow_parent_run_id" not in study.user_attrs:
        study.set_user_attr("mlflow_parent_run_id", parent)
        study.set_user_attr("spec", _spec_dict(spec))

    def objective(trial: Any) -> float:
        values = {p.name: p.suggest(trial) for p in spec.params}
        trial.set_user_attr("overrides", spec.trial_overrides(values))
        scores = []
        for i, seed in enumerate(spec.seeds):
            recipe = spec.recipe_for(values, seed)

            def report(step: int, metrics: Any, first_seed: bool = i == 0, total: int = recipe.train.iterations) -> None:
                if first_seed and step < total:  # pruning judges the first seed's curve, before its end
                    trial.report(metrics.miou, step)
                    if trial.should_prune():
                        raise Stopped(f"pruned at step {step} (held-out mIoU {metrics.miou:.4f})", {Tag.TRIAL_STATE: "pruned"})

            tags = {Tag.TRIAL: str(trial.number), Tag.STUDY: spec.study}
            try:
                result = run(recipe, quiet=True, parent_run_id=parent, eval_split="holdout", on_eval=report, extra_tags=tags)
            except Stopped:
                raise optuna.TrialPruned() from None
            if not math.isfinite(result.metrics.miou):
                raise FloatingPointError("held-out mIoU is not finite")
            tracker.client.set_tag(result.run_id, Tag.TRIAL_STATE, "complete")
            scores.append(result.metrics.miou)
        return statistics.fmean(scores)

    # every process stops once the study holds the asked number of trials, whoever ran them
    callbacks = [optuna.study.MaxTrialsCallback(spec.trials, states=None)]
    interrupted = False
    helpers = n_jobs - 1 if worker_argv and not worker else 0
    with sharing_cores(1 + helpers) as env:
        command = [sys.executable, "-m", "kdbench", *(worker_argv or []), "--worker"]
        workers = [subprocess.Popen(command, env=env) for _ in range(helpers)]
        try:
            if len(study.trials) < spec.trials:
                study.optimize(objective, n_trials=spec.trials, callbacks=callbacks, catch=(Exception,))
        except KeyboardInterrupt:
            interrupted = True
        for w in workers:
            w.wait()
    if worker:
        return StudyResult(study, parent, None, None)
    result = _finish(spec, study, tracker)
    if interrupted:
        tracker.end("KILLED", "interrupted; the finished trials are kept in the study storage")
        raise KeyboardInterrupt
    tracker.end("FINISHED")
    return result


def _any_value(p: Param) -> Any:
    return p.choices[0] if p.kind == "categorical" else (int(p.low) if p.kind == "int" else p.low)


def _spec_dict(spec: StudySpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["params"] = [dataclasses.asdict(p) for p in spec.params]
    return json.loads(json.dumps(d, default=list))


def _finish(spec: StudySpec, study: Any, tracker: Any) -> StudyResult:
    """Best value and params on the parent run; Optuna's plots, the trials table and the best
    configuration as a recipe file beside the storage (and as artifacts), and the rerun command."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    tracker.log_metrics({f"trials/{k}": v for k, v in counts.items()}, len(study.trials))
    folder = best_recipe_path(spec).parent
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / f"{spec.study}-trials.csv"
    study.trials_dataframe().to_csv(csv, index=False)
    tracker.log_file(csv)
    for path in save_plots(study, folder, prefix=f"{spec.study}-"):
        tracker.log_file(path, "plots")
    if not complete:
        return StudyResult(study, tracker.run_id, None, None, counts)
    best = study.best_trial
    tracker.log_metrics({"best_holdout_miou": best.value, "best_trial": best.number}, len(study.trials))
    tracker.set_tags({f"best.{k}": str(v) for k, v in best.params.items()})
    recipe = spec.recipe_for(best.params, spec.seeds[0], tuning=False)
    path = best_recipe_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# the best trial ({best.number}) of study {spec.study!r}, on the full training split\n" + dump_yaml(recipe))
    tracker.log_file(path)
    command = f"kdbench run --recipe {path}"
    return StudyResult(study, tracker.run_id, path, command, counts)


def best_recipe_path(spec: StudySpec) -> Path:
    """``<storage folder>/<study>-best.yaml`` for a file storage; ./ otherwise."""
    file = storage_file(spec.storage)
    return (file.parent if file is not None else Path(".")) / f"{spec.study}-best.yaml"


def save_plots(study: Any, folder: Path, prefix: str = "") -> list[Path]:
    """Optuna's optimisation history, parameter importances and slice plot as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        return []
    plots = {"optimization_history": vis.plot_optimization_history, "slice": vis.plot_slice}
    if len(done) > 1 and len(study.best_trial.params) > 1:
        plots["param_importances"] = vis.plot_param_importances
    out = []
    import warnings

    for name, fn in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            ax = fn(study)
        fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        path = folder / f"{prefix}{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def from_study(name: str, storage: str) -> tuple[str, str | None, str | None, list[str]]:
    """(method, preset, recipe, ``--set`` overrides) of a study's best trial: the study's own
    settings and the trial's values (what ``kdbench run --from-study`` applies)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=resolve_storage(storage))
    except KeyError:
        raise UserError(f"--from-study: no study {name!r} in {storage}") from None
    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"--from-study: study {name!r} has no finished trial yet") from None
    spec = study.user_attrs.get("spec", {})
    return spec.get("method", ""), spec.get("preset"), spec.get("recipe"), [*spec.get("sets", []), *best.user_attrs["overrides"]]
