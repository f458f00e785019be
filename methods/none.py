"""The plain student: no distillation term. A method too, so baselines take the same path."""

from __future__ import annotations

import torch

from .base import Method


class NoDistillation(Method):
    """Task loss only; the teacher is never run."""

    name = "none"
    needs_teacher = False

    def forward(self, student, teacher, target) -> dict[str, torch.Tensor]:
        return {}
