"""The training engine: one step, one evaluation, one loop. It knows no method by name.

A step is: teacher forward (eval, no grad; skipped when the method needs no teacher) -> student
forward -> task loss + the method's named loss terms -> backward -> optimizer and schedule step ->
the method's own optimizer step (e.g. a discriminator). ``train_step`` can be called alone, so a
benchmark can time it against the floor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from kdbench.checkpoint import save_atomic
from kdbench.metrics import SegMetrics, confusion_matrix
from kdbench.methods import Method
from kdbench.progress import make_progress
from kdbench.recipe import EvalConfig, TrainConfig

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


class _CountFrom(Sampler[int]):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def train_batches(dataset: Dataset, batch_size: int, seed: int, start_step: int, total_steps: int, workers: int) -> DataLoader:
    """Batches ``start_step`` .. ``total_steps`` of a run."""
    sampler = _CountFrom(start_step * batch_size, total_steps * batch_size)
    # an own generator: otherwise creating the iterator draws from the global RNG (dropout's), and
    # a resumed run would draw at a different step than an uninterrupted one
    return DataLoader(
        SeededStream(dataset, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------------------------------------
# optimisation


def make_optimizer(student: nn.Module, method: Method | None, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The backbone at ``lr``; the head and the method's own learnable parts at lr * head_lr_mult."""
    backbone, head = student.param_groups()
    extra = method.student_parameters() if method is not None else []
    groups = [{"params": backbone, "lr": lr}, {"params": head + extra, "lr": lr * cfg.head_lr_mult}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


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


def train_step(state: TrainState, images: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """One optimisation step; returns every loss term (weighted) and the total, as floats."""
    method = state.method
    state.student.train()
    if method is not None:
        method.train()
        method.on_step(state.step, state.total_steps, state.steps_per_epoch)
    t_out: dict[str, torch.Tensor] = {}
    if state.teacher is not None and (method is None or method.needs_teacher):
        with torch.no_grad():
            t_out = state.teacher(images)
    s_out = state.student(images)
    terms = {"task": F.cross_entropy(s_out["out"], target, ignore_index=IGNORE)}
    if method is not None:
        for name, value in method(s_out, t_out, target).items():
            terms[name] = value
    total = sum(terms.values())
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    state.optimizer.step()
    state.scheduler.step()
    logged = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
    logged["loss/total"] = float(total.detach())
    if method is not None:
        detached = {k: v.detach() for k, v in s_out.items()}
        logged.update({f"loss/{k}": float(v) for k, v in method.own_step(detached, t_out, target).items()})
    state.step += 1
    return logged


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, scales: tuple[float, ...] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Class probabilities at the input size, averaged over scales (and flips)."""
    h, w = images.shape[-2:]
    probs = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        views = [x, x.flip(-1)] if flip else [x]
        for i, v in enumerate(views):
            out = model(v)["out"]
            out = out.flip(-1) if i == 1 else out
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            probs = probs + out.softmax(1)
    return probs


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, cfg: EvalConfig, progress: bool = False) -> tuple[SegMetrics, torch.Tensor]:
    """mIoU, pixel accuracy and per-class IoU from one confusion matrix over the whole split."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False)
    with make_progress(enabled=progress, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(loader))
        for images, target in loader:
            pred = predict(model, images, cfg.scales, cfg.flip).argmax(1)
            cm += confusion_matrix(pred, target, num_classes, IGNORE)
            bar.advance(task)
    model.train(was_training)
    return SegMetrics.from_confusion(cm), cm


# ---------------------------------------------------------------------------------------------
# the loop


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


def state_dict(state: TrainState) -> dict[str, Any]:
    return {
        "student": state.student.state_dict(),
        "method": state.method.state_dict() if state.method is not None else {},
        "method_optimizers": state.method.optimizer_state() if state.method is not None else {},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "step": state.step,
        "history": state.history,
        "rng": torch.get_rng_state(),
    }


def load_state(state: TrainState, ckpt: dict[str, Any]) -> None:
    state.student.load_state_dict(ckpt["student"])
    if state.method is not None:
        state.method.load_state_dict(ckpt["method"])
        state.method.load_optimizer_state(ckpt["method_optimizers"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.step = ckpt["step"]
    state.history = list(ckpt["history"])
    torch.set_rng_state(ckpt["rng"])


def run_loop(
    state: TrainState,
    train_set: Dataset,
    eval_set: Dataset | None,
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
    """Train from ``state.step`` to ``total_steps``, evaluating and checkpointing on the way."""
    total = state.total_steps
    cfg = train_cfg

    def checkpoint() -> None:
        if checkpoint_path is not None:
            save_atomic({**state_dict(state), **hooks.checkpoint_extra}, checkpoint_path)

    def do_eval() -> None:
        if eval_set is None:
            return
        metrics, _ = evaluate(state.student, eval_set, num_classes, eval_cfg)
        state.history.append({"step": state.step, "miou": metrics.miou})
        hooks.log({"val/miou": metrics.miou, "val/pixel_acc": metrics.pixel_acc}, state.step)
        hooks.on_eval(state.step, metrics)

    loader = train_batches(train_set, cfg.batch_size, seed, state.step, total, workers)
    window_start, window_images = time.perf_counter(), 0
    with make_progress(enabled=progress) as bar:
        task = bar.add_task(label, total=total, completed=state.step, loss=math.nan, lr=0.0, ips=0.0)
        for images, target in loader:
            logged = train_step(state, images, target)
            window_images += images.shape[0]
            step = state.step
            lr = state.optimizer.param_groups[0]["lr"]
            if step % cfg.log_interval == 0 or step == total:
                elapsed = time.perf_counter() - window_start
                ips = window_images / elapsed if elapsed > 0 else 0.0
                hooks.log({**logged, "lr": lr, "throughput/images_per_s": ips}, step)
                window_start, window_images = time.perf_counter(), 0
                bar.update(task, ips=ips)
            bar.update(task, completed=step, loss=logged["loss/total"], lr=lr)
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < total:
                do_eval()
            if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step < total:
                checkpoint()
            hooks.after_step(step)
    checkpoint()
