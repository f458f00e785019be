"""Pixel-wise KD (Hinton et al., 2015) as used for segmentation by CIRKD and SKD.

    L_kd = w * T^2 / N * sum_i KL( softmax(z_t,i / T) || softmax(z_s,i / T) )

over the N pixels i of the logits. CIRKD keeps ignore-label pixels (``mask_ignore=False``);
``mask_ignore=True`` averages over labelled pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .base import Method, float32, hparam


def downsample_labels(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, H, W) label map, so class ids never blend."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()


@float32
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    target: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Mean over pixels of T^2 * KL(p_t || p_s); pixels labelled ``ignore_index`` in ``target``
    (resized to the logits) are left out when ``target`` is given."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: shapes differ {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (B, h, w)
    if target is None:
        return kl.mean() * t * t
    valid = downsample_labels(target, kl.shape[-2:]) != ignore_index
    return (kl * valid).sum() / valid.sum().clamp(min=1) * t * t


@dataclass
class KDConfig:
    weight: float = hparam(1.0, "weight of the KD term", low=0.1, high=10.0, log=True)
    temperature: float = hparam(1.0, "softmax temperature T", low=1.0, high=8.0)
    mask_ignore: bool = hparam(False, "leave ignore-label pixels out (CIRKD keeps them)")
    on: Literal["logits", "out"] = hparam(
        "logits", "'logits': before upsampling (z); 'out': upsampled to the input size", choices=("logits", "out")
    )

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"kd: weight must be >= 0, got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"kd: temperature must be > 0, got {self.temperature}")


class KD(Method):
    """Hinton's KD on every pixel of the logits."""

    name = "kd"
    Config = KDConfig
    presets = {"cirkd": {"weight": 1.0, "temperature": 1.0, "mask_ignore": False}}
    default_preset = "cirkd"

    def forward(self, student, teacher, target) -> dict[str, torch.Tensor]:
        c = self.cfg
        key = c.on
        loss = kd_loss(student[key], teacher[key], c.temperature, target if c.mask_ignore else None)
        return {"kd": c.weight * loss}
