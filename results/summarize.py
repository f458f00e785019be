"""Markdown tables of the default-benchmark runs in ./mlflow.db (made by default_benchmark.sh).

A stop-gap until `kdbench table` exists: it reads MLflow only, never the engine.
"""

import mlflow
import pandas as pd

mlflow.set_tracking_uri(mlflow.get_tracking_uri())
runs = mlflow.search_runs(experiment_names=["kdbench-default"], filter_string="attributes.status = 'FINISHED'")
students = runs[runs["tags.kdbench.role"] == "student"].copy()
for col in ("teacher_attention", "normalize", "alpha"):  # absent until an AttnFD run exists
    students[f"params.method.params.{col}"] = students.get(f"params.method.params.{col}")
students["variant"] = students["params.method.params.teacher_attention"].fillna("") + "/" + students["params.method.params.normalize"].fillna("")
students["alpha"] = pd.to_numeric(students["params.method.params.alpha"], errors="coerce")


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


print("| model | method (preset) | mIoU | pixel acc |")
print("| --- | --- | --- | --- |")
with_teacher = students[students["tags.teacher.miou"] != "nan"]
if len(with_teacher):  # every distillation run records the mIoU of its (cached) teacher
    t = with_teacher.iloc[0]
    print(f"| teacher {t['tags.teacher']} | - (trained once, cached) | {pct(float(t['tags.teacher.miou']))} | |")
defaults = students[(students["variant"].isin(["/", "free/batch"])) & (students["alpha"].isna() | (students["alpha"] == 2.0))]
for _, r in defaults.drop_duplicates("tags.method", keep="last").sort_values("metrics.miou", ascending=False).iterrows():
    print(f"| student {r['tags.student']} | {r['tags.method']} ({r['tags.preset']}) | {pct(r['metrics.miou'])} | {pct(r['metrics.pixel_acc'])} |")

print()
print("| AttnFD teacher_attention / normalize | alpha: mIoU | best |")
print("| --- | --- | --- |")
attn = students[students["tags.method"] == "attnfd"]
for variant, group in attn.groupby("variant"):
    cells = ", ".join(f"{a:g}: {pct(m)}" for a, m in sorted(zip(group["alpha"], group["metrics.miou"])))
    best = group.loc[group["metrics.miou"].idxmax()]
    print(f"| {variant.replace('/', ' / ')} | {cells} | {pct(best['metrics.miou'])} (alpha {best['alpha']:g}) |")
