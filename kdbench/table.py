"""Paper-style comparison tables from the runs in MLflow: `kdbench table`.

    mlflow.search_runs -> build_table (pandas, no MLflow) -> ComparisonTable -> render(fmt)

Rows are the teacher, the plain student and every method variant (method, preset and the options
that differ from the preset); columns are (dataset, student) pairs; a cell is the mean over seeds
with its spread, the difference to the plain student and a paired test over the seeds both have,
so a reader sees at once whether a gain is larger than the seed noise. Every name read from MLflow
comes from ``kdbench.schema``.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from kdbench.errors import UserError
from kdbench.recipe import TeacherConfig
from kdbench.schema import Metric, Param, Role, RunCol, Tag, column, decode_param, encode_param, metric_col, param_col, tag_col

Format = Literal["md", "latex", "csv", "html"]
FORMATS: tuple[str, ...] = ("md", "latex", "csv", "html")
SUFFIXES: dict[str, str] = {".md": "md", ".markdown": "md", ".tex": "latex", ".csv": "csv", ".html": "html", ".htm": "html"}
METRICS: dict[str, str] = {Metric.MIOU: "mIoU", Metric.PIXEL_ACC: "pixel acc"}
RESAMPLES = 10_000  #: bootstrap resamples of the paired differences
ALPHA = 0.05  #: p-value at or above which a difference is "within noise"
MISSING = "–"  #: a cell without a finished run
#: what each run measured besides the metric: a cell shows their mean over its runs
RUN_NUMBERS = ("wall_s", "images_per_s", "params", "multiply_adds")
NOISE_NOTE = "within noise: the 95% bootstrap CI of the paired difference contains 0 or p ≥ 0.05"


# ---------------------------------------------------------------------------------------------
# reading MLflow


def load_runs(experiments: Sequence[str] | None = None, uri: str | None = None) -> pd.DataFrame:
    """The FINISHED runs of the experiments (default: every ``kdbench-*`` experiment). A name
    that is not there, or a store without runs, is a UserError saying where it looked."""
    import mlflow

    from kdbench.schema import search_runs
    from kdbench.tracking import read_store

    where = read_store(uri, "table")
    names = [e.name for e in mlflow.search_experiments()]
    known = ", ".join(n for n in names if n.startswith("kdbench-")) or "none"
    for name in experiments or []:
        if name not in names:
            raise UserError(f"--experiment: no experiment {name!r} in {where} (kdbench experiments there: {known}); see --tracking-uri")
    runs = search_runs(list(experiments) if experiments else None, f"attributes.status = '{RunCol.FINISHED}'", uri=where)
    if runs.empty:
        what = f"experiment(s) {', '.join(experiments)}" if experiments else "kdbench-* experiments"
        raise UserError(
            f"no finished runs in {what} of {where}; make some with `kdbench run --method kd`, "
            "or point --tracking-uri (or MLFLOW_TRACKING_URI) at the store that has them"
        )
    return runs


# ---------------------------------------------------------------------------------------------
# the table as data


@dataclass(frozen=True, order=True)
class Group:
    """A column group: the students a table compares are those of one dataset and architecture."""

    dataset: str
    student: str

    @property
    def label(self) -> str:
        return f"{self.dataset}: {self.student}"


@dataclass(frozen=True)
class Variant:
    """A row: one method configuration. ``options`` are the method options that differ from the
    preset's values, ``setting`` the recipe keys that differ between the runs of a column, both as
    (key, value as logged) pairs, so two rows never silently pool different configurations."""

    role: str
    method: str
    preset: str
    options: tuple[tuple[str, str], ...] = ()
    setting: tuple[tuple[str, str], ...] = ()
    teacher: str = ""  #: the teacher's arch/backbone (teacher rows)

    @property
    def is_teacher(self) -> bool:
        return self.role == Role.TEACHER

    @property
    def is_plain(self) -> bool:
        return not self.is_teacher and self.method == "none"

    @property
    def label(self) -> str:
        if self.is_teacher:
            return " ".join([f"teacher ({self.teacher})", *(f"{k}={_short(v)}" for k, v in self.options)])
        text = " ".join([f"{self.method} ({self.preset})", *(f"{k}={_short(v)}" for k, v in self.options)])
        if self.setting:
            text += "; " + " ".join(f"{k}={_short(v)}" for k, v in self.setting)
        return text


def _short(logged: str) -> str:
    """A logged value for a label: floats to 6 significant digits (a tuned alpha has 16)."""
    value = decode_param(logged)
    return f"{value:.6g}" if isinstance(value, float) else logged


@dataclass(frozen=True)
class PairedTest:
    """Paired comparison over shared seeds: a seed's data order and init are the same for both
    runs, so the per-seed difference removes most of the seed noise a comparison of means keeps."""

    n: int
    mean_diff: float
    t: float
    p: float
    ci_low: float
    ci_high: float

    @property
    def within_noise(self) -> bool:
        return self.ci_low <= 0.0 <= self.ci_high or not self.p < ALPHA


def paired_test(values: Mapping[Any, float], base: Mapping[Any, float], resamples: int = RESAMPLES, seed: int = 0) -> PairedTest | None:
    """t-test (scipy.stats.ttest_rel) and percentile bootstrap CI of the mean difference
    ``values - base`` over the keys (seeds) both have; None below two shared seeds."""
    from scipy import stats

    shared = sorted(set(values) & set(base))
    if len(shared) < 2:
        return None
    a = np.array([values[s] for s in shared], dtype=float)
    b = np.array([base[s] for s in shared], dtype=float)
    diff = a - b
    with warnings.catch_warnings():  # identical differences: t = +-inf (or nan), scipy warns
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(a, b)
    means = diff[np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedTest(len(shared), float(diff.mean()), float(res.statistic), float(res.pvalue), float(low), float(high))


@dataclass
class ComparisonTable:
    """The tidy result: ``frame`` has one row per (variant, group) in table order, missing cells
    included with n = 0, values as fractions (as logged), so it can be saved or plotted as is."""

    metric: str
    variants: list[Variant]
    groups: list[Group]
    frame: pd.DataFrame
    other_metric: str = ""
    #: (variant index, group index) -> the index labels, in the frame given to build_table, of the runs of that cell
    rows: dict[tuple[int, int], list[Any]] = field(default_factory=dict, repr=False)

    def cell(self, variant: Variant, group: Group) -> pd.Series:
        return self.frame.loc[(self.variants.index(variant), self.groups.index(group))]


def _other(metric: str) -> str:
    """The other column of the same evaluation: pixel accuracy beside mIoU and the reverse."""
    head, _, name = metric.rpartition("/")
    other = Metric.PIXEL_ACC if name == Metric.MIOU else Metric.MIOU
    return f"{head}/{other}" if head else other


def _text(value: Any) -> str:
    """A tag or param as written; NaN (not logged) as ''."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _not_setting(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in Param.NOT_SETTING)


def _preset_values(method: str, preset: str) -> dict[str, str] | None:
    """The preset's option values as a param would log them; None if this install does not know
    the method or preset (a plug-in that is not installed here)."""
    from kdbench.methods import resolve_config

    try:
        _, cfg = resolve_config(method, preset, {})
    except UserError:
        return None
    return {k: encode_param(_plain(v)) for k, v in dataclasses.asdict(cfg).items()}


def _inert_options(method: str, preset: str, logged: dict[str, str]) -> set[str]:
    """The options that changed nothing in a run (a discriminator's width where none was built);
    none if this install cannot rebuild the run's config."""
    from kdbench.methods import get_method_class, resolve_config

    try:
        _, cfg = resolve_config(method, preset, {k: decode_param(v) for k, v in logged.items()})
    except UserError:
        return set()
    return get_method_class(method).inert_options(cfg)


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _same(logged: str, preset_value: str) -> bool:
    return decode_param(logged) == decode_param(preset_value)


def variant_labels(runs: pd.DataFrame) -> pd.Series:
    """The table's row label of every run that belongs in a table (indexed like ``runs``), so a
    figure names a run exactly as the table does."""
    t = select_runs(runs, newest_only=False)
    if t.empty:
        return pd.Series(dtype=object)
    variants = [Variant(r.role, r.method, r.preset, r.options, r.setting, teacher=r.student if r.role == Role.TEACHER else "") for r in t.itertuples()]
    return pd.Series([v.label for v in variants], index=t.index)


def select_runs(runs: pd.DataFrame, metric: str = Metric.MIOU, newest_only: bool = True) -> pd.DataFrame:
    """One row per run that belongs in a table: FINISHED student and teacher runs evaluated on val
    (tuning trials, held-out evaluations and study parents left out), with the keys tables need:
    role, method, preset, options, setting, dataset, student, teacher, seed, value, and the newest
    run only where a (variant, seed, group) was run more than once."""
    check_metric(metric)
    if runs.empty:
        return pd.DataFrame()
    role = column(runs, tag_col(Tag.ROLE))
    split = column(runs, tag_col(Tag.EVAL_SPLIT))
    keep = (
        (column(runs, RunCol.STATUS) == RunCol.FINISHED)
        & role.isin([Role.STUDENT, Role.TEACHER])
        & (split.isna() | (split == "val"))
        & column(runs, tag_col(Tag.TRIAL)).isna()
    )
    runs = runs[keep]
    if runs.empty:
        return pd.DataFrame()
    seed_tag, seed_param = column(runs, tag_col(Tag.SEED)), column(runs, param_col(Param.SEED))
    start, end = pd.to_datetime(column(runs, RunCol.START)), pd.to_datetime(column(runs, RunCol.END))
    t = pd.DataFrame(
        {
            "run_id": column(runs, RunCol.RUN_ID),
            "role": role[keep],
            "method": column(runs, tag_col(Tag.METHOD)).map(_text),
            "preset": column(runs, tag_col(Tag.PRESET)).map(_text),
            "dataset": column(runs, tag_col(Tag.DATASET)).map(_text),
            "student": column(runs, tag_col(Tag.STUDENT)).map(_text),
            "teacher": column(runs, tag_col(Tag.TEACHER)).map(_text),
            "seed": [decode_param(s if isinstance(s, str) else p) for s, p in zip(seed_tag, seed_param)],
            "value": pd.to_numeric(column(runs, metric_col(metric)), errors="coerce"),
            "teacher_miou": pd.to_numeric(column(runs, tag_col(Tag.TEACHER_MIOU)), errors="coerce"),
            "other": pd.to_numeric(column(runs, metric_col(_other(metric))), errors="coerce"),
            "images_per_s": pd.to_numeric(column(runs, metric_col(Metric.IMAGES_PER_S)), errors="coerce"),
            "params": pd.to_numeric(column(runs, metric_col(Metric.PARAMS)), errors="coerce"),
            "multiply_adds": pd.to_numeric(column(runs, metric_col(Metric.MULTIPLY_ADDS)), errors="coerce"),
            "wall_s": (end - start).dt.total_seconds(),
            "start": start,
        },
        index=runs.index,
    )
    t = t[t["value"].notna()]
    students = t["role"] == Role.STUDENT

    # method options that differ from the preset's values (and change something in the run)
    prefix = param_col(Param.METHOD_PARAMS_PREFIX)
    option_cols = [c for c in runs.columns if c.startswith(prefix)]
    options: dict[Any, tuple[tuple[str, str], ...]] = {}
    for (method, preset), idx in t[students].groupby(["method", "preset"]).groups.items():
        logged = runs.loc[idx, option_cols]
        preset_values = _preset_values(method, preset)
        if preset_values is None:  # unknown defaults: show the options that differ between these runs
            shown = {c[len(prefix) :] for c in option_cols if logged[c].dropna().nunique() > 1}
        for i in idx:
            values = {c[len(prefix) :]: v for c, v in logged.loc[i].items() if isinstance(v, str)}
            if preset_values is None:
                options[i] = tuple((k, v) for k, v in values.items() if k in shown)
                continue
            inert = _inert_options(method, preset, values)
            options[i] = tuple(
                (k, v) for k, v in values.items() if k not in inert and (k not in preset_values or not _same(v, preset_values[k]))
            )
    t["options"] = [options.get(i, ()) for i in t.index]

    # the teacher's recipe keys that differ between runs (e.g. a teacher trained with CBAM taps for
    # AttnFD's paper preset): two teachers of one architecture are two rows, each named by them
    tcols = [c for c in runs.columns if c.startswith(param_col("teacher.")) and c != param_col("teacher.checkpoint")]
    tvary = sorted(c for c in tcols if runs.loc[t.index, c].dropna().nunique() > 1)
    default = json.loads(json.dumps(dataclasses.asdict(TeacherConfig())))  # tuples as the lists they are logged as
    t["teacher_opts"] = [
        tuple((k, v) for k, v in ((c[len(param_col("teacher.")) :], _text(runs.at[i, c]) or MISSING) for c in tvary) if not _same(v, default.get(k)))
        for i in t.index
    ]
    t.loc[~students, "options"] = t.loc[~students, "teacher_opts"]

    # recipe keys that differ between the student runs of a group: a different setting, not a rerun
    pcol = param_col("")
    setting_cols = [c for c in runs.columns if c.startswith(pcol) and not _not_setting(c[len(pcol) :])]
    varying_cols: set[str] = set()
    for _, idx in t[students].groupby(["dataset", "student"]).groups.items():
        logged = runs.loc[idx, setting_cols]
        varying_cols |= {c for c in setting_cols if logged[c].dropna().nunique() > 1}
    keys = sorted(varying_cols)
    t["setting"] = [
        tuple((c[len(pcol) :], _text(runs.at[i, c]) or MISSING) for c in keys) if s else ()
        for i, s in zip(t.index, students)
    ]

    if not newest_only:
        return t
    t = t.sort_values("start", ascending=False, kind="stable")
    ident = ["role", "method", "preset", "options", "setting", "dataset", "student", "teacher", "seed"]
    t = t.assign(_key=[repr(k) for k in t[ident].itertuples(index=False)])
    return t.drop_duplicates("_key").drop(columns="_key")


def build_table(runs: pd.DataFrame, metric: str = Metric.MIOU, resamples: int = RESAMPLES, seed: int = 0) -> ComparisonTable:
    """The comparison table of a ``search_runs`` frame (any MLflow store, or one built by hand)."""
    t = select_runs(runs, metric)
    if t.empty or not (t["role"] == Role.STUDENT).any():
        raise UserError(
            f"no finished student runs with a {metric!r} metric to tabulate (tuning trials are left out); "
            "make some with `kdbench run --method none` and `kdbench run --method kd`"
        )
    students, teachers = t[t["role"] == Role.STUDENT], t[t["role"] == Role.TEACHER]
    groups = sorted({Group(d, s) for d, s in zip(students["dataset"], students["student"])})

    runs_of: dict[tuple[Variant, Group], pd.DataFrame] = {}
    for g in groups:
        mine = students[(students["dataset"] == g.dataset) & (students["student"] == g.student)]
        keys = [Variant(Role.STUDENT, r.method, r.preset, r.options, r.setting) for r in mine.itertuples()]
        for v in dict.fromkeys(keys):
            runs_of[(v, g)] = mine[[k == v for k in keys]]
        taught_by = mine[mine["method"] != "none"]  # a plain student logs the recipe's teacher but has none
        for tch, topts in sorted(set(zip(mine["teacher"], mine["teacher_opts"]))):  # a teacher run belongs to the groups it taught
            rows = teachers[(teachers["dataset"] == g.dataset) & (teachers["student"] == tch) & (teachers["teacher_opts"].map(repr) == repr(topts))]
            if rows.empty and metric == Metric.MIOU:  # trained in another store: its students carry its mIoU
                taught = taught_by[(taught_by["teacher"] == tch) & (taught_by["teacher_opts"].map(repr) == repr(topts)) & taught_by["teacher_miou"].notna()]
                rows = taught.drop_duplicates("teacher_miou").assign(value=lambda f: f["teacher_miou"], seed="-", other=math.nan, **dict.fromkeys(RUN_NUMBERS, math.nan))
            runs_of[(Variant(Role.TEACHER, "none", "-", topts, teacher=tch), g)] = rows
    teacher_rows = sorted({v for v, _ in runs_of if v.is_teacher}, key=lambda v: (v.teacher, len(v.options), v.options))
    student_rows = sorted({v for v, _ in runs_of if not v.is_teacher}, key=lambda v: (v.setting, not v.is_plain, v.method, v.preset, v.options))
    variants = teacher_rows + student_rows

    records, rows_of = [], {}
    for vi, v in enumerate(variants):
        for gi, g in enumerate(groups):
            rows = runs_of.get((v, g), t.iloc[:0])
            rows_of[(vi, gi)] = list(rows.index)
            values = dict(zip(rows["seed"], rows["value"]))
            base = next((r for (w, h), r in runs_of.items() if h == g and w.is_plain and w.setting == v.setting), None)
            rec = _cell(values, rows, _other(metric))
            rec.update(variant=vi, group=gi, label=v.label, role=v.role, method=v.method, preset=v.preset,
                       options=" ".join(f"{k}={x}" for k, x in v.options), setting=" ".join(f"{k}={x}" for k, x in v.setting),
                       dataset=g.dataset, student=g.student, metric=metric, run_ids=" ".join(map(str, rows["run_id"])))
            if not v.is_teacher and not v.is_plain and base is not None and rec["n"]:
                base_values = dict(zip(base["seed"], base["value"]))
                rec["delta"] = rec["mean"] - float(np.mean(list(base_values.values())))
                test = paired_test(values, base_values, resamples, seed)
                if test is not None:
                    rec.update(n_paired=test.n, t=test.t, p=test.p, ci_low=test.ci_low, ci_high=test.ci_high, within_noise=test.within_noise)
                else:
                    rec["n_paired"] = len(set(values) & set(base_values))
            records.append(rec)
    frame = pd.DataFrame.from_records(records)
    for col, default in (("delta", math.nan), ("n_paired", 0), ("t", math.nan), ("p", math.nan), ("ci_low", math.nan), ("ci_high", math.nan), ("within_noise", None)):
        if col not in frame:
            frame[col] = default
    frame["n_paired"] = frame["n_paired"].fillna(0).astype(int)
    frame["within_noise"] = frame["within_noise"].astype(object).where(frame["within_noise"].notna(), None)
    is_student = frame["role"] == Role.STUDENT
    best = frame[is_student].groupby("group")["mean"].transform("max")
    frame["best"] = is_student & frame["mean"].notna() & np.isclose(frame["mean"], best.reindex(frame.index), rtol=0, atol=1e-12)
    frame = frame.set_index(["variant", "group"], drop=False)
    cols = ["label", "role", "method", "preset", "options", "setting", "dataset", "student", "metric", "n", "seeds", "mean", "std",
            "delta", "n_paired", "t", "p", "ci_low", "ci_high", "within_noise", "best", _other(metric), *RUN_NUMBERS,
            "run_ids", "variant", "group"]
    return ComparisonTable(metric, variants, groups, frame[cols], _other(metric), rows_of)


def _cell(values: dict[Any, float], rows: pd.DataFrame, other: str) -> dict[str, Any]:
    x = np.array(list(values.values()), dtype=float)
    n = len(x)
    seeds = sorted(values, key=lambda s: (not isinstance(s, int), s if isinstance(s, int) else str(s)))
    return {
        "n": n,
        "seeds": ",".join(map(str, seeds)),
        "mean": float(x.mean()) if n else math.nan,
        "std": float(x.std(ddof=1)) if n > 1 else math.nan,
        other: float(rows["other"].mean()) if n else math.nan,
        **{k: float(rows[k].mean()) if n else math.nan for k in RUN_NUMBERS},
    }


# ---------------------------------------------------------------------------------------------
# per-class IoU


@dataclass
class ClassTable:
    """Per-class IoU of one group: where a method's mIoU gain comes from (small classes, borders)."""

    group: Group
    variants: list[Variant]
    classes: list[str]
    mean: pd.DataFrame  #: variants x classes, fractions; NaN where no run
    n: list[int]


def per_class_tables(runs: pd.DataFrame, group: str | None = None) -> list[ClassTable]:
    """One ClassTable per (dataset, student) group, or only the group whose label contains ``group``."""
    prefix = metric_col(Metric.IOU_PREFIX)
    iou_cols = sorted(c for c in runs.columns if c.startswith(prefix))
    if not iou_cols:
        raise UserError(f"--per-class: the runs logged no per-class IoU ({Metric.IOU_PREFIX}<class> metrics)")
    table = build_table(runs, Metric.MIOU, resamples=1)
    groups = table.groups
    if group is not None:
        groups = [g for g in groups if group in g.label]
        if len(groups) != 1:
            labels = "; ".join(g.label for g in table.groups)
            raise UserError(f"--group: {group!r} matches {len(groups)} of the groups ({labels}); give a part of exactly one")
    out = []
    for g in groups:
        gi = table.groups.index(g)
        means, ns = [], []
        for vi in range(len(table.variants)):
            rows = table.rows[(vi, gi)]
            means.append(runs.loc[rows, iou_cols].apply(pd.to_numeric, errors="coerce").mean() if rows else pd.Series(math.nan, index=iou_cols))
            ns.append(len(rows))
        frame = pd.DataFrame(means, columns=iou_cols).reset_index(drop=True)
        frame.columns = [c[len(prefix) :] for c in iou_cols]
        frame = frame.loc[:, frame.notna().any()]
        out.append(ClassTable(g, list(table.variants), list(frame.columns), frame, ns))
    return out


# ---------------------------------------------------------------------------------------------
# rendering: tables become a Grid (cells with bold and noise marks), a Grid becomes text


@dataclass
class Cell:
    text: str
    bold: bool = False
    noise: bool = False  #: rendered as a trailing ~ (LaTeX: a superscript ~)


@dataclass
class Grid:
    groups: list[tuple[str, int]]  #: header groups over the columns after the label column
    header: list[str]
    rows: list[list[Cell]]
    rules: list[int] = field(default_factory=list)  #: a rule before these row indices
    note: str = ""
    title: str = ""


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}"


def giga(x: float) -> str:
    """Three significant digits (0.0449, 42.7), whole numbers from 100 (1986)."""
    return f"{x / 1e9:.3g}" if x < 1e11 else f"{x / 1e9:.0f}"


def _grid(table: ComparisonTable, extra: bool) -> Grid:
    name = metric_label(table.metric)
    sub = [name, "Δ", "95% CI", "p"] + ([metric_label(table.other_metric), "params", "GMACs", "wall", "img/s"] if extra else [])
    header = ["method"] + sub * len(table.groups)
    rows: list[list[Cell]] = []
    for v in table.variants:
        row = [Cell(v.label)]
        for g in table.groups:
            c = table.cell(v, g)
            if c["n"] == 0:
                row += [Cell(MISSING)] + [Cell("" if v.is_teacher or v.is_plain else MISSING)] * 3
                row += [Cell(MISSING)] * 5 if extra else []
                continue
            spread = f" ± {_pct(c['std'])}" if c["n"] > 1 else ""
            row.append(Cell(f"{_pct(c['mean'])}{spread} ({c['n']})", bold=bool(c["best"])))
            if v.is_teacher or v.is_plain:
                row += [Cell("")] * 3
            elif math.isnan(c["delta"]):
                row += [Cell(MISSING)] * 3
            elif c["within_noise"] is None:
                row += [Cell(_signed(c["delta"])), Cell("no test"), Cell("no test")]
            else:
                p = "<0.001" if c["p"] < 0.001 else f"{c['p']:.3f}"
                ci = f"[{_signed(c['ci_low'])}, {_signed(c['ci_high'])}]"
                row += [Cell(_signed(c["delta"]), noise=bool(c["within_noise"])), Cell(ci), Cell(p)]
            if extra:
                other, wall, ips, params, macs = (c[k] for k in (table.other_metric, "wall_s", "images_per_s", "params", "multiply_adds"))
                row += [
                    Cell(MISSING if math.isnan(other) else _pct(other)),
                    Cell(MISSING if math.isnan(params) else f"{params / 1e6:.2f} M"),
                    Cell(MISSING if math.isnan(macs) else giga(macs)),
                    Cell(MISSING if math.isnan(wall) else f"{wall:.0f} s"),
                    Cell(MISSING if math.isnan(ips) else f"{ips:.1f}"),
                ]
        rows.append(row)
    n_teachers = sum(v.is_teacher for v in table.variants)
    rules = [n_teachers] if 0 < n_teachers < len(rows) else []
    for i in range(n_teachers + 1, len(table.variants)):
        if table.variants[i].setting != table.variants[i - 1].setting:
            rules.append(i)
    note = (
        f"{name} (%) of the final evaluation on val: mean ± std over seeds (n runs; std with n-1). "
        "Bold: the best student per column. Δ: difference of the means to the plain student (percentage points); "
        f"p: paired t-test over the seeds both have; 95% CI: bootstrap ({RESAMPLES} resamples) of the mean paired difference; "
        f"~: {NOISE_NOTE}; no test: fewer than 2 shared seeds; {MISSING}: no finished run (Δ: or no plain student to compare with)."
    )
    if extra:
        note += (
            " params: the trained model's parameters; GMACs: its multiply-adds (1e9) on one image at the training crop, of "
            "convolutions and matrix products (what papers call FLOPs); wall: MLflow run start to end (evaluation included); img/s: training throughput (last logged value)."
        )
    return Grid([(g.label, len(sub)) for g in table.groups], header, rows, rules, note)


def _class_grid(ct: ClassTable) -> Grid:
    header = ["method", "n", *ct.classes]
    student = [not v.is_teacher for v in ct.variants]
    best = ct.mean[student].max() if any(student) else pd.Series(dtype=float)
    rows = []
    for i, v in enumerate(ct.variants):
        row = [Cell(v.label), Cell(str(ct.n[i]) if ct.n[i] else MISSING)]
        for c in ct.classes:
            x = ct.mean.at[i, c]
            row.append(Cell(MISSING if math.isnan(x) else _pct(x), bold=student[i] and not math.isnan(x) and x == best[c]))
        rows.append(row)
    n_teachers = sum(v.is_teacher for v in ct.variants)
    rules = [n_teachers] if 0 < n_teachers < len(rows) else []
    note = f"IoU (%) per class on val, mean over n seeds; bold: the best student per class; {MISSING}: no finished run."
    return Grid([], header, rows, rules, note, title=f"Per-class IoU, {ct.group.label}")


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def grid_markdown(grid: Grid) -> str:
    def cell(c: Cell) -> str:
        text = _md_escape(c.text) + ("~" if c.noise else "")
        return f"**{text}**" if c.bold else text

    lines = [f"**{grid.title}**", ""] if grid.title else []
    header = list(grid.header)
    if grid.groups:  # Markdown has one header row: name each group's first column after the group
        i = 1
        for label, span in grid.groups:
            header[i] = f"{label} {header[i]}"
            i += span
    lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
    lines.append("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in grid.rows]
    if grid.note:
        lines += ["", grid.note]
    return "\n".join(lines) + "\n"


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "–": "--",
    "≥": r"$\geq$",
    "<": r"$<$",
    ">": r"$>$",
}


def latex_escape(s: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in s)


def grid_latex(grid: Grid) -> str:
    def cell(c: Cell) -> str:
        text = latex_escape(c.text) + (r"$^{\sim}$" if c.noise else "")
        return rf"\textbf{{{text}}}" if c.bold else text

    ncols = len(grid.header)
    lines = [rf"% {latex_escape(grid.title)}"] if grid.title else []
    lines += [rf"\begin{{tabular}}{{l{'r' * (ncols - 1)}}}", r"\toprule"]
    if grid.groups:
        parts, rules, col = [""], [], 2
        for label, span in grid.groups:
            parts.append(rf"\multicolumn{{{span}}}{{c}}{{{latex_escape(label)}}}")
            rules.append(rf"\cmidrule(lr){{{col}-{col + span - 1}}}")
            col += span
        lines += [" & ".join(parts) + r" \\", " ".join(rules)]
    lines.append(" & ".join(latex_escape(h) for h in grid.header) + r" \\")
    lines.append(r"\midrule")
    for i, row in enumerate(grid.rows):
        if i in grid.rules:
            lines.append(r"\midrule")
        lines.append(" & ".join(cell(c) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if grid.note:
        note = latex_escape(grid.note).replace(r"\textasciitilde{}:", r"$^{\sim}$:")
        lines += ["", r"\smallskip", rf"{{\footnotesize {note}}}"]
    return "\n".join(lines) + "\n"


def grid_html(grid: Grid) -> str:
    def cell(c: Cell, tag: str = "td", align: str = "right") -> str:
        text = html.escape(c.text) + ("~" if c.noise else "")
        text = f"<b>{text}</b>" if c.bold else text
        return f'<{tag} style="text-align: {align}">{text}</{tag}>'

    lines = [f"<p><b>{html.escape(grid.title)}</b></p>"] if grid.title else []
    lines += ['<table class="kdbench">', "<thead>"]
    if grid.groups:
        tops = ["<th></th>"] + [f'<th colspan="{span}" style="text-align: center">{html.escape(label)}</th>' for label, span in grid.groups]
        lines.append("<tr>" + "".join(tops) + "</tr>")
    lines.append("<tr>" + "".join(cell(Cell(h), "th", "left" if i == 0 else "right") for i, h in enumerate(grid.header)) + "</tr>")
    lines += ["</thead>", "<tbody>"]
    for i, row in enumerate(grid.rows):
        style = ' style="border-top: 1px solid"' if i in grid.rules else ""
        lines.append(f"<tr{style}>" + "".join(cell(c, align="left" if j == 0 else "right") for j, c in enumerate(row)) + "</tr>")
    lines += ["</tbody>", "</table>"]
    if grid.note:
        lines.append(f"<p><small>{html.escape(grid.note)}</small></p>")
    return "\n".join(lines) + "\n"


_CSV_COLUMNS = ["label", "role", "method", "preset", "options", "setting", "dataset", "student", "metric", "n", "seeds", "run_ids"]


def table_csv(table: ComparisonTable) -> str:
    """One row per (variant, group), missing ones included (n = 0): numbers only, in percent
    (percentage points for differences), p and t as they are."""
    f = table.frame.reset_index(drop=True)
    out = f[_CSV_COLUMNS].copy()
    for col in ("mean", "std", "delta", "ci_low", "ci_high", table.other_metric):
        out[f"{col}_pct"] = 100 * f[col]
    out["n_paired"], out["t"], out["p"] = f["n_paired"], f["t"], f["p"]
    out["within_noise"], out["best"] = f["within_noise"], f["best"]
    for col in RUN_NUMBERS:
        out[col] = f[col]
    return out.to_csv(index=False)


def class_csv(tables: Sequence[ClassTable]) -> str:
    """One row per (variant, group, class): IoU in percent, mean over n runs."""
    records = []
    for ct in tables:
        for i, v in enumerate(ct.variants):
            for c in ct.classes:
                records.append({"label": v.label, "dataset": ct.group.dataset, "student": ct.group.student, "class": c, "n": ct.n[i], "iou_pct": 100 * ct.mean.at[i, c]})
    buf = io.StringIO()
    pd.DataFrame.from_records(records, columns=["label", "dataset", "student", "class", "n", "iou_pct"]).to_csv(buf, index=False)
    return buf.getvalue()


_GRID_RENDERERS = {"md": grid_markdown, "latex": grid_latex, "html": grid_html}


def metric_label(metric: str) -> str:
    """A column's name: "mIoU", or "mIoU (eval s1_flip)" for a `kdbench eval` result."""
    head, _, name = metric.rpartition("/")
    return METRICS[name] + (f" ({head.replace('/', ' ')})" if head else "")


def check_metric(metric: str) -> str:
    """miou, pixel_acc, or one of `kdbench eval`'s (eval/SETTING/miou, e.g. eval/s1_flip/miou)."""
    evaluated = metric.startswith(Metric.EVAL_PREFIX) and metric.rsplit("/", 1)[-1] in METRICS and metric.count("/") == 2
    if metric not in METRICS and not evaluated:
        raise UserError(f"--metric: expected one of {', '.join(METRICS)} or a `kdbench eval` result such as eval/s1_flip/miou, got {metric!r}")
    return metric


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def format_for(path: str | None, fmt: str | None) -> str:
    """--format, else the --out file's suffix, else Markdown."""
    if fmt:
        return check_format(fmt)
    if not path:
        return "md"
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in SUFFIXES:
        raise UserError(f"--out: cannot tell the format of {path!r} from its suffix ({', '.join(SUFFIXES)}); add --format {'|'.join(FORMATS)}")
    return SUFFIXES[suffix]


def render(table: ComparisonTable, fmt: Format = "md", extra: bool = False) -> str:
    """The comparison table as Markdown, LaTeX (booktabs), CSV (tidy, numeric) or HTML."""
    if check_format(fmt) == "csv":
        return table_csv(table)
    return _GRID_RENDERERS[fmt](_grid(table, extra))


def render_classes(tables: Sequence[ClassTable], fmt: Format = "md") -> str:
    """Per-class tables, one after the other (CSV: one tidy frame)."""
    if check_format(fmt) == "csv":
        return class_csv(tables)
    return "\n".join(_GRID_RENDERERS[fmt](_class_grid(ct)) for ct in tables)
