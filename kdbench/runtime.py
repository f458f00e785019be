"""Where and how a run computes: device, precision, compilation and the processes of a multi-GPU run.

One ``Runtime`` is made from the recipe's ``runtime:`` section (and the environment torchrun sets)
and handed to the engine, the methods and the evaluation; nothing else in kdbench names a device,
a dtype or a process group. On a CPU with ``precision: fp32`` every call here is a no-op, so the
CPU path computes exactly what it did before the runtime existed.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from kdbench.errors import UserError
from kdbench.recipe import check_device_setting

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# loss math in float32


def float32(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a loss function in float32 whatever the autocast dtype.

    Softmax, log-softmax, KL divergences and norms of bf16 maps lose the digits a loss needs (a CWD
    KL came out at -2.19 under CPU bf16 autocast). Half-precision tensor arguments are cast up and
    autocast is off inside; float32 and float64 arguments pass through untouched, so the CPU fp32
    path is bit-exact.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not tensors or not any(torch.is_autocast_enabled(t.device.type) or t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
            return fn(*args, **kwargs)
        with torch.autocast(tensors[0].device.type, enabled=False):
            return fn(*(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})

    return wrapper


def _up(x: Any) -> Any:
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x


def fused_on(module: nn.Module) -> bool | None:
    """``fused=`` for an optimizer of this module's parameters: the one-kernel implementation on a
    GPU (a step bound by kernel launches feels every one), PyTorch's default elsewhere."""
    p = next(module.parameters(), None)
    return True if p is not None and p.is_cuda else None


# ---------------------------------------------------------------------------------------------
# the runtime


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def sharing_cores(processes: int) -> Iterator[dict[str, str]]:
    """This process's share of the cores for torch's threads while ``processes`` processes (this
    one included) train side by side on this machine; yields the environment for the others.
    torch gives every process a thread per core, so two processes on two cores would run four busy
    threads. ``OMP_NUM_THREADS`` set by the user is left alone."""
    if processes <= 1 or "OMP_NUM_THREADS" in os.environ:
        yield dict(os.environ)
        return
    before, threads = torch.get_num_threads(), max(1, cpu_cores() // processes)
    torch.set_num_threads(threads)
    try:
        yield {**os.environ, "OMP_NUM_THREADS": str(threads)}
    finally:
        torch.set_num_threads(before)


@functools.cache
def cpu_name() -> str:
    """The CPU's model and the vector instructions torch's kernels use on it ("AMD EPYC (AVX2)").
    CPU results are reproducible digit for digit only on the same kind: float kernels differ."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"


@dataclass
class Runtime:
    """Device, precision and process group of one run, with the few operations that depend on them."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision = "fp32"
    compile: bool = False
    #: torch.compile of the method's forward alone, inside the step's CUDA graph
    compile_method: bool = False
    channels_last: bool = False
    sync_batchnorm: bool = False
    #: training steps (or, where a step cannot be captured, the teacher's forward) as CUDA graphs
    cuda_graphs: bool = False
    #: cudnn.benchmark during evaluation (``engine.evaluate``); training's is set once per process
    eval_cudnn_benchmark: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    _scalers: dict[str, torch.amp.GradScaler] = field(default_factory=dict, repr=False)
    _graph_pool: Any = field(default=None, repr=False)

    # -- facts -----------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints, logs to MLflow and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> dict[str, str]:
        """What a run logs about where it ran (MLflow tags)."""
        name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        return {
            "runtime.device": f"{self.device} ({name})" if self.cuda else "cpu",
            "runtime.precision": self.precision,
            "runtime.compile": str(self.compile).lower(),
            "runtime.compile_method": str(self.compile_method).lower(),
            "runtime.world_size": str(self.world_size),
            "runtime.torch": torch.__version__,
            "runtime.cpu": cpu_name(),
        }

    def loader_workers(self, setting: int | str) -> int:
        """``auto``: no worker processes on a CPU (they would take the cores the step needs); on a GPU
        the cores of this machine shared by its processes, one left for the training process."""
        if setting != "auto":
            return int(setting)
        if not self.cuda:
            return 0
        return max(1, min(16, cpu_cores() // self.local_world_size - 1))

    # -- moving things ---------------------------------------------------------------------
    def prepare_module(self, module: nn.Module) -> nn.Module:
        """On the device, channels-last where that is faster (CUDA convolutions), SyncBatchNorm if asked."""
        if self.sync_batchnorm and self.distributed and self.cuda:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def to_device(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda:
            return images, target
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, target.to(self.device, non_blocking=True)

    def autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        # autocast's cache of cast weights must be off where steps are CUDA graphs: the graph must
        # hold the casts themselves, not tensors cast before it was captured
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision], cache_enabled=not self.cuda_graphs)

    def graph_pool(self) -> Any:
        """One memory pool for the CUDA graphs of this process's training steps. Graphs replay one
        at a time, and what one leaves for the next is never in the pool (weights, optimizer state
        and BatchNorm statistics are allocated outside it; gradients and logged losses are written
        by every replay before they are read), so they can share their temporaries: the benchmark's
        twenty graphed rows then fit on one GPU."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # -- optimisation ----------------------------------------------------------------------
    def scaler(self, key: str) -> torch.amp.GradScaler | None:
        """fp16 only: one GradScaler per optimizer (the student's, a discriminator's)."""
        if self.precision != "fp16":
            return None
        if key not in self._scalers:
            self._scalers[key] = torch.amp.GradScaler(self.device.type)
        return self._scalers[key]

    def backward(self, loss: torch.Tensor, key: str = "student") -> None:
        scaler = self.scaler(key)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, key: str = "student") -> None:
        scaler = self.scaler(key)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def all_reduce_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Average gradients over the processes (for parameters outside DistributedDataParallel:
        a method's connectors and attention modules, a discriminator). One flat all-reduce."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def scaler_states(self) -> dict[str, Any]:
        return {k: s.state_dict() for k, s in self._scalers.items()}

    def load_scaler_states(self, states: dict[str, Any]) -> None:
        for k, s in states.items():
            scaler = self.scaler(k)
            if scaler is not None:
                scaler.load_state_dict(s)

    # -- processes -------------------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place (a confusion matrix)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of ``obj`` on every process (a decision every rank must take alike)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (generating data, training a teacher), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def rng_states(self) -> list[dict[str, torch.Tensor | None]]:
        """Every process's RNG state (CPU and, on a GPU, CUDA), for an exact resume."""
        own = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if self.cuda else None}
        return self.gather(own)

    def set_rng_states(self, states: Any) -> None:
        if isinstance(states, torch.Tensor):  # checkpoints from before the runtime: one CPU state
            states = [{"cpu": states, "cuda": None}]
        own = states[self.rank] if self.rank < len(states) else states[0]
        torch.set_rng_state(own["cpu"])
        if self.cuda and own.get("cuda") is not None:
            torch.cuda.set_rng_state(own["cuda"], self.device)


# ---------------------------------------------------------------------------------------------
# making one from a recipe


def process_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) as torchrun sets them; (0, 1, 0, 1) alone."""
    get = lambda key, default: int(os.environ.get(key, default))  # noqa: E731
    return get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0), get("LOCAL_WORLD_SIZE", 1)


def is_main_process() -> bool:
    return process_env()[0] == 0


def resolve_device(setting: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU. A GPU asked for but absent is a
    UserError, so the CLI prints one line instead of training on the CPU by surprise."""
    check_device_setting(setting)
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(
            f"runtime.device: {setting!r} asked for, but torch {torch.__version__} ({build}) sees no GPU; "
            "use --device cpu (or runtime.device=auto)"
        )
    count = torch.cuda.device_count()
    if setting.startswith("cuda:"):
        index = int(setting.split(":")[1])
        if world_size > 1:
            raise UserError(f"runtime.device: {setting!r} names one GPU, but torchrun started {world_size} processes; use cuda or auto")
        if index >= count:
            raise UserError(f"runtime.device: {setting!r} asked for, but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if local_rank >= count:
        raise UserError(f"runtime.device: process {local_rank} on this node has no GPU of its own ({count} GPU(s)); start at most {count} processes per node")
    return torch.device("cuda", local_rank)


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """``auto``: bf16 on a GPU that supports it, fp32 otherwise (fp16 only when asked for)."""
    if setting == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if setting == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"runtime.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32")
    return setting  # type: ignore[return-value]


def on_a_gpu(setting: bool | str, device: torch.device) -> bool:
    """A speed setting whose ``auto`` means on a GPU only (channels_last, compile_method): on a CPU
    they would change the committed results in their last digits."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def make_runtime(cfg: Any) -> Runtime:
    """The runtime of a recipe's ``runtime:`` section in this process; joins torchrun's process group."""
    rank, world, local_rank, local_world = process_env()
    device = resolve_device(cfg.device, local_rank, world)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.sync_batchnorm and device.type != "cuda":
        raise UserError("runtime.sync_batchnorm: SyncBatchNorm needs CUDA (it has no CPU implementation); set it to false")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    return Runtime(
        device=device,
        precision=resolve_precision(cfg.precision, device),
        compile=cfg.compile,
        compile_method=on_a_gpu(cfg.compile_method, device),
        channels_last=on_a_gpu(cfg.channels_last, device),
        sync_batchnorm=cfg.sync_batchnorm,
        cuda_graphs=cfg.cuda_graphs and device.type == "cuda",
        eval_cudnn_benchmark=cfg.eval_cudnn_benchmark and device.type == "cuda",
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
    )


def shutdown() -> None:
    """Leave torchrun's process group (the CLI calls this when a command ends)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
