"""The training engine: one step, one evaluation, one loop. It knows no method by name.

A step is: teacher forward (eval, no grad; skipped when the method needs no teacher) -> student
forward -> task loss + the method's named loss terms -> backward -> optimizer and schedule step ->
the method's own optimizer step (e.g. a discriminator). Before it the method may ask, by the
attributes ``Method.student_frozen`` and ``Method.teacher_mode``, for a frozen student or a teacher
in train mode (``follow_method``). ``train_step`` can be called alone, so a
benchmark can time it against the floor. Device, precision and processes come from one
``kdbench.runtime.Runtime`` held by the ``TrainState``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from kdbench.checkpoint import load, save_atomic
from kdbench.errors import NonFiniteLoss, UserError
from kdbench.faults import fault_point
from kdbench.metrics import SegMetrics, confusion_matrix
from kdbench.methods import Method
from kdbench.progress import make_progress
from kdbench.recipe import EvalConfig, TrainConfig
from kdbench.schema import Metric
from kdbench.cuda_graphs import StepGraph, graphed, portable
from kdbench.data import transforms
from kdbench.runtime import Runtime, float32, fused_on

IGNORE = 255


# ---------------------------------------------------------------------------------------------
# data order that survives a restart: sample k of the run is fixed by (seed, k) alone


class SeededStream(Dataset):
    """Sample k of a run: image perm_epoch[k % N] with its random augmentation seeded by (seed, k).

    Order and augmentation depend only on the seed and the position, never on the RNG state of a
    process, so a resumed run sees exactly the batches an uninterrupted one would, with any
    number of workers.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed, self.n = base, seed, len(base)
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> Any:
        epoch = k // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))}
        idx = int(self._perms[epoch][k % self.n])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + k)
            return self.base[idx]


class StepSlices(Sampler[int]):
    """Sample ids of steps ``start`` .. ``stop``: this process's slice of every global batch.

    The global batch of step k is samples k*B .. (k+1)*B - 1 of the seeded stream whatever the
    number of processes; process r of W takes the r-th of its W equal slices. So one process and W
    processes see the same global batches, and a resumed run the same batches as an uninterrupted one.
    """

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch_size, rank, world_size
        self.local = batch_size // world_size

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start, self.stop):
            first = step * self.batch + self.rank * self.local
            yield from range(first, first + self.local)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.local


def train_batches(
    dataset: Dataset, batch_size: int, seed: int, start_step: int, total_steps: int, workers: int, rt: Runtime | None = None
) -> DataLoader:
    """This process's part of batches ``start_step`` .. ``total_steps`` of a run (``batch_size`` is global)."""
    rt = rt or Runtime()
    sampler = StepSlices(start_step, total_steps, batch_size, rt.rank, rt.world_size)
    # an own generator: otherwise creating the iterator draws from the global RNG (dropout's), and
    # a resumed run would draw at a different step than an uninterrupted one
    return DataLoader(
        SeededStream(dataset, seed),
        batch_size=batch_size // rt.world_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=rt.cuda,
        prefetch_factor=4 if workers else None,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def close_loader(loader: DataLoader) -> None:
    """Stop a loader's persistent workers now, however the run ends.

    DataLoader has no public close: its workers stop when its iterator is collected. When a stop
    raises (a pruned trial, a failed sweep cell), the traceback its caller keeps holds the run's
    frames and so the loaders; collected later, in a process forked meanwhile (the next trial's
    loader worker), the iterator's __del__ fails there ("can only test a child process")."""
    iterator = loader._iterator
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


@contextmanager
def workers_closed(loader: DataLoader) -> Iterator[DataLoader]:
    try:
        yield loader
    finally:
        close_loader(loader)


# ---------------------------------------------------------------------------------------------
# optimisation


def make_optimizer(student: nn.Module, method: Method | None, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The backbone at ``lr``; the head and the method's own learnable parts at lr * head_lr_mult."""
    backbone, head = student.param_groups()
    extra = method.student_parameters() if method is not None else []
    groups = [{"params": backbone, "lr": lr}, {"params": head + extra, "lr": lr * cfg.head_lr_mult}]
    groups = [g for g in groups if g["params"]]
    fused = fused_on(student)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, fused=fused)


def poly_schedule(optimizer: torch.optim.Optimizer, total: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total) ** power)


@dataclass
class TrainState:
    """Everything a step touches; what a checkpoint must restore."""

    student: nn.Module
    method: Method | None
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    steps_per_epoch: int = 1
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    runtime: Runtime = field(default_factory=Runtime)
    #: what a step calls: the modules above or their DistributedDataParallel / compiled forms
    #: (checkpoints always read the modules themselves, so their keys never change)
    student_forward: Callable[..., Any] | None = None
    teacher_forward: Callable[..., Any] | None = None
    method_forward: Callable[..., Any] | None = None
    #: the whole step as a CUDA graph (one GPU, bf16/fp32, not compiled), else None
    step_graph: StepGraph | None = None
    #: train.on_nonfinite == "skip": a step whose loss is not finite updates nothing
    skip_nonfinite: bool = False
    skipped_steps: int = 0
    #: train.select == "best": (step, student weights) of the best evaluation so far, kept in memory
    best: tuple[int, dict[str, torch.Tensor]] | None = None
    #: the task loss's factor: 1, or 1 / batch size (train.ce_batch_average)
    task_scale: float = 1.0
    #: how the training set's uint8 images become model input (``Splits.normalize``)
    normalize: str | None = None
    #: the student's parameters that train (frozen together while the method asks for it) and
    #: whether they are frozen now
    student_trainable: list[nn.Parameter] = field(init=False, repr=False)
    student_frozen: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.student_trainable = [p for p in self.student.parameters() if p.requires_grad]
        if self.student_forward is None:
            self.student_forward = self.student
        if self.teacher_forward is None:
            self.teacher_forward = self.teacher
        if self.method_forward is None:
            self.method_forward = self.method


def build_state(
    student: nn.Module,
    method: Method | None,
    teacher: nn.Module | None,
    cfg: TrainConfig,
    rt: Runtime,
    steps_per_epoch: int = 1,
    normalize: str | None = None,
) -> TrainState:
    """Models and method on the runtime's device, the optimizer and schedule over them, and the
    forms a step calls: DistributedDataParallel around the student across processes, torch.compile
    when asked. The method's learnable parts are averaged across processes by the step itself
    (``Runtime.all_reduce_grads``): parts of them freeze and thaw during a run (AttnFD's warm-up) and
    a discriminator has a second backward, neither of which DistributedDataParallel allows."""
    if cfg.batch_size % rt.world_size:
        raise UserError(f"train.batch_size: the global batch of {cfg.batch_size} does not split evenly over {rt.world_size} processes")
    student = rt.prepare_module(student)
    teacher = rt.prepare_module(teacher) if teacher is not None else None
    method = rt.prepare_module(method) if method is not None else None
    optimizer = make_optimizer(student, method, cfg, cfg.lr)
    student_forward: Any = student
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        student_forward = DistributedDataParallel(student, device_ids=[rt.device.index] if rt.cuda else None)
    teacher_forward, method_forward = teacher, method
    if teacher is not None and rt.cuda and rt.cuda_graphs and not rt.compile:
        teacher_forward = graphed(teacher, rt)
    if rt.compile:
        student_forward = torch.compile(student_forward)
        teacher_forward = torch.compile(teacher) if teacher is not None else None
        method_forward = torch.compile(method) if method is not None else None
    elif rt.compile_method and method is not None:
        method_forward = torch.compile(method)  # compiled before capture: the first steps run eagerly
    state = TrainState(
        student=student,
        method=method,
        teacher=teacher,
        optimizer=optimizer,
        scheduler=poly_schedule(optimizer, cfg.iterations, cfg.poly_power),
        total_steps=cfg.iterations,
        steps_per_epoch=steps_per_epoch,
        runtime=rt,
        student_forward=student_forward,
        teacher_forward=teacher_forward,
        method_forward=method_forward,
        normalize=normalize,
    )
    state.skip_nonfinite = cfg.on_nonfinite == "skip"
    state.task_scale = 1.0 / cfg.batch_size if cfg.ce_batch_average else 1.0
    if rt.cuda and rt.cuda_graphs and not (rt.compile or rt.distributed or rt.precision == "fp16" or state.skip_nonfinite):
        # across processes DDP's bucketed all-reduce and under fp16 the GradScaler's inf checks
        # need the host between kernels; there only the teacher's forward is a graph
        state.step_graph = StepGraph(
            lambda images, target, whole: update(state, images, target, whole),
            lambda: [state.optimizer, *(method._own_optimizers.values() if method is not None else [])],
            lambda: step_phase(state),
            rt,
        )
    return state


def step_phase(state: TrainState) -> tuple[Any, ...]:
    """The Python state a captured step depends on: the ``requires_grad`` flags of the student and
    of the method (freezes and warm-ups) and the teacher's mode; a change captures the step again."""
    models = [m for m in (state.student, state.method) if m is not None]
    flags = tuple(p.requires_grad for m in models for p in m.parameters())
    return flags, state.teacher is not None and state.teacher.training


def runs_teacher_in_train_mode(state: TrainState) -> bool:
    """The method asks for the teacher in train mode (``Method.teacher_mode``) during its steps."""
    return state.teacher is not None and state.method is not None and state.method.teacher_mode == "train"


def follow_method(state: TrainState) -> bool:
    """Do what the method asks for this step (``Method.student_frozen``, ``Method.teacher_mode``):
    the student's trainable parameters frozen or thawed, the teacher in train mode (True: the
    caller puts it back in eval mode after the step)."""
    method = state.method
    frozen = method is not None and method.student_frozen
    if frozen != state.student_frozen:
        for p in state.student_trainable:
            p.requires_grad_(not frozen)
        state.student_frozen = frozen
    teacher_train = runs_teacher_in_train_mode(state)
    if teacher_train:
        state.teacher.train()
    return teacher_train


@float32
def task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def model_batch(rt: Runtime, images: torch.Tensor, target: torch.Tensor, normalize: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's batch on the device as the models and losses take it: float images normalised as
    the dataset's models expect (``transforms.normalize``) and int64 labels. Loader workers send
    uint8 for both, a fifth of the bytes, and skip the conversion."""
    images, target = rt.to_device(images, target)
    return transforms.normalize(images, normalize), target.long()


def train_step(state: TrainState, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimisation step; returns every loss term (weighted) and the total as detached 0-dim
    tensors. Nothing here waits for the GPU: the caller reads the values when it logs them (before
    the next step, whose CUDA graph replay overwrites them)."""
    rt, method = state.runtime, state.method
    state.student.train()
    if method is not None:
        method.train()
        method.on_step(state.step, state.total_steps, state.steps_per_epoch)
    teacher_train = follow_method(state)
    images, target = model_batch(rt, images, target, state.normalize)
    try:
        if state.step_graph is not None:
            logged = state.step_graph(images, target)
        else:
            logged = update(state, images, target)
    finally:
        if teacher_train:  # outside a step the teacher is always in eval mode
            state.teacher.eval()
    state.scheduler.step()
    state.step += 1
    return logged


def update(state: TrainState, images: torch.Tensor, target: torch.Tensor, whole_step_graph: bool = False) -> dict[str, torch.Tensor]:
    """The update of a step (forwards, losses, backwards, the optimizers' steps): what a step's CUDA
    graph captures. ``whole_step_graph``: called to capture (or warm up) the whole step, so the
    teacher runs as itself, not as its own graph."""
    rt, method = state.runtime, state.method
    teacher_forward = state.teacher if whole_step_graph else state.teacher_forward
    t_out: dict[str, torch.Tensor] = {}
    if state.skip_nonfinite:  # a skipped step must not leave its BatchNorm statistics behind either
        teacher = state.teacher if state.teacher is not None and state.teacher.training else None
        buffers = [b for m in (state.student, method, teacher) if m is not None for b in m.buffers()]
        saved = [b.clone() for b in buffers]
    with rt.autocast():
        if state.teacher is not None and (method is None or method.needs_teacher):
            with torch.no_grad():
                t_out = teacher_forward(images)
        s_out = state.student_forward(images)
        terms = {"task": task_loss(s_out["out"], target) * state.task_scale}
        if method is not None:
            terms.update(state.method_forward(s_out, t_out, target))
    total = sum(terms.values())
    state.optimizer.zero_grad(set_to_none=True)
    logged = {Metric.loss(k): v.detach() for k, v in terms.items()}
    logged[Metric.LOSS_TOTAL] = total.detach()
    if state.skip_nonfinite and not bool(torch.isfinite(total)):  # waits for the device: skip mode only
        state.skipped_steps += 1
        with torch.no_grad():
            for b, old in zip(buffers, saved):
                b.copy_(old)
        return logged
    if total.requires_grad:  # False only while the method froze the student and trains nothing itself
        rt.backward(total)
        if method is not None and rt.distributed:
            rt.all_reduce_grads(method.student_parameters())
        rt.step(state.optimizer)
    if method is not None:
        detached = {k: v.detach() for k, v in s_out.items()}
        logged.update({Metric.loss(k): v for k, v in method.own_step(detached, t_out, target, rt).items()})
    return logged


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, scales: tuple[float, ...] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Class probabilities (float32) at the input size, averaged over scales (and flips)."""
    h, w = images.shape[-2:]
    probs = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        views = [x, x.flip(-1)] if flip else [x]
        for i, v in enumerate(views):
            out = model(v)["out"].float()
            out = out.flip(-1) if i == 1 else out
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            probs = probs + out.softmax(1)
    return probs


def image_sizes(dataset: Dataset, indices: Sequence[int] | None = None) -> list[tuple[int, int]] | None:
    """The stored (H, W) of each image (of those at ``indices``), for a dataset that can tell them
    without decoding (VOC and Cityscapes layouts, from file headers); None for one that cannot."""
    indices = range(len(dataset)) if indices is None else indices
    if isinstance(dataset, Subset):
        return image_sizes(dataset.dataset, [dataset.indices[i] for i in indices])
    size = getattr(dataset, "image_size", None)
    return None if size is None else [size(i) for i in indices]


class SizeBatches(Sampler[list[int]]):
    """Batches of up to ``batch_size`` images that share one size, sizes in the order they first
    appear. VOC's images come in many sizes; batched by size they need no padding, so each image's
    prediction is the one it gets alone, and a GPU evaluates several per launch instead of one."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int) -> None:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size, []).append(index)
        self.batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def eval_loader(dataset: Dataset, cfg: EvalConfig, rt: Runtime | None = None, workers: int = 0) -> DataLoader:
    """This process's share of a split (every W-th image), kept for the whole run; with a batch size
    above one, images of one size per batch (``SizeBatches``)."""
    rt = rt or Runtime()
    part = Subset(dataset, range(rt.rank, len(dataset), rt.world_size)) if rt.distributed else dataset
    sizes = image_sizes(part) if cfg.batch_size > 1 else None
    batching: dict[str, Any] = (
        {"batch_size": cfg.batch_size, "shuffle": False} if sizes is None else {"batch_sampler": SizeBatches(sizes, cfg.batch_size)}
    )
    # an own generator: a loader draws its workers' seed when iterated, from the global RNG (dropout's)
    # if it has none; a persistent loader draws once per run, a new one once per evaluation, so a
    # resumed run would draw a different number of times than an uninterrupted one
    return DataLoader(
        part,
        **batching,
        num_workers=workers,
        pin_memory=rt.cuda,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    num_classes: int,
    cfg: EvalConfig,
    progress: bool = False,
    rt: Runtime | None = None,
    on_batch: Callable[[torch.Tensor, list[int]], None] | None = None,
    normalize: str | None = None,
) -> tuple[SegMetrics, torch.Tensor]:
    """mIoU, pixel accuracy and per-class IoU from one confusion matrix over the whole split,
    accumulated on the device and summed over processes. ``on_batch`` gets each batch's predicted
    class ids (B x H x W, on the device) and their images' indices in the loader's dataset
    (``kdbench eval`` writes them). ``normalize``: the split's ``Splits.normalize``."""
    rt = rt or Runtime()
    loader = data if isinstance(data, DataLoader) else eval_loader(data, cfg, rt)
    was_training = model.training
    model.eval()
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = rt.eval_cudnn_benchmark  # images come in many sizes: autotuning is per size
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=rt.device)
    try:
        with make_progress(enabled=progress, transient=True) as bar:
            task = bar.add_task("evaluating", total=len(loader))
            for (images, target), indices in zip(loader, loader.batch_sampler):
                images, target = model_batch(rt, images, target, normalize)
                with rt.autocast():
                    pred = predict(model, images, cfg.scales, cfg.flip).argmax(1)
                cm += confusion_matrix(pred, target, num_classes, IGNORE)
                if on_batch is not None:
                    on_batch(pred, list(indices))
                bar.advance(task)
                fault_point("eval")
    finally:
        torch.backends.cudnn.benchmark = benchmark
        model.train(was_training)
    cm = rt.all_reduce_(cm).cpu()
    return SegMetrics.from_confusion(cm), cm


# ---------------------------------------------------------------------------------------------
# the loop


BEST_FILE = "best.pt"  #: beside a run's last.pt: the weights train.select=best reports


def keep_best(state: TrainState, checkpoint_path: Path | None, extra: dict[str, Any]) -> None:
    """Remember the student's weights as the best so far (train.select=best), in memory and, for the
    record and for `kdbench eval`/`plot`, as ``best.pt`` beside the checkpoint."""
    weights = {k: v.detach().clone() for k, v in state.student.state_dict().items()}
    state.best = (state.step, weights)
    if checkpoint_path is not None and state.runtime.is_main:
        save_atomic({"student": weights, "step": state.step, **extra}, checkpoint_path.with_name(BEST_FILE))


def best_weights(state: TrainState, final_miou: float, checkpoint_path: Path | None) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(step, weights) of the best evaluation during training when it beat the final one, else None.
    After a resume the weights come from ``best.pt`` (the memory copy went with the old process)."""
    if not state.history:
        return None
    top = max(state.history, key=lambda h: h["miou"])
    if top["miou"] <= final_miou:
        return None
    if state.best is not None and state.best[0] == top["step"]:
        return state.best
    path = checkpoint_path.with_name(BEST_FILE) if checkpoint_path is not None else None
    if path is not None and path.is_file():
        saved = load(path, "best checkpoint")
        if saved.get("step") == top["step"]:
            return int(top["step"]), saved["student"]
    raise UserError(f"train.select=best: the weights of step {top['step']} (val mIoU {100 * top['miou']:.2f}) are gone ({path} is missing or of another step); rerun without --resume")


def best_miou(latest: float, history: list[dict[str, float]]) -> float:
    """The best val mIoU so far: the latest evaluation's or one of the ``history``'s."""
    return max([latest, *(h["miou"] for h in history)])


class NonFiniteWatch:
    """Remembers the first step with a loss term (the method's own included) that is NaN or
    infinite, without waiting for the device; ``check``, called where the loop waits anyway (log
    intervals, evaluations, checkpoints; every step on the CPU), stops the run. So a checkpoint is
    never written after a non-finite step: the last one is the last good one. Disabled (skip mode:
    the step itself skips non-finite updates), it watches nothing."""

    def __init__(self, label: str = "training", enabled: bool = True) -> None:
        self.label, self.enabled = label, enabled
        self.keys: list[str] = []
        self.first: torch.Tensor | None = None  #: the step, -1 while all were finite
        self.values = torch.zeros(0)

    def see(self, step: int, logged: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        if list(logged) != self.keys:  # another set of terms (a phase of the method): settle the old first
            self.check()
            self.keys, self.first = list(logged), None
        values = torch.stack([v.detach().float().reshape(()) for v in logged.values()])
        if self.first is None:
            self.first, self.values = torch.full((), -1, dtype=torch.long, device=values.device), torch.zeros_like(values)
        new = ~torch.isfinite(values).all() & (self.first < 0)
        self.first = torch.where(new, step, self.first)
        self.values = torch.where(new, values, self.values)

    def check(self) -> None:
        if self.first is None or int(self.first) < 0:
            return
        values = dict(zip(self.keys, self.values.tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        named = ", ".join(f"{k}={values[k]}" for k in [k for k in bad if k != Metric.LOSS_TOTAL] or bad)
        raise NonFiniteLoss(
            f"{self.label}: non-finite loss at step {int(self.first)} ({named}); the last checkpoint is from before it. "
            "Lower train.lr or the method's weights, or set train.on_nonfinite=skip to skip such steps"
        )


@dataclass
class LoopHooks:
    """How the loop talks to the world: logging, evaluation, checkpoints. All optional."""

    log: Callable[[dict[str, float], int], None] = lambda metrics, step: None
    #: called at every evaluation with the step and the metrics; may raise to stop (pruning)
    on_eval: Callable[[int, SegMetrics], None] = lambda step, metrics: None
    #: called after every step (tests use it to simulate a kill)
    after_step: Callable[[int], None] = lambda step: None
    #: extra entries saved in every checkpoint (e.g. the MLflow run id)
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)


def teacher_buffers(state: TrainState) -> dict[str, torch.Tensor] | None:
    """The teacher's buffers where training changes them (a method with ``teacher_mode`` "train":
    BatchNorm running statistics), else None."""
    if not runs_teacher_in_train_mode(state):
        return None
    return dict(state.teacher.named_buffers())


def state_dict(state: TrainState) -> dict[str, Any]:
    """The checkpoint of a run; every process must call it (it gathers their RNG states)."""
    buffers = teacher_buffers(state)
    return {
        **({"teacher_buffers": buffers} if buffers is not None else {}),
        "student": state.student.state_dict(),
        "method": state.method.state_dict() if state.method is not None else {},
        "method_optimizers": state.method.optimizer_state() if state.method is not None else {},
        "optimizer": portable(state.optimizer.state_dict()),
        "scheduler": portable(state.scheduler.state_dict()),
        "scalers": state.runtime.scaler_states(),
        "step": state.step,
        "skipped_steps": state.skipped_steps,
        "history": state.history,
        "rng": state.runtime.rng_states(),
    }


def load_state(state: TrainState, ckpt: dict[str, Any]) -> None:
    state.student.load_state_dict(ckpt["student"])
    buffers = teacher_buffers(state)
    if buffers is not None and "teacher_buffers" in ckpt:
        if ckpt["teacher_buffers"].keys() != buffers.keys():
            raise UserError("checkpoint: its teacher buffers do not fit this run's teacher")
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(ckpt["teacher_buffers"][k])
    if state.method is not None:
        state.method.load_state_dict(ckpt["method"])
        state.method.load_optimizer_state(ckpt["method_optimizers"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.runtime.load_scaler_states(ckpt.get("scalers", {}))
    state.step = ckpt["step"]
    state.skipped_steps = ckpt.get("skipped_steps", 0)
    state.history = list(ckpt["history"])
    state.runtime.set_rng_states(ckpt["rng"])


def run_loop(
    state: TrainState,
    train_set: Dataset,
    evaluation: DataLoader | None,
    num_classes: int,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    seed: int,
    checkpoint_path: Path | None,
    hooks: LoopHooks,
    workers: int = 0,
    progress: bool = True,
    label: str = "training",
) -> None:
    """Train from ``state.step`` to ``total_steps``, evaluating (``evaluation``: an ``eval_loader``)
    and checkpointing on the way.

    Only the main process writes checkpoints; every process takes part in making them. Loss values
    are read from the device at log intervals only."""
    total = state.total_steps
    cfg, rt = train_cfg, state.runtime
    progress = progress and rt.is_main

    def checkpoint() -> None:
        if checkpoint_path is not None:
            ckpt = state_dict(state)
            if rt.is_main:
                save_atomic({**ckpt, **hooks.checkpoint_extra}, checkpoint_path)

    def do_eval() -> None:
        if evaluation is None:
            return
        metrics, _ = evaluate(state.student, evaluation, num_classes, eval_cfg, rt=rt, normalize=state.normalize)
        previous = best_miou(-math.inf, state.history)
        best = max(metrics.miou, previous)
        state.history.append({"step": state.step, "miou": metrics.miou})
        if metrics.miou > previous and cfg.select == "best":
            keep_best(state, checkpoint_path, hooks.checkpoint_extra)
        if progress and hasattr(bar, "console"):
            bar.console.print(f"{label} step {state.step}/{total}: val mIoU {100 * metrics.miou:.2f} (best {100 * best:.2f})", markup=False, highlight=False)
        hooks.log({Metric.VAL_MIOU: metrics.miou, Metric.VAL_PIXEL_ACC: metrics.pixel_acc}, state.step)
        hooks.on_eval(state.step, metrics)

    window_start, window_steps = time.perf_counter(), 0
    watch = NonFiniteWatch(label, enabled=not state.skip_nonfinite)
    loader = train_batches(train_set, cfg.batch_size, seed, state.step, total, workers, rt)
    with make_progress(enabled=progress) as bar, workers_closed(loader):
        task = bar.add_task(label, total=total, completed=state.step, loss=math.nan, lr=0.0, ips=0.0)
        for images, target in loader:
            logged = train_step(state, images, target)
            window_steps += 1
            step = state.step
            watch.see(step, logged)
            if not rt.cuda:
                watch.check()
            if step % cfg.log_interval == 0 or step == total:
                values = {k: float(v) for k, v in logged.items()}  # the one wait for the device per log interval
                watch.check()
                if state.skip_nonfinite:  # a skipped step's values are not logged; the count is
                    values = {k: v for k, v in values.items() if math.isfinite(v)}
                    values[Metric.SKIPPED_STEPS] = state.skipped_steps
                elapsed = time.perf_counter() - window_start
                ips = window_steps * cfg.batch_size / elapsed if elapsed > 0 else 0.0
                lr = float(state.optimizer.param_groups[0]["lr"])
                hooks.log({**values, Metric.LR: lr, Metric.IMAGES_PER_S: ips}, step)
                window_start, window_steps = time.perf_counter(), 0
                bar.update(task, completed=step, loss=values.get(Metric.LOSS_TOTAL, math.nan), lr=lr, ips=ips)
            else:
                bar.update(task, completed=step)
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < total:
                watch.check()
                do_eval()
            if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step < total:
                watch.check()
                checkpoint()
            hooks.after_step(step)
            fault_point("step")
    watch.check()
    checkpoint()
