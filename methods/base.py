"""The method contract: what every distillation method implements.

A method is an ``nn.Module`` with a dataclass of hyper-parameters (``Config``) and named presets.
The engine gives it the student's and the teacher's named features (see ``kdbench.models``) and the
labels; it returns a dict of named, already weighted loss terms that the engine adds to the task loss
and logs one by one. Learnable parts (connectors, attention modules) live on the method and are
trained with the student. A part that needs its own optimizer (a discriminator) is declared in
``own_optimizers`` and stepped in ``own_step``; the engine never special-cases a method by name.

What a method may ask of the engine for the models it does not own, by attributes the engine reads
before every step (again: never by name):
- ``student_frozen``: True while the student model's own parameters must not change (a warm-up
  that trains only the method's parts). The method sets it in ``on_step``; the engine turns the
  ``requires_grad`` flags of the student's trainable parameters off (and on again when it is False).
  A frozen parameter gets no gradient (the step's ``zero_grad(set_to_none=True)`` leaves it None)
  and every optimizer skips a parameter whose gradient is None, so neither weight decay nor
  momentum moves it. The student stays in train mode: its BatchNorm statistics still update.
  The method's own parts freeze the same way, by their own ``requires_grad`` flags.
- ``teacher_mode``: ``"eval"`` (the default: BatchNorm with the teacher's running statistics) or
  ``"train"``: the teacher runs in train mode for each training step (BatchNorm with each batch's
  statistics, running statistics updated) and is back in eval mode outside it, so any evaluation of
  the teacher is unaffected. Its parameters stay frozen and its forward stays under ``no_grad``,
  which changes no value: nothing of the teacher requires a gradient, and BatchNorm updates its
  running statistics without autograd anyway. The checkpoint then holds the teacher's buffers, so a
  resumed run continues from the running statistics the killed one had reached.

Precision: the engine runs ``forward`` under the run's autocast (bf16 / fp16 on a GPU), so
connectors and attention modules run fast; the loss functions themselves are decorated with
``float32`` and compute in float32. ``own_step`` gets the ``Runtime`` for its own backward and
optimizer step (GradScaler under fp16, gradient averaging across processes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from kdbench.cuda_graphs import portable
from kdbench.runtime import Runtime, float32, fused_on  # noqa: F401  (float32: the decorator of every loss function)


def hparam(
    default: Any,
    help: str,
    low: float | None = None,
    high: float | None = None,
    log: bool = False,
    choices: tuple | None = None,
) -> Any:
    """A hyper-parameter field: default, one-line help and the Optuna search range (if tunable)."""
    meta = {"help": help, "low": low, "high": high, "log": log, "choices": choices}
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FeatureSpec:
    """Channels of each named feature of a model, so a method can size its connectors."""

    channels: dict[str, int]
    num_classes: int
    #: taps refined by a CBAM inside the model's own forward pass
    attention_taps: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: nn.Module, num_classes: int) -> FeatureSpec:
        """The spec of a built kdbench model (anything with ``feature_channels`` and ``attention_taps``)."""
        return cls(dict(model.feature_channels), num_classes, tuple(model.attention_taps))


@dataclass
class NoConfig:
    """A method without hyper-parameters."""


class Method(nn.Module):
    """Base class of all distillation methods."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    #: preset name -> overrides of Config defaults. "default" is the Config defaults themselves.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the preset used when the recipe names none
    default_preset: ClassVar[str] = "default"
    #: options that change the teacher (and its cache key) or the method's structure, with the
    #: reason: `kdbench tune` refuses to search them
    structural: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: Any, student: FeatureSpec, teacher: FeatureSpec) -> None:
        super().__init__()
        self.cfg = cfg
        self.student_spec = student
        self.teacher_spec = teacher

    #: False lets the engine skip the teacher entirely (the plain student)
    needs_teacher: ClassVar[bool] = True
    #: how the teacher runs in a training step: "eval" or "train" (see the module docstring);
    #: a subclass may make it a property of its Config. Fixed for a run.
    teacher_mode: Literal["eval", "train"] = "eval"
    #: True while the student model's own parameters must not change; set in ``on_step``
    student_frozen: bool = False

    @classmethod
    def teacher_requirements(cls, cfg: Any) -> dict[str, Any]:
        """Teacher-recipe keys this configuration needs (e.g. CBAMs trained inside the teacher).

        Applied to the recipe's teacher section when the recipe is resolved, so the teacher cache
        key, the logged recipe and the trained teacher all agree."""
        return {}

    @classmethod
    def inert_options(cls, cfg: Any) -> set[str]:
        """Options that change nothing under this configuration (a discriminator's width when no
        discriminator is built); tables leave them out of a row's name and do not split rows on them."""
        return set()

    # -- what the engine asks -------------------------------------------------------------
    def forward(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named, weighted loss terms. ``target`` is the label map at input size (255 = ignore)."""
        raise NotImplementedError

    def student_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the student's optimizer: all, except those of ``own_optimizers``."""
        own = {id(p) for opt in self._own_optimizers.values() for g in opt.param_groups for p in g["params"]}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimizers the method steps itself (e.g. a discriminator's). Built once by the engine."""
        return {}

    @property
    def _own_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if "_optims" not in self.__dict__:
            self.__dict__["_optims"] = self.configure_optimizers()
        return self.__dict__["_optims"]

    def own_step(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], target: torch.Tensor, rt: Runtime
    ) -> dict[str, torch.Tensor]:
        """Called after the student's optimizer step with detached outputs; returns logged values as
        detached tensors (reading them would wait for the GPU). Use ``rt.autocast()``,
        ``rt.backward(loss, key)``, ``rt.all_reduce_grads(params)`` and ``rt.step(optimizer, key)``."""
        return {}

    def on_step(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Told the current step before each training step (for warm-ups and freezes).

        On a GPU the step after it is a replayed CUDA graph (``kdbench.cuda_graphs``): what this
        changes must be ``requires_grad`` flags (a new set of flags, the student's included,
        captures the step again), ``student_frozen`` (which the engine turns into the student's
        flags), a tensor changed in place, or a learning rate set with ``set_lr``; a Python number
        the forward reads would stay at its value when the step was captured."""

    # -- checkpointing -------------------------------------------------------------------
    def optimizer_state(self) -> dict[str, Any]:
        return {k: portable(opt.state_dict()) for k, opt in self._own_optimizers.items()}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        for k, opt in self._own_optimizers.items():
            opt.load_state_dict(state[k])


def config_fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))
