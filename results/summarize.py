"""Markdown tables of the default-benchmark runs in the MLflow store (made by default_benchmark.sh).

A stop-gap until `kdbench table` exists: it reads MLflow only, never the engine. Run it where the
runs were made (MLflow's default store is ./mlflow.db) or with MLFLOW_TRACKING_URI set.
"""

import json

import mlflow
import pandas as pd

runs = mlflow.search_runs(experiment_names=["kdbench-default"], filter_string="attributes.status = 'FINISHED'")
for col in ("teacher_attention", "normalize", "alpha"):  # absent until an AttnFD run exists
    runs[f"params.method.params.{col}"] = runs.get(f"params.method.params.{col}")
runs["variant"] = runs["params.method.params.teacher_attention"].fillna("") + "/" + runs["params.method.params.normalize"].fillna("")
runs["alpha"] = pd.to_numeric(runs["params.method.params.alpha"], errors="coerce")
runs = runs.sort_values("start_time")
students = runs[runs["tags.kdbench.role"] == "student"]
teachers = runs[runs["tags.kdbench.role"] == "teacher"]
plain = students[students["tags.method"] == "none"]
base = plain["metrics.miou"].iloc[-1] if len(plain) else float("nan")


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def delta(x: float) -> str:
    return f"{100 * (x - base):+.2f}"


def wall(run: pd.Series) -> str:
    """Seconds from the MLflow run's start to its end: the whole run, evaluation included."""
    return f"{(run['end_time'] - run['start_time']).total_seconds():.0f} s"


seeds = sorted(set(runs["tags.seed"]))
print(f"Seed {', '.join(seeds)}; mIoU and pixel accuracy (%) on the 200 validation images; delta to the plain student; wall time of the whole run.")
print()
print("| model | method (preset) | mIoU | delta | pixel acc | wall time |")
print("| --- | --- | --- | --- | --- | --- |")
for _, t in teachers.iterrows():
    taps = json.loads(t["params.teacher.attention_taps"])  # kdbench logs list params as JSON
    cbam = f", CBAMs at {', '.join(taps)}" if taps else ""
    print(
        f"| teacher {t['tags.student']}{cbam} | - | {pct(t['metrics.miou'])} | {delta(t['metrics.miou'])} "
        f"| {pct(t['metrics.pixel_acc'])} | {wall(t)} |"
    )
defaults = students[students["variant"].isin(["/", "free/batch"]) & (students["alpha"].isna() | (students["alpha"] == 2.0))]
for _, r in defaults.drop_duplicates(["tags.method", "tags.preset"], keep="last").sort_values("metrics.miou", ascending=False).iterrows():
    print(
        f"| student {r['tags.student']} | {r['tags.method']} ({r['tags.preset']}) | {pct(r['metrics.miou'])} "
        f"| {delta(r['metrics.miou'])} | {pct(r['metrics.pixel_acc'])} | {wall(r)} |"
    )

print()
print("| AttnFD teacher_attention / normalize | mIoU at alpha | best | delta |")
print("| --- | --- | --- | --- |")
attn = students[students["tags.method"] == "attnfd"]
for variant, group in attn.groupby("variant"):
    cells = ", ".join(f"{a:g}: {pct(m)}" for a, m in sorted(zip(group["alpha"], group["metrics.miou"])))
    best = group.loc[group["metrics.miou"].idxmax()]
    print(f"| {variant.replace('/', ' / ')} | {cells} | {pct(best['metrics.miou'])} (alpha {best['alpha']:g}) | {delta(best['metrics.miou'])} |")
