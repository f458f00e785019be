"""CUDA graphs: a training step replayed as one graph instead of a thousand kernel launches.

At the paper recipes' shapes a bf16 step on a large GPU is bound by the host launching kernels, not
by the GPU running them: a distillation method adds many small kernels (attention maps, connectors,
a discriminator's three passes) that cost host time out of proportion to their work. A CUDA graph
records a step's kernels once and replays them with one launch.

``StepGraph`` captures the whole step: teacher and student forward, the losses, the backward passes
and the optimizer steps, including a method's own (a discriminator's). ``GraphedForward`` captures
only the frozen teacher's forward; the engine uses it where a whole step cannot be captured (several
processes, fp16's GradScaler, an operation that cannot be captured).

What a graph fixes at capture, and how kdbench keeps it right:
- Python values are frozen. Learning rates therefore become device tensors that the schedulers fill
  in place; what a method's ``on_step`` changes must be a ``requires_grad`` flag (a new set of flags,
  the student's or the method's, captures again) or a tensor changed in place.
- Modes are frozen. A teacher that a method runs in train mode (``Method.teacher_mode``) is part of
  the step's key; inside a whole-step graph its BatchNorm is captured like the student's (batch
  statistics and the in-place update of the running statistics are device work, and with a numeric
  momentum nothing reads ``num_batches_tracked`` on the host). ``GraphedForward`` replays eval-mode
  forwards only: a teacher in train mode runs eagerly there.
- Addresses are frozen. Inputs are copied into static buffers; outputs (the logged losses) are static
  buffers that the next replay overwrites, so a step's values are read before the next step runs.
- The first steps of every new shape or phase run eagerly (they are real steps of the run) so that
  cuDNN autotuning and the optimizers' lazy state happen before the capture.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from kdbench.runtime import Runtime

#: eager steps before each capture (autotuning, momentum buffers, an optimizer's step counters)
WARMUP_STEPS = 2


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


class GraphedForward:
    """A frozen module's forward (eval mode, no grad, fixed input shape) replayed as one CUDA graph.

    Outputs are static buffers that the next replay overwrites. A new input shape or dtype captures
    again; a capture that fails falls back to the plain forward."""

    def __init__(self, module: nn.Module, rt: Runtime) -> None:
        self.module, self.rt = module, rt
        self.key: tuple[Any, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False

    def __call__(self, x: torch.Tensor) -> Any:
        if self.failed or self.module.training or torch.is_grad_enabled():
            return self.module(x)
        key = (tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last))
        if key != self.key:
            self._capture(x, key)
            if self.failed:
                return self.module(x)
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out

    def _capture(self, x: torch.Tensor, key: tuple[Any, ...]) -> None:
        self.static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side), self.rt.autocast():  # warm-up: cudnn autotuning, lazy init
                for _ in range(2):
                    self.module(self.static_in)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), self.rt.autocast():
                self.static_out = self.module(self.static_in)
            self.key = key
        except RuntimeError as err:  # an op that cannot be captured: keep the plain forward
            warnings.warn(f"teacher forward not captured as a CUDA graph ({_first_line(err)}); running it eagerly")
            self.failed, self.graph = True, None


def graphed(module: nn.Module, rt: Runtime) -> GraphedForward:
    """One graph per module, shared by every state that uses it (the benchmark's rows)."""
    if "_kdbench_graphed" not in module.__dict__:
        module.__dict__["_kdbench_graphed"] = GraphedForward(module, rt)
    return module.__dict__["_kdbench_graphed"]


def graphable_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Learning rates as device tensors (a schedule fills them in place; a float would be frozen
    into the graph) and Adam's ``capturable`` on (its step counters on the device)."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        if "capturable" in group:
            group["capturable"] = True


def set_lr(group: dict[str, Any], lr: float) -> None:
    """Set a param group's learning rate, in place where it is a tensor (a captured step reads it)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def portable(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's or a schedule's state dict with tensor learning rates as floats and Adam's
    ``capturable`` off, so a checkpoint of a graphed run loads the same into an eager or a CPU run."""
    out = dict(state)
    if "param_groups" in out:
        out["param_groups"] = [
            {**g, "lr": float(g["lr"]), **({"capturable": False} if "capturable" in g else {})} if isinstance(g.get("lr"), torch.Tensor) else g
            for g in out["param_groups"]
        ]
    if "_last_lr" in out:
        out["_last_lr"] = [float(v) for v in out["_last_lr"]]
    return out


class StepGraph:
    """A whole training step replayed as one CUDA graph.

    ``body(images, target, capturing)`` is the step's update (everything but the schedule and the
    step counter), returning its logged values as tensors. ``phase()`` names what Python state the
    update depends on (``requires_grad`` flags); a new phase or input shape runs ``WARMUP_STEPS``
    eager steps and captures again. A capture that fails warns once and leaves the run eager."""

    def __init__(
        self,
        body: Callable[[torch.Tensor, torch.Tensor, bool], dict[str, torch.Tensor]],
        optimizers: Callable[[], list[torch.optim.Optimizer]],
        phase: Callable[[], Hashable],
        rt: Runtime,
    ) -> None:
        self.body, self.optimizers, self.phase, self.rt = body, optimizers, phase, rt
        self.key: Hashable = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.retired: torch.cuda.CUDAGraph | None = None
        self.eager_left = WARMUP_STEPS
        self.failed = False
        self.captures = 0
        #: memory the capture allocated for the step (activations, gradients): what a step needs
        self.capture_mib = 0.0

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.failed:
            return self.body(images, target, False)
        key = (tuple(images.shape), images.dtype, tuple(target.shape), self.phase())
        if key != self.key:
            # the old graph is kept until the next capture: a pool no graph holds is released, and
            # capturing into it again would fail
            self.retired = self.retired or self.graph
            self.graph, self.key, self.eager_left = None, key, WARMUP_STEPS
        if self.graph is None:
            if self.eager_left > 0:
                self.eager_left -= 1
                return self._eager(images, target)
            self._capture(images, target)
            if self.graph is None:
                return self.body(images, target, False)
        self.static_images.copy_(images, non_blocking=True)
        self.static_target.copy_(target, non_blocking=True)
        self.graph.replay()
        return self.static_out

    def _eager(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """A warm-up step on a side stream (as PyTorch asks before a capture), with the plain teacher."""
        side = torch.cuda.Stream(self.rt.device)
        side.wait_stream(torch.cuda.current_stream(self.rt.device))
        with torch.cuda.stream(side), warnings.catch_warnings():
            # an Adam made capturable for an earlier capture warns when stepped outside one
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            out = self.body(images, target, True)
        torch.cuda.current_stream(self.rt.device).wait_stream(side)
        return out

    def _capture(self, images: torch.Tensor, target: torch.Tensor) -> None:
        for opt in self.optimizers():
            graphable_optimizer(opt, self.rt.device)
        self.static_images, self.static_target = images.clone(), target.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.rt.device)
        before = torch.cuda.memory_allocated(self.rt.device)
        torch.cuda.reset_peak_memory_stats(self.rt.device)
        try:
            # thread_local: the loader's pin-memory thread may allocate while the step is captured
            with torch.cuda.graph(graph, pool=self.rt.graph_pool(), capture_error_mode="thread_local"):
                out = self.body(self.static_images, self.static_target, True)
        except RuntimeError as err:
            warnings.warn(f"training step not captured as a CUDA graph ({_first_line(err)}); running it eagerly")
            self.failed = True
            return
        self.capture_mib = (torch.cuda.max_memory_allocated(self.rt.device) - before) / 2**20
        self.graph, self.static_out, self.retired = graph, out, None
        self.captures += 1
