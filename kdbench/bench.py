"""Speed of one distillation step per method and preset, against the floor and against KD.

The floor is what any distillation step must pay: a teacher forward plus a plain student step.
Timing calls ``engine.train_step`` itself on real batches of the recipe's data, so what is measured
is what training runs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from kdbench.engine import TrainState, make_optimizer, poly_schedule, train_batches, train_step
from kdbench.methods import registry
from kdbench.progress import make_progress
from kdbench.recipe import Recipe, per_method_config
from kdbench.run import build_model, ensure_teacher, load_splits, method_for


@dataclass(frozen=True)
class StepTiming:
    method: str
    preset: str
    ms_per_step: float


def time_steps(recipe: Recipe, splits, teacher, method_name: str | None, cfg: Any, steps: int, warmup: int) -> float:
    """Median milliseconds of ``steps`` training steps after ``warmup`` steps."""
    torch.manual_seed(recipe.seed)
    student = build_model(recipe.student, splits.num_classes)
    method = None
    if method_name is not None:
        method = method_for(method_name, cfg, student, teacher, splits.num_classes)
    optimizer = make_optimizer(student, method, recipe.train, recipe.train.lr)
    total = warmup + steps
    state = TrainState(student, method, teacher, optimizer, poly_schedule(optimizer, total, 0.9), total)
    batches = [b for b in train_batches(splits.train, recipe.train.batch_size, recipe.seed, 0, total, 0)]
    times = []
    for i, (images, target) in enumerate(batches):
        start = time.perf_counter()
        train_step(state, images, target)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def benchmark(recipe: Recipe, methods: list[str] | None = None, steps: int = 10, warmup: int = 2, quiet: bool = False) -> list[StepTiming]:
    """Floor first (teacher forward + plain student step), then every preset of every method.

    Presets that need a different teacher (AttnFD ``paper``: CBAMs inside the teacher) are timed
    with the recipe's teacher plus those CBAMs, untrained: the cost is the same."""
    splits = load_splits(recipe, progress=not quiet)
    teacher, _ = ensure_teacher(recipe, splits, quiet)
    plan = [("floor", None, None)]
    for name, cls in registry().items():
        if methods and name not in methods:
            continue
        plan += [(name, name, p) for p in ["default", *cls.presets]]
    out = []
    with make_progress(enabled=not quiet, transient=True) as bar:
        task = bar.add_task("timing", total=len(plan))
        for label, name, preset in plan:
            t, cfg = teacher, None
            if name is not None:
                cfg = per_method_config(recipe, name, preset)
                needs = registry()[name].teacher_requirements(cfg)
                if needs:
                    t = build_model(dataclasses.replace(recipe.teacher, **needs), splits.num_classes)
                    t.load_state_dict(teacher.state_dict(), strict=False)
                    t.eval().requires_grad_(False)
            if name is not None and not registry()[name].needs_teacher:
                t = None
            ms = time_steps(recipe, splits, t, name, cfg, steps, warmup)
            out.append(StepTiming(label, preset or "-", ms))
            bar.advance(task)
    return out
