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
all_students = runs[runs["tags.kdbench.role"] == "student"]
students = all_students[all_students["tags.seed"] == "0"]  # the main tables are one seed; the spread table below has the rest
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


print("Seed 0; mIoU and pixel accuracy (%) on the 200 validation images; delta to the plain student; wall time of the whole run.")
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


def is_default(frame: pd.DataFrame) -> pd.Series:
    """Runs with the method's default options (AttnFD's free/batch at alpha 2), whatever the preset."""
    return frame["variant"].isin(["/", "free/batch"]) & (frame["alpha"].isna() | (frame["alpha"] == 2.0))


defaults = students[is_default(students)]
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

# Seed spread: every (method, preset) run at more than one seed (made by seed_spread.sh).
spread = all_students[is_default(all_students)].drop_duplicates(["tags.method", "tags.preset", "tags.seed"], keep="last")
spread = spread.assign(seed=spread["tags.seed"].astype(int), miou=100 * spread["metrics.miou"])
table = spread.pivot_table(index=["tags.method", "tags.preset"], columns="seed", values="miou")
table = table[table.notna().sum(axis=1) > 1]
if len(table):
    base_mean = table.loc["none"].mean(axis=1).iloc[0] if "none" in table.index.get_level_values(0) else float("nan")
    mean, std = table.mean(axis=1), table.std(axis=1)  # std over seeds, with n - 1
    seed_cols = [int(c) for c in table.columns]
    print()
    print(f"Seed spread: mIoU (%) of each default run at seeds {', '.join(map(str, seed_cols))}; mean, standard deviation over seeds, delta of the means to the plain student.")
    print()
    print(f"| method (preset) | {' | '.join(f'seed {c}' for c in seed_cols)} | mean | std | delta |")
    print("| --- |" + " --- |" * (len(seed_cols) + 3))
    for (method, preset), row in table.assign(mean=mean, std=std).sort_values("mean", ascending=False).iterrows():
        cells = " | ".join(f"{row[c]:.2f}" for c in table.columns)
        print(f"| {method} ({preset}) | {cells} | {row['mean']:.2f} | {row['std']:.2f} | {row['mean'] - base_mean:+.2f} |")
