"""`kdbench table`: tables from real MLflow runs of the tiny recipe, statistics checked against hand
arithmetic on a search_runs-shaped frame, every output format, and the command line."""

import io
import itertools
import math
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.errors import UserError
from kdbench.methods import resolve_config
from kdbench.outputs import use_tracking
from kdbench.recipe import load_recipe
from kdbench.run import run
from kdbench.schema import Metric, Param, Role, RunCol, Tag, encode_param, metric_col, param_col, tag_col
from kdbench.table import MISSING, build_table, format_for, load_runs, paired_test, per_class_tables, render, render_classes
from kdbench.tracking import read_store

# as short as a run gets: two steps, one evaluation at the end, no checkpoints in between
SHORT = ["train.iterations=2", "train.eval_interval=0", "train.checkpoint_interval=0", "train.log_interval=1"]
PLUS, PLAIN = "deeplabv3plus/resnet10t", "deeplabv3/resnet10t"


@pytest.fixture(scope="module")
def store(shared_workdir):
    """Real runs: none and kd at seeds 0-2 (kd seed 2 run twice), kd with temperature 2 at seed 0,
    and the plain student of another architecture (a column where every distilled cell is missing)."""
    ids = {}
    for method in ("none", "kd"):
        for seed in (0, 1, 2):
            ids[method, seed] = run(load_recipe("tiny", SHORT, method=method, seed=seed), quiet=True).run_id
    ids["kd", "2-old"] = ids["kd", 2]
    ids["kd", 2] = run(load_recipe("tiny", SHORT, method="kd", seed=2), quiet=True).run_id  # a rerun: the newest counts
    ids["kd-t2", 0] = run(load_recipe("tiny", [*SHORT, "method.temperature=2"], method="kd", seed=0), quiet=True).run_id
    ids["other", 0] = run(load_recipe("tiny", [*SHORT, "student.arch=deeplabv3"], method="none", seed=0), quiet=True).run_id
    return ids


def test_a_teacher_trained_in_another_store_shows_the_miou_its_students_carry(store):
    runs = load_runs()
    students_only = runs[runs[tag_col(Tag.ROLE)] == Role.STUDENT]
    teacher_miou = float(students_only[tag_col(Tag.TEACHER_MIOU)].astype(float).dropna().iloc[0])  # none runs carry nan
    table = build_table(students_only)
    teacher = table.variants[0]
    assert teacher.is_teacher
    cell = table.cell(teacher, table.groups[1])
    assert cell["n"] == 1 and math.isclose(cell["mean"], teacher_miou)
    assert math.isclose(teacher_miou, build_table(runs).cell(teacher, table.groups[1])["mean"], rel_tol=1e-5)  # the run's own


def _miou(run_id):
    return mlflow.get_run(run_id).data.metrics[Metric.MIOU]


def test_table_of_real_runs(store):
    table = build_table(load_runs())
    labels = [v.label for v in table.variants]
    assert labels == [f"teacher ({PLUS})", "none (default)", "kd (cirkd)", "kd (cirkd) temperature=2"]
    assert [g.label for g in table.groups] == [f"synthetic: {PLAIN}", f"synthetic: {PLUS}"]
    plain_col, plus = table.groups
    teacher, none, kd, kd_t2 = table.variants

    c = table.cell(kd, plus)
    newest = [store["kd", s] for s in (0, 1, 2)]
    assert c["n"] == 3 and c["seeds"] == "0,1,2"
    assert set(c["run_ids"].split()) == set(newest) and store["kd", "2-old"] not in c["run_ids"]
    assert math.isclose(c["mean"], np.mean([_miou(i) for i in newest]))
    assert math.isclose(c["std"], np.std([_miou(i) for i in newest], ddof=1))
    base = np.mean([_miou(store["none", s]) for s in (0, 1, 2)])
    assert math.isclose(c["delta"], c["mean"] - base) and c["n_paired"] == 3
    from kdbench.models import build_model
    from kdbench.models.complexity import multiply_adds

    tiny = load_recipe("tiny")
    assert c["params"] == sum(p.numel() for p in build_model(tiny.student, 9).parameters())
    assert c["multiply_adds"] == multiply_adds(build_model(tiny.student, 9), tiny.train.crop_size)
    extra = render(table, "md", extra=True)
    assert "| GMACs |" in extra and f"| {c['multiply_adds'] / 1e9:.3g} |" in next(x for x in extra.splitlines() if x.startswith("| kd (cirkd) |"))
    assert table.cell(kd_t2, plus)["n"] == 1 and math.isclose(table.cell(kd_t2, plus)["mean"], _miou(store["kd-t2", 0]))
    assert table.cell(teacher, plus)["n"] == 1 and table.cell(teacher, plain_col)["n"] == 1  # one teacher taught both
    assert math.isclose(table.cell(none, plain_col)["mean"], _miou(store["other", 0]))

    # the other architecture's column: distilled cells missing, shown as such
    assert table.cell(kd, plain_col)["n"] == 0 and table.cell(kd_t2, plain_col)["n"] == 0
    md = render(table, "md").splitlines()
    kd_row = next(line for line in md if line.startswith("| kd (cirkd) |"))
    cells = [x.strip() for x in kd_row.strip("|").split("|")]
    assert cells[1:5] == [MISSING] * 4  # the deeplabv3 column comes first
    assert cells[5].strip("*").startswith(f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f} (3)")  # bold if the best
    t2_row = next(line for line in md if line.startswith("| kd (cirkd) temperature=2 |"))
    assert "no test" in t2_row  # one seed shared with the plain student

    # per-class IoU: the mean over the same runs of each iou/<class> metric
    (ct,) = per_class_tables(load_runs(), group="deeplabv3plus")
    assert ct.group == plus and "background" in ct.classes
    kd_row = ct.variants.index(kd)
    expected = np.mean([mlflow.get_run(i).data.metrics[Metric.iou("background")] for i in newest])
    assert ct.n[kd_row] == 3 and math.isclose(ct.mean.at[kd_row, "background"], expected)
    assert len(per_class_tables(load_runs())) == 2
    assert "Per-class IoU, synthetic: deeplabv3plus/resnet10t" in render_classes([ct], "md")


# ---------------------------------------------------------------------------------------------
# statistics by hand

T0 = pd.Timestamp("2026-01-01", tz="UTC")
TEACHER = "deeplabv3plus/resnet101"
R18 = "deeplabv3plus/resnet18"


def _run(role, method, preset, seed, miou, *, t=10, dataset="pascal_voc", student=R18, status="FINISHED", params=(), tags=()):
    row = {
        RunCol.RUN_ID: f"{method}-{preset}-{seed}-{t}",
        RunCol.STATUS: status,
        RunCol.START: T0 + pd.Timedelta(minutes=t),
        RunCol.END: T0 + pd.Timedelta(minutes=t + 2),
        tag_col(Tag.ROLE): role,
        tag_col(Tag.METHOD): method,
        tag_col(Tag.PRESET): preset,
        tag_col(Tag.DATASET): dataset,
        tag_col(Tag.STUDENT): student,
        tag_col(Tag.TEACHER): TEACHER,
        tag_col(Tag.SEED): str(seed),
        tag_col(Tag.EVAL_SPLIT): "val",
        metric_col(Metric.MIOU): miou,
        metric_col(Metric.PIXEL_ACC): miou + 0.3,
        metric_col(Metric.IMAGES_PER_S): 50.0,
    }
    row.update({param_col(Param.METHOD_PARAMS_PREFIX + k): v for k, v in dict(params).items()})
    row.update({tag_col(k): v for k, v in dict(tags).items()})
    return row


NONE = [0.50, 0.52, 0.49, 0.51]  # seeds 0-3
KD = [0.53, 0.56, 0.50, 0.55]  # paired differences 0.03, 0.04, 0.01, 0.04: clearly better
CWD = [0.51, 0.54, 0.58]  # seeds 0-2, differences 0.01, 0.02, 0.09: all positive, but p > 0.05
KD_MASK = [0.52, 0.51, 0.50, 0.495]  # differences 0.02, -0.01, 0.01, -0.015: noise


def _frame():
    layers = encode_param(resolve_config("attnfd", "default", {})[1].layers)  # the preset's value: not in the label
    rows = [_run(Role.TEACHER, "none", "-", 0, 0.75, student=TEACHER)]
    rows += [_run(Role.STUDENT, "none", "default", s, v) for s, v in enumerate(NONE)]
    rows += [_run(Role.STUDENT, "kd", "cirkd", s, v, params={"temperature": "1.0", "mask_ignore": "false"}) for s, v in enumerate(KD)]
    rows += [_run(Role.STUDENT, "kd", "cirkd", s, v, params={"temperature": "1.0", "mask_ignore": "true"}) for s, v in enumerate(KD_MASK)]
    rows += [_run(Role.STUDENT, "cwd", "paper", s, v) for s, v in enumerate(CWD)]
    rows += [_run(Role.STUDENT, "attnfd", "default", s, v, params={"alpha": "0.5", "layers": layers}) for s, v in ((0, 0.60), (7, 0.58))]
    rows += [_run(Role.STUDENT, "attnfd", "default", 0, 0.52, params={"alpha": "2.0", "layers": layers})]
    # an older run of the plain student at seed 0 (the newer one counts), and runs that never count
    rows += [_run(Role.STUDENT, "none", "default", 0, 0.10, t=1)]
    rows += [_run(Role.STUDENT, "kd", "cirkd", 1, 0.99, t=20, status="FAILED", params={"temperature": "1.0", "mask_ignore": "false"})]
    trial = _run(Role.STUDENT, "kd", "cirkd", 0, 0.99, t=30, params={"temperature": "1.0", "mask_ignore": "false"}, tags={Tag.TRIAL: "3"})
    rows += [{**trial, tag_col(Tag.EVAL_SPLIT): "holdout"}]
    rows += [_run(Role.STUDY, "kd", "cirkd", 0, 0.99, t=31)]
    rows += [_run(Role.STUDENT, "none", "default", 0, 0.40, dataset="cityscapes")]  # a column with the plain student only
    return pd.DataFrame(rows)


def _sd(x):
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))


def test_statistics_by_hand():
    table = build_table(_frame())
    assert [v.label for v in table.variants] == [
        f"teacher ({TEACHER})",
        "none (default)",
        "attnfd (default)",
        "attnfd (default) alpha=0.5",
        "cwd (paper)",
        "kd (cirkd)",
        "kd (cirkd) mask_ignore=true",
    ]
    city, voc = table.groups
    assert (city.dataset, voc.dataset) == ("cityscapes", "pascal_voc")
    cell = {v.label: table.cell(v, voc) for v in table.variants}

    # the plain student: the newest run of seed 0 (0.50, not 0.10), mean and sample std by hand
    none = cell["none (default)"]
    assert none["n"] == 4 and math.isclose(none["mean"], 0.505)
    # deviations -0.005, 0.015, -0.015, 0.005 -> squares sum 0.0005, / (n - 1) = 0.000166..
    assert math.isclose(none["std"], math.sqrt(0.0005 / 3)) and math.isclose(none["std"], _sd(NONE))

    kd = cell["kd (cirkd)"]  # the failed run and the tuning trial at 0.99 are not in it
    assert kd["n"] == 4 and math.isclose(kd["mean"], 0.535) and math.isclose(kd["std"], math.sqrt(0.0021 / 3))
    assert math.isclose(kd["delta"], 0.535 - 0.505)  # the student minus the plain student: positive
    # differences 0.03 0.04 0.01 0.04: mean 0.03, sd sqrt((0 + 1e-4 + 4e-4 + 1e-4) / 3) = 0.014142
    # t = 0.03 / (0.014142 / sqrt 4) = 4.2426, two-sided p = 2 * t.sf(4.2426, df 3) = 0.02398
    d_sd = math.sqrt(6e-4 / 3)
    t = 0.03 / (d_sd / math.sqrt(4))
    assert math.isclose(kd["t"], t, rel_tol=1e-9) and math.isclose(t, 4.242640687, rel_tol=1e-9)
    assert math.isclose(kd["p"], 2 * stats.t.sf(t, 3), rel_tol=1e-9) and math.isclose(kd["p"], 0.0239812, rel_tol=1e-5)
    assert kd["n_paired"] == 4 and kd["within_noise"] is False
    # the bootstrap exactly: the 4^4 = 256 resamples of the differences are equally likely; 1.95% of
    # them have a mean below 0.0175 and 5.08% at most 0.0175, so the 2.5th percentile is 0.0175; 6.25%
    # (all four drawn from the two 0.04s) have the largest mean, 0.04, which is so the 97.5th percentile
    means = sorted(sum(c) / 4 for c in itertools.product([0.03, 0.04, 0.01, 0.04], repeat=4))
    assert means[4] < 0.0175 - 1e-9 and math.isclose(means[5], 0.0175) and math.isclose(means[-16], 0.04)
    assert math.isclose(kd["ci_low"], 0.0175) and math.isclose(kd["ci_high"], 0.04)

    cwd = cell["cwd (paper)"]  # every difference positive, so the CI excludes 0, but t = 1.589 on 2 df: p = 0.253
    assert cwd["n_paired"] == 3 and math.isclose(cwd["delta"], np.mean(CWD) - 0.505)
    assert math.isclose(cwd["t"], 0.04 / (_sd([0.01, 0.02, 0.09]) / math.sqrt(3)), rel_tol=1e-9)
    assert math.isclose(cwd["p"], 0.2529126, rel_tol=1e-5) and cwd["ci_low"] > 0 and cwd["within_noise"] is True

    mask = cell["kd (cirkd) mask_ignore=true"]  # differences of both signs: the CI contains 0
    assert math.isclose(mask["delta"], 0.00125) and mask["ci_low"] < 0 < mask["ci_high"] and mask["within_noise"] is True
    assert math.isclose(mask["t"], 0.00125 / (_sd([0.02, -0.01, 0.01, -0.015]) / 2), rel_tol=1e-9)

    alpha = cell["attnfd (default) alpha=0.5"]  # seeds 0 and 7: one shared with the plain student, no test
    assert alpha["n"] == 2 and math.isclose(alpha["mean"], 0.59) and math.isclose(alpha["std"], math.sqrt(2e-4))
    assert alpha["n_paired"] == 1 and math.isnan(alpha["p"]) and alpha["within_noise"] is None
    assert math.isclose(alpha["delta"], 0.59 - 0.505)
    assert cell["attnfd (default)"]["n"] == 1  # alpha 2.0 and the default layers are the preset's values

    # the best student is bold, not the (better) teacher
    assert [label for label, c in cell.items() if c["best"]] == ["attnfd (default) alpha=0.5"]
    assert cell[f"teacher ({TEACHER})"]["mean"] == 0.75 and not cell[f"teacher ({TEACHER})"]["best"]

    # a column with only the plain student: every other cell there is missing, and the teacher too
    assert table.cell(table.variants[1], city)["n"] == 1
    assert all(table.cell(v, city)["n"] == 0 for v in table.variants if v.label != "none (default)")
    assert len(table.frame) == len(table.variants) * len(table.groups)


def test_paired_test_and_bootstrap():
    assert paired_test({0: 0.5}, {0: 0.4, 1: 0.3}) is None
    a, b = {0: 0.53, 1: 0.56, 2: 0.50, 3: 0.55}, dict(enumerate(NONE))
    res = paired_test(a, b)
    assert res.n == 4 and math.isclose(res.mean_diff, 0.03) and not res.within_noise
    rng = np.random.default_rng(5)
    x, y = dict(enumerate(rng.normal(0.5, 0.02, 12))), dict(enumerate(rng.normal(0.5, 0.02, 12)))
    assert paired_test(x, y) == paired_test(x, y)  # the bootstrap is seeded: the same CI every time
    assert paired_test(x, y, seed=1) != paired_test(x, y)  # (12 differences: another seed, another CI)
    assert 0.01 - 1e-12 <= res.ci_low < 0.03 < res.ci_high <= 0.04 + 1e-12  # around the mean, inside the differences' range
    assert paired_test({**a, 4: 0.0}, {**b, 4: 0.5}).within_noise  # one large loss: CI reaches below 0


def test_options_are_compared_with_the_preset():
    """CWD's cirkd preset turns pixel KD on (kd_weight 1.0; the Config default is 0.0): a run at the
    preset's values has no options in its label, a run that turns it off shows kd_weight=0. Options
    that change nothing in a run (``Method.inert_options``) are not shown."""
    cirkd = {"weight": "3.0", "temperature": "4.0", "feature_weight": "50.0", "kd_weight": "1.0"}
    rows = [_run(Role.STUDENT, "none", "default", 0, 0.5)]
    rows += [_run(Role.STUDENT, "cwd", "cirkd", 0, 0.6, params=cirkd)]
    rows += [_run(Role.STUDENT, "cwd", "cirkd", 0, 0.55, params={**cirkd, "kd_weight": "0.0"})]
    rows += [_run(Role.STUDENT, "cwd", "paper", 0, 0.52, params={"weight": "3.0", "kd_weight": "0.0"})]
    rows += [_run(Role.STUDENT, "cwd", "paper", 0, 0.53, params={"weight": "5", "kd_weight": "0.0"})]  # 5 logged as int
    # a discriminator's width changes nothing where no discriminator is built (paper: adv_weight 0):
    # not in the name, and the run pools with the other seed of its configuration
    rows += [_run(Role.STUDENT, "cwd", "paper", 1, 0.54, params={"weight": "3.0", "kd_weight": "0.0", "adv_width": "32"})]
    rows += [_run(Role.STUDENT, "cwd", "cirkd", 0, 0.61, params={**cirkd, "adv_width": "32"})]
    table = build_table(pd.DataFrame(rows))
    labels = [v.label for v in table.variants]
    assert labels[1:] == ["none (default)", "cwd (cirkd)", "cwd (cirkd) adv_width=32", "cwd (cirkd) kd_weight=0", "cwd (paper)", "cwd (paper) weight=5"]
    assert table.cell(table.variants[5], table.groups[0])["n"] == 2


def test_a_recipe_key_that_differs_splits_rows_and_baselines():
    rows = []
    for iters, shift in (("300", 0.0), ("600", 0.1)):
        p = {param_col(Param.ITERATIONS): iters, param_col("output_dir"): f"out{iters}"}  # output_dir: not a setting
        rows += [{**_run(Role.STUDENT, "none", "default", s, v + shift), **p} for s, v in enumerate(NONE)]
        rows += [{**_run(Role.STUDENT, "kd", "cirkd", s, v + shift), **p} for s, v in enumerate(KD)]
    table = build_table(pd.DataFrame(rows))
    assert [v.label for v in table.variants] == [
        f"teacher ({TEACHER})",  # named by the students' runs, without a run of its own: its cells are missing
        "none (default); train.iterations=300",
        "kd (cirkd); train.iterations=300",
        "none (default); train.iterations=600",
        "kd (cirkd); train.iterations=600",
    ]
    (g,) = table.groups
    assert table.cell(table.variants[0], g)["n"] == 0
    for v in table.variants[2::2]:  # each compared with the plain student of its own setting
        assert math.isclose(table.cell(v, g)["delta"], 0.03) and table.cell(v, g)["n_paired"] == 4


def test_two_teachers_of_one_architecture_are_two_rows():
    """AttnFD's paper preset distils from a teacher trained with CBAM taps, the other methods from
    the plain one: both teachers are rows, named by the teacher key that differs, each with its own
    run (or, trained in another store, the mIoU its students carry)."""
    plain, cbam = {param_col("teacher.attention_taps"): "[]"}, {param_col("teacher.attention_taps"): '["backbone"]'}
    rows = [{**_run(Role.TEACHER, "none", "-", 0, 0.75, student=TEACHER), **plain}]
    rows += [{**_run(Role.TEACHER, "none", "-", 0, 0.71, student=TEACHER, t=3), **cbam}]
    rows += [{**_run(Role.STUDENT, "none", "default", s, v), **plain} for s, v in enumerate(NONE)]
    rows += [{**_run(Role.STUDENT, "attnfd", "paper", s, v, tags={Tag.TEACHER_MIOU: "0.71"}), **cbam} for s, v in enumerate(KD)]
    table = build_table(pd.DataFrame(rows))
    (g,) = table.groups
    assert [v.label for v in table.variants[:2]] == [f"teacher ({TEACHER})", f'teacher ({TEACHER}) attention_taps=["backbone"]']
    assert [table.cell(v, g)["mean"] for v in table.variants[:2]] == [0.75, 0.71]
    fallback = build_table(pd.DataFrame(rows[2:]))  # no teacher runs: the CBAM teacher's mIoU from its students
    assert fallback.cell(fallback.variants[1], g)["mean"] == pytest.approx(0.71)
    assert fallback.cell(fallback.variants[0], g)["n"] == 0


# ---------------------------------------------------------------------------------------------
# formats


def test_latex():
    text = render(build_table(_frame()), "latex", extra=True)
    assert text.count(r"\begin{tabular}") == 1 and text.count(r"\end{tabular}") == 1
    assert text.index(r"\begin{tabular}") < text.index(r"\toprule") < text.index(r"\midrule") < text.index(r"\bottomrule") < text.index(r"\end{tabular}")
    assert r"mask\_ignore=true" in text and r"pascal\_voc" in text and "mask_ignore" not in text.replace(r"\_", "")
    assert r"\textbf{59.00 $\pm$ 1.41 (2)}" in text
    assert r"$^{\sim}$" in text and r"95\% CI" in text and "±" not in text
    body = text[text.index(r"\begin{tabular}") : text.index(r"\end{tabular}")]
    ncols = len(body.split(r"\begin{tabular}{")[1].split("}")[0])
    for line in body.splitlines():
        if line.endswith(r"\\") and r"\multicolumn" not in line:
            assert line.count(" & ") == ncols - 1, line


def test_markdown():
    text = render(build_table(_frame()), "md")
    lines = text.splitlines()
    assert lines[0].startswith("| method | cityscapes: deeplabv3plus/resnet18 mIoU |")
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
    assert all(line.count("|") == lines[0].count("|") for line in lines[: 2 + 7])
    assert "**59.00 ± 1.41 (2)**" in text and "**40.00 (1)**" in text and text.count("**") == 4  # one per column
    kd = next(line for line in lines if line.startswith("| kd (cirkd) |"))
    assert "| +3.00 |" in kd and "| 0.024 |" in kd
    assert "| +3.83~ |" in next(line for line in lines if line.startswith("| cwd (paper) |"))
    assert "~: within noise" in text


def test_csv():
    table = build_table(_frame())
    frame = pd.read_csv(io.StringIO(render(table, "csv")))
    assert len(frame) == 7 * 2
    for col in ("mean_pct", "std_pct", "n", "delta_pct", "p", "ci_low_pct", "ci_high_pct", "t"):
        assert pd.api.types.is_numeric_dtype(frame[col]), col
    kd = frame[(frame["label"] == "kd (cirkd)") & (frame["dataset"] == "pascal_voc")].iloc[0]
    assert math.isclose(kd["mean_pct"], 53.5) and math.isclose(kd["delta_pct"], 3.0) and math.isclose(kd["p"], 0.0239812, rel_tol=1e-5)
    assert math.isclose(kd["std_pct"], 100 * math.sqrt(0.0021 / 3))  # full precision, not the table's 2 decimals
    missing = frame[(frame["label"] == "kd (cirkd)") & (frame["dataset"] == "cityscapes")].iloc[0]
    assert missing["n"] == 0 and math.isnan(missing["mean_pct"])


def test_html():
    text = render(build_table(_frame()), "html")
    assert text.count("<table") == 1 and "</table>" in text and 'colspan="4"' in text
    assert "<b>59.00 ± 1.41 (2)</b>" in text and "<b>40.00 (1)</b>" in text and text.count("<b>") == 2


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_table(store, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["table"])
    assert r.exit_code == 0, r.output
    assert "| kd (cirkd) temperature=2 |" in r.output and "synthetic: deeplabv3plus/resnet10t mIoU" in r.output
    out = tmp_path / "t.tex"
    r = runner.invoke(app, ["table", "--experiment", "kdbench-tiny", "--extra", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r"\begin{tabular}" in out.read_text() and "img/s" in out.read_text()
    r = runner.invoke(app, ["table", "--per-class", "--format", "csv", "--out", str(tmp_path / "c.csv")])
    assert r.exit_code == 0 and "background" in set(pd.read_csv(tmp_path / "c.csv")["class"])
    with pytest.raises(UserError, match="--experiment: no experiment 'nosuch'"):
        load_runs(["nosuch"])
    with pytest.raises(UserError, match="--format: expected one of md, latex, csv, html"):
        format_for(None, "docx")
    with pytest.raises(UserError, match="--out: cannot tell the format"):
        format_for("t.txt", None)


def test_cli_missing_or_empty_store_is_one_line_exit_2(tmp_path, store):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'nosuch.db'}"}
    r = subprocess.run([sys.executable, "-m", "kdbench.cli", "table"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: no MLflow store at sqlite:///") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--tracking-uri" in r.stderr and not (tmp_path / "nosuch.db").exists()  # reading creates no store
    assert "stores in this folder" not in r.stderr
    with pytest.raises(UserError, match=r"no finished runs in experiment\(s\) Default of sqlite:///.*kdbench run --method kd"):
        load_runs(["Default"])  # a store that exists, without runs
    (tmp_path / "exp1").mkdir()
    (tmp_path / "exp1" / "mlflow.db").touch()  # the store of a run made with --set output_dir=exp1
    store_uri = os.environ["MLFLOW_TRACKING_URI"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        try:
            with pytest.raises(UserError) as err:
                read_store(f"sqlite:///{tmp_path / 'nosuch.db'}")
        finally:
            use_tracking(store_uri)  # MLflow keeps the URI it was last given
    assert str(err.value).endswith(f"; stores in this folder: --tracking-uri sqlite:///{tmp_path / 'exp1' / 'mlflow.db'}")


def test_tracking_uri_names_the_store_table_and_plot_read(store, shared_workdir, tmp_path, monkeypatch):
    # from another folder, with $MLFLOW_TRACKING_URI pointing elsewhere: the flag alone decides
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    uri = f"sqlite:///{shared_workdir / 'mlflow.db'}"
    r = CliRunner().invoke(app, ["table", "--tracking-uri", uri, "--format", "csv"])
    assert r.exit_code == 0, r.output
    assert {"none", "kd"} <= set(pd.read_csv(io.StringIO(r.output))["method"])
    r = CliRunner().invoke(app, ["plot", "per-class", "--tracking-uri", uri, "--out", str(tmp_path / "fig")])
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "fig").glob("*.png"))
    assert not (tmp_path / "elsewhere.db").exists()  # never opened, so never made
    r = CliRunner().invoke(app, ["plot", "per-class", "--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}"])
    assert isinstance(r.exception, UserError) and "no MLflow store at" in str(r.exception)
    assert not (tmp_path / "typo.db").exists()  # reading makes none
