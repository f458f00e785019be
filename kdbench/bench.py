"""Speed of one distillation step per method and preset, against the floor, on the recipe's shapes.

The floor is what any distillation step must pay: a teacher forward plus a plain student step.
Every row times ``engine.train_step`` itself, on states built by ``engine.build_state`` (the path a
run takes: device, precision, channels-last, compile), with random images and labels of the
recipe's batch and crop, so no dataset and no trained teacher are needed: a step's cost depends on
shapes, not on values. Rows are timed in interleaved rounds (every row once per round, the floor
included), and each row's ratio to the floor is taken within a round, so a machine that slows down
or speeds up part-way through moves all rows alike. The spread over rounds is reported, and a
ratio whose spread reaches 1 is flagged as indistinguishable from the floor, as is one wholly below
1 for a method that runs the teacher (no such step is cheaper than the floor: that is noise).
When a row runs the teacher in train mode (``Method.teacher_mode``, as AttnFD's ``code`` preset does
after the released code), a second floor with the teacher in train mode is timed too, and that
row's ratio to it says what its distillation terms cost apart from the teacher's mode.

Evaluation is the other half of a run's time (a VOC recipe evaluates its 1,449 val images 120
times), so the student's evaluation is timed too: ``engine.evaluate`` through the run's own eval
loader, at batch 1 and at the recipe's ``eval.batch_size``, on random images of one size.

Importing this module needs neither MLflow nor Optuna (a GPU machine may lack them).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import Dataset

from kdbench.data import class_names, load_splits
from kdbench.engine import build_state, close_loader, eval_loader, evaluate, runs_teacher_in_train_mode, train_batches, train_step
from kdbench.errors import UserError
from kdbench.methods import method_for, registry
from kdbench.methods.base import FeatureSpec, Method
from kdbench.models import build_model
from kdbench.models.complexity import multiply_adds
from kdbench.progress import make_progress
from kdbench.recipe import Recipe, load_recipe, per_method_config
from kdbench.runtime import Runtime, make_runtime


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


@dataclass
class Row:
    """One method and preset: milliseconds per step and ratio to the floor, one value per round."""

    method: str
    #: the preset names that resolve to this row's options (timed once); empty for the floor
    presets: tuple[str, ...] = ()
    #: these options are what ``kdbench run --method NAME`` gets with the recipe
    runs_by_default: bool = False
    #: the step runs the teacher's forward (all but the plain student), so it cannot beat the floor
    needs_teacher: bool = True
    #: the floor's step with the teacher in train mode (``Method.teacher_mode``): what a method that
    #: asks for it pays before any distillation term
    teacher_train: bool = False
    #: the method's resolved options (every preset in ``presets`` gives these); None for the floor
    config: Any = field(default=None, repr=False)
    ms: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    #: for a method that runs the teacher in train mode: the ratio to that floor, one per round
    train_floor_ratio: list[float] = field(default_factory=list)
    #: peak memory a step allocates beyond what was resident before it (activations, gradients)
    step_mib: float | None = None
    #: the costliest operations of a step (``--profile``)
    profile: list[dict[str, Any]] = field(default_factory=list)

    @property
    def preset(self) -> str:
        """``paper*``, or ``default = paper*`` for presets with the same options (``*``: a run's)."""
        if self.teacher_train:
            return "teacher in train mode"
        return " = ".join(self.presets) + ("*" if self.runs_by_default else "") if self.presets else "-"

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratio)

    @property
    def overlaps_floor(self) -> bool:
        """Not distinguishable from the floor: the ratio's spread over rounds reaches 1, or lies
        below 1 for a step that runs the teacher (it cannot be cheaper than the floor: noise)."""
        low, high = min(self.ratio), max(self.ratio)
        return (self.method != "floor" or self.teacher_train) and low <= 1.0 and (high >= 1.0 or self.needs_teacher)

    def to_dict(self, batch_size: int) -> dict[str, Any]:
        return {
            "method": self.method,
            "preset": self.preset,
            "presets": list(self.presets),
            "runs_by_default": self.runs_by_default,
            "ms_per_step": _spread(self.ms),
            "x_floor": _spread(self.ratio),
            "overlaps_floor": self.overlaps_floor,
            "teacher_train": self.teacher_train,
            "x_train_floor": _spread(self.train_floor_ratio) if self.train_floor_ratio else None,
            "images_per_s": 1000 * batch_size / self.median_ms,
            "step_mib": self.step_mib,
            "profile": self.profile,
        }


class TeacherInTrainMode(Method):
    """The floor's step with the teacher in train mode (BatchNorm on each batch's statistics), as a
    method that asks for it runs: the part of such a method's cost that is no distillation term."""

    name = "floor"
    teacher_mode = "train"

    def forward(self, student, teacher, target) -> dict[str, torch.Tensor]:
        return {}


@dataclass
class EvalRow:
    """The student's evaluation at one batch size: milliseconds per image, one value per round."""

    batch_size: int
    ms: list[float] = field(default_factory=list)
    #: the untimed first pass, per image: its workers' start and, with ``runtime.eval_cudnn_benchmark``,
    #: cuDNN timing its algorithms for the size (what each new size costs once)
    first_ms: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "ms_per_image": _spread(self.ms),
            "first_pass_ms_per_image": self.first_ms,
            "images_per_s": 1000 / self.median_ms,
        }


@dataclass
class BenchResult:
    rows: list[Row]
    setting: dict[str, Any]
    loader: dict[str, Any]
    #: the student's evaluation, one row per batch size (empty: not timed)
    evaluation: list[EvalRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        batch = self.setting["batch_size"]
        return {
            "setting": self.setting,
            "rows": [r.to_dict(batch) for r in self.rows],
            "loader": self.loader,
            "evaluation": [r.to_dict() for r in self.evaluation],
        }


#: bench times random init, so a recipe's weights files (e.g. CIRKD's ImageNet backbone) are never needed
RANDOM_INIT = ("teacher.pretrained=false", "teacher.checkpoint=", "student.pretrained=false")


def bench_recipe(recipe: str | None, overrides: list[str]) -> Recipe:
    """The recipe as bench times it: ``overrides`` applied, then random init (weights never read)."""
    return load_recipe(recipe, [*overrides, *RANDOM_INIT])


def plan(recipe: Recipe, methods: list[str] | None) -> list[Row]:
    """The floor, then every preset of every method asked for (``NAME``: all its presets,
    ``NAME:PRESET``: that one), in registry order; presets with identical options are timed once."""
    known = registry()
    wanted: dict[str, set[str] | None] = {}  # method -> presets asked for (None: all)
    for item in methods or []:
        name, _, preset = item.partition(":")
        if name not in known:
            raise UserError(f"--method: unknown method {name!r}; choose one of {', '.join(known)}")
        names = ["default", *known[name].presets]
        if preset and preset not in names:
            raise UserError(f"--method {item}: {name!r} has no preset {preset!r}; choose one of {', '.join(names)}")
        if preset and wanted.get(name, set()) is not None:
            wanted.setdefault(name, set()).add(preset)
        else:
            wanted[name] = None
    rows = [Row("floor")]
    for name, cls in known.items():
        if methods and name not in wanted:
            continue
        run_default = per_method_config(recipe, name)
        groups: list[tuple[Any, list[str]]] = []  # each distinct config, with the presets that give it
        for preset in ["default", *cls.presets]:
            cfg = per_method_config(recipe, name, preset)
            same = next((names for other, names in groups if other == cfg), None)
            if same is None:
                groups.append((cfg, [preset]))
            else:
                same.append(preset)
        for cfg, names in groups:
            if wanted.get(name) is None or wanted[name] & set(names):
                rows.append(Row(name, tuple(names), cfg == run_default, cls.needs_teacher, config=cfg))
    return rows


def _random_batches(recipe: Recipe, num_classes: int, count: int, rt: Runtime) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images and labels of the recipe's global batch and crop (5% of pixels ignore-labelled),
    made on the device, as a step receives them after the copy (``engine.model_batch`` converts them
    in each step, as in a run)."""
    b, (h, w) = recipe.train.batch_size, recipe.train.crop_size
    g = torch.Generator().manual_seed(recipe.seed)
    out = []
    for _ in range(count):
        images = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
        target = torch.randint(0, num_classes, (b, h, w), generator=g, dtype=torch.uint8)
        target[torch.rand(b, h, w, generator=g) < 0.05] = 255
        out.append(rt.to_device(images.pin_memory() if rt.cuda else images, target))
    return out


def _teacher_for(recipe: Recipe, needs: dict[str, Any], num_classes: int, cache: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """A random-init teacher of the recipe (with CBAM taps where a preset needs them); one per variant."""
    key = repr(sorted(needs.items()))
    if key not in cache:
        torch.manual_seed(recipe.teacher.seed)
        cfg = dataclasses.replace(recipe.teacher, **needs)
        cache[key] = build_model(cfg, num_classes, pretrained=False).eval().requires_grad_(False)
    return cache[key]


def _warm(state: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> Any:
    """``steps`` untimed steps: cudnn autotuning, torch.compile, CUDA graph capture, allocator growth."""
    for i in range(steps):
        train_step(state, *batches[i % len(batches)])
    return state


def benchmark(
    recipe: Recipe,
    methods: list[str] | None = None,
    steps: int = 5,
    rounds: int = 5,
    warmup: int = 3,
    loader_batches: int = 20,
    profile: int = 0,
    quiet: bool = False,
    eval_images: int = 0,
    eval_size: tuple[int, int] | None = None,
) -> BenchResult:
    """Time every row for ``steps`` steps per round over ``rounds`` interleaved rounds, after
    ``warmup`` untimed steps per row (cudnn autotuning, torch.compile, allocator growth). With
    ``eval_images``, then the floor's student evaluating that many images of ``eval_size`` (default:
    the crop size) per round, at batch 1 and at ``eval.batch_size`` in turn."""
    eval_size = eval_size or recipe.train.crop_size
    rt = make_runtime(recipe.runtime)
    if rt.distributed:
        raise UserError("bench: run it as one process (it times one device); torchrun is for `kdbench run`")
    k = len(class_names(recipe.data.dataset))
    rows = plan(recipe, methods)
    batches = _random_batches(recipe, k, max(steps, warmup, 1), rt)
    teachers: dict[str, torch.nn.Module] = {}
    train_cfg = dataclasses.replace(recipe.train, iterations=warmup + rounds * steps + 1)
    states = []
    evaluation = [EvalRow(b) for b in sorted({1, recipe.eval.batch_size})] if eval_images else []
    with make_progress(enabled=not quiet, transient=True) as bar:
        task = bar.add_task("building and warming up", total=len(rows))
        for row in rows:
            name, cfg, teacher = row.method, row.config, _teacher_for(recipe, {}, k, teachers)
            if row.presets:
                cls = registry()[name]
                teacher = _teacher_for(recipe, cls.teacher_requirements(cfg), k, teachers) if cls.needs_teacher else None
            torch.manual_seed(recipe.seed)
            student = build_model(recipe.student, k, pretrained=False)
            method = method_for(name, cfg, student, teacher, k) if row.presets else None
            states.append(_warm(build_state(student, method, teacher, train_cfg, rt, normalize=recipe.data.normalize), batches, warmup))
            bar.advance(task)
        if any(runs_teacher_in_train_mode(s) for s in states):
            torch.manual_seed(recipe.seed)
            student, teacher = build_model(recipe.student, k, pretrained=False), _teacher_for(recipe, {}, k, teachers)
            method = TeacherInTrainMode(None, FeatureSpec.of(student, k), FeatureSpec.of(teacher, k))
            rows.insert(1, Row("floor", teacher_train=True))
            states.insert(1, _warm(build_state(student, method, teacher, train_cfg, rt, normalize=recipe.data.normalize), batches, warmup))
        task = bar.add_task("timing", total=rounds * len(rows))
        for _ in range(rounds):
            for state, row in zip(states, rows):
                rt.synchronize()
                if rt.cuda:
                    base = torch.cuda.memory_allocated(rt.device)
                    torch.cuda.reset_peak_memory_stats(rt.device)
                start = time.perf_counter()
                for i in range(steps):
                    train_step(state, *batches[i % len(batches)])
                rt.synchronize()
                row.ms.append(1000 * (time.perf_counter() - start) / steps)
                if rt.cuda:
                    peak = (torch.cuda.max_memory_allocated(rt.device) - base) / 2**20
                    if state.step_graph is not None:  # a replay allocates nothing: its capture did
                        peak = max(peak, state.step_graph.capture_mib)
                    row.step_mib = max(row.step_mib or 0.0, peak)
                bar.advance(task)
            floor = rows[0].ms[-1]
            train_floor = rows[1].ms[-1] if len(rows) > 1 and rows[1].teacher_train else None
            for state, row in zip(states, rows):
                row.ratio.append(row.ms[-1] / floor)
                if train_floor and row.presets and runs_teacher_in_train_mode(state):
                    row.train_floor_ratio.append(row.ms[-1] / train_floor)
        if evaluation:
            task = bar.add_task("timing evaluation", total=(rounds + 1) * len(evaluation))
            time_evaluation(recipe, states[0].student, rt, k, evaluation, eval_images, eval_size, rounds, lambda: bar.advance(task))
        if profile:
            task = bar.add_task("profiling", total=len(rows))
            for state, row in zip(states, rows):
                row.profile = profile_step(state, batches, steps, profile)
                bar.advance(task)
    where = rt.describe()
    floor = states[0]  # what one image costs the floor's models at the crop
    macs = {role: multiply_adds(getattr(floor, role), recipe.train.crop_size) for role in ("teacher", "student")}
    setting = {
        "recipe": recipe.benchmark,
        "device": where["runtime.device"],
        "cpu": where["runtime.cpu"],
        "precision": rt.precision,
        "compile": rt.compile,
        "compile_method": rt.compile_method,
        "cuda_graphs": rt.cuda_graphs,
        "channels_last": rt.channels_last,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": recipe.train.batch_size,
        "crop_size": list(recipe.train.crop_size),
        "multiply_adds": macs,
        "teacher": f"{recipe.teacher.arch}/{recipe.teacher.backbone} OS{recipe.teacher.output_stride}",
        "student": f"{recipe.student.arch}/{recipe.student.backbone} OS{recipe.student.output_stride}",
        "num_classes": k,
        "steps": steps,
        "rounds": rounds,
        "warmup": warmup,
        "eval": {
            "images": eval_images,
            "size": list(eval_size),
            "scales": list(recipe.eval.scales),
            "flip": recipe.eval.flip,
            "cudnn_benchmark": rt.eval_cudnn_benchmark,
        },
    }
    loader = loader_throughput(recipe, rt, loader_batches, quiet) if loader_batches else {"skipped": "not asked for"}
    return BenchResult(rows, setting, loader, evaluation)


def print_result(result: BenchResult, out: Console) -> None:
    """The step table (with each row's profile), the evaluation table and the loader line."""
    st = result.setting
    device = f"cpu: {st['cpu']}" if st["device"] == "cpu" else st["device"]  # CPU timings depend on the kind
    table = Table(
        title=f"ms per training step on {device}, {st['precision']}{', compiled' if st['compile'] else ''}"
        f"{', method compiled' if st['compile_method'] else ''}{', CUDA graphs' if st['cuda_graphs'] else ''}; "
        f"batch {st['batch_size']}, crop {st['crop_size']}; {st['teacher']} -> {st['student']}; "
        f"{st['rounds']} rounds x {st['steps']} steps"
    )
    for col in ("method", "preset", "ms/step", "min-max", "x floor", "img/s", "step MiB"):
        table.add_column(col, justify="left" if col in ("method", "preset") else "right")
    for row in result.rows:
        ratio = f"{row.median_ratio:.3f} [{min(row.ratio):.3f}-{max(row.ratio):.3f}]" + (" ~" if row.overlaps_floor else "")
        table.add_row(
            row.method,
            row.preset,
            f"{row.median_ms:.1f}",
            f"{min(row.ms):.1f}-{max(row.ms):.1f}",
            ratio,
            f"{1000 * st['batch_size'] / row.median_ms:.0f}",
            f"{row.step_mib:.0f}" if row.step_mib is not None else "",
        )
    out.print(table)
    for row in result.rows:
        if row.train_floor_ratio:
            r = row.train_floor_ratio
            out.print(
                f"{row.method} {row.preset} runs the teacher in train mode: {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]x "
                "the floor with the teacher in train mode (what its distillation terms cost)"
            )
    for row in result.rows:
        if row.profile:
            ops = "; ".join(f"{op['name']} {op['ms_per_step']:.2f} ms" for op in row.profile)
            out.print(f"profile {row.method}/{row.preset}: {ops}")
    if result.evaluation:
        ev = st["eval"]
        table = Table(
            title=f"ms per image evaluated: the student, {ev['size'][0]}x{ev['size'][1]} images, scales {ev['scales']}"
            f"{', flipped too' if ev['flip'] else ''}{', cuDNN autotuned' if ev['cudnn_benchmark'] else ''}; "
            f"{ev['images']} images x {st['rounds']} rounds after a first pass"
        )
        for col in ("batch", "ms/image", "min-max", "img/s", "x batch 1", "first pass"):
            table.add_column(col, justify="right")
        one = result.evaluation[0].median_ms
        for ev_row in result.evaluation:
            table.add_row(
                str(ev_row.batch_size),
                f"{ev_row.median_ms:.2f}",
                f"{min(ev_row.ms):.2f}-{max(ev_row.ms):.2f}",
                f"{1000 / ev_row.median_ms:.0f}",
                f"{one / ev_row.median_ms:.2f}",
                f"{ev_row.first_ms:.2f}" if ev_row.first_ms is not None else "",
            )
        out.print(table)
    macs, floor = st["multiply_adds"], result.rows[0]
    # a backward costs about two forwards: the floor's step is the teacher's forward and three of the student's
    step = st["batch_size"] * (macs["teacher"] + 3 * macs["student"])
    out.print(
        f"multiply-adds per image at the crop: teacher {macs['teacher'] / 1e9:.2f} G, student {macs['student'] / 1e9:.2f} G; "
        f"the floor's step (a backward counted as two forwards) {step / 1e9:.1f} G, {2 * step / floor.median_ms / 1e9:.3g} TFLOP/s"
    )
    ld = result.loader
    if "images_per_s" in ld:
        out.print(f"loader: {ld['images_per_s']:.0f} images/s with {ld['workers']} workers ({ld['batches']} batches)")
    else:
        out.print(f"loader: not timed ({ld['skipped']})")


class SameImage(Dataset):
    """``count`` times one random image and label of one size: evaluation's cost depends on sizes,
    not values. It tells its images' size, so ``eval_loader`` batches it by size as it does VOC."""

    def __init__(self, count: int, size: tuple[int, int], num_classes: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.count, self.size = count, (int(size[0]), int(size[1]))
        self.image = torch.randint(0, 256, (3, *self.size), generator=g, dtype=torch.uint8)
        self.label = torch.randint(0, num_classes, self.size, generator=g, dtype=torch.uint8)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image, self.label

    def image_size(self, index: int) -> tuple[int, int]:
        return self.size


def time_evaluation(
    recipe: Recipe,
    student: torch.nn.Module,
    rt: Runtime,
    num_classes: int,
    rows: list[EvalRow],
    images: int,
    size: tuple[int, int],
    rounds: int,
    advance: Any = lambda: None,
) -> None:
    """``engine.evaluate`` of ``images`` images per round through the run's eval loader (its
    workers, pinned copies, the recipe's scales and flip), one loader per batch size, each passed
    through once untimed first (its workers start, kernels load); milliseconds per image."""
    dataset = SameImage(images, size, num_classes, recipe.seed)
    workers = rt.loader_workers(recipe.data.workers)
    cfgs = [dataclasses.replace(recipe.eval, batch_size=row.batch_size) for row in rows]
    loaders = [eval_loader(dataset, cfg, rt, workers) for cfg in cfgs]
    try:
        for loader, cfg, row in zip(loaders, cfgs, rows):
            rt.synchronize()
            start = time.perf_counter()
            evaluate(student, loader, num_classes, cfg, rt=rt, normalize=recipe.data.normalize)
            row.first_ms = 1000 * (time.perf_counter() - start) / images
            advance()
        for _ in range(rounds):
            for loader, cfg, row in zip(loaders, cfgs, rows):
                rt.synchronize()
                start = time.perf_counter()
                evaluate(student, loader, num_classes, cfg, rt=rt, normalize=recipe.data.normalize)  # ends with the confusion matrix on the host
                row.ms.append(1000 * (time.perf_counter() - start) / images)
                advance()
    finally:
        for loader in loaders:
            close_loader(loader)


def profile_step(state: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` operations of a step by self time on the device (CPU time on a CPU), per step."""
    from torch.profiler import ProfilerActivity, profile

    rt = state.runtime
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            train_step(state, *batches[i % len(batches)])
        rt.synchronize()
    attr = "self_device_time_total" if rt.cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    out = [{"name": e.key, "ms_per_step": getattr(e, attr) / 1000 / steps, "calls_per_step": e.count / steps} for e in events[:top]]
    if rt.cuda:  # how busy the device was against how long the host took: a host-bound step shows a gap
        device_ms = sum(getattr(e, attr) for e in events) / 1000 / steps
        out.append({"name": "[all device time]", "ms_per_step": device_ms, "calls_per_step": 0})
    return out


def loader_throughput(recipe: Recipe, rt: Runtime, batches: int, quiet: bool = True) -> dict[str, Any]:
    """Images per second the recipe's loader delivers with its workers (after the first batch,
    which pays for starting them); skipped with the reason when the dataset is not available."""
    try:
        splits = load_splits(recipe, progress=not quiet)
    except UserError as err:
        return {"skipped": str(err)}
    workers = rt.loader_workers(recipe.data.workers)
    loader = train_batches(splits.train, recipe.train.batch_size, recipe.seed, 0, batches + 1, workers, rt)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = 0
    for images, _ in it:
        n += images.shape[0]
    seconds = time.perf_counter() - start
    return {"workers": workers, "images_per_s": n / seconds, "batches": batches}
