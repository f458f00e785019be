"""CWD: channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021).

Each channel c of a map y (logits z or a feature f) is turned into a distribution over its h*w
positions, and the student matches the teacher's distribution channel by channel:

    phi(y)_{b,c,i} = exp(y_{b,c,i} / T) / sum_j exp(y_{b,c,j} / T)                 i, j over the h*w positions
    L_cwd(y_s, y_t) = T^2 / (B * C) * sum_{b,c} KL( phi(y_t)_{b,c} || phi(y_s)_{b,c} )

    L = w * L_cwd(z_s, z_t)  [+ w_f * L_cwd(conn(f_s), f_t)]  [+ w_kd * KD(z_s, z_t)]  [+ adversarial term]

``conn`` is a learnable 1x1 convolution (no bias, as CIRKD) on the student feature, present only when
student and teacher channel counts differ; it is trained with the student. KD is ``kd.kd_loss`` on
every pixel of the logits; the adversarial term is ``adversarial.py``.

Options: ``weight``/``temperature`` (logit term), ``feature_weight``/``feature_temperature``/``feature``
(the feature term; weight 0 = off), ``kd_weight``/``kd_temperature``, and the adversarial options
(``adv_*``, see adversarial.py).

Presets:
    ``paper``    logits only, T = 4, weight 3 (the paper's segmentation setting; the default)
    ``pure``     the same: CWD on the logits alone
    ``cirkd``    CIRKD's train_cwd.sh: CWD on logits (3) and on the ``decoder`` feature (50), both T = 4,
                 plus pixel KD (1, T = 1) and the hinge adversarial term (lambda_adv 0.001, lambda_d 0.1,
                 Adam 4e-4, betas (0.9, 0.99))
    ``mmrazor``  mmrazor's Cityscapes config: logits only, T = 1, weight 5

Deliberate differences from the original code: when student and teacher maps differ in spatial size
(output stride 16 vs 8), the student's map is resized (bilinear) to the teacher's instead of failing.
CIRKD uses one connector for both the logit and the feature term (only ever applied to the feature);
kdbench has a connector for the feature term only and refuses logits with different class counts.
CIRKD divides the feature term by B * C_s, the student's channel count read before the connector;
kdbench divides by the number of distributions compared, B * C_t (the paper's 1 / C). The two agree
when the channel counts do; otherwise CIRKD's feature weight is effectively scaled by C_t / C_s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .adversarial import CIRKD_ADVERSARIAL, AdversarialConfig, AdversarialMethod, match_size
from .base import float32, hparam
from .kd import kd_loss

FEATURES = ("decoder", "encoder", "backbone", "low")


@float32
def cwd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 / (B*C) * sum over (b, c) of KL(p_t || p_s), p = softmax over the h*w positions of y / T."""
    if s.shape != t.shape:
        raise ValueError(f"cwd_loss: shapes differ {tuple(s.shape)} vs {tuple(t.shape)}")
    b, c = s.shape[:2]
    log_p_s = F.log_softmax(s.reshape(b * c, -1) / temperature, dim=1)
    log_p_t = F.log_softmax(t.reshape(b * c, -1) / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * temperature**2 / (b * c)


@dataclass
class CWDConfig(AdversarialConfig):
    weight: float = hparam(3.0, "weight of CWD on the logits", low=0.1, high=30.0, log=True)
    temperature: float = hparam(4.0, "temperature T of the logit term", low=1.0, high=8.0)
    feature_weight: float = hparam(0.0, "weight of CWD on a feature (0: off)", low=1.0, high=100.0, log=True)
    feature_temperature: float = hparam(4.0, "temperature T of the feature term", low=1.0, high=8.0)
    feature: Literal["decoder", "encoder", "backbone", "low"] = hparam("decoder", "the distilled feature", choices=FEATURES)
    kd_weight: float = hparam(0.0, "weight of pixel KD on the logits (0: off)", low=0.1, high=10.0, log=True)
    kd_temperature: float = hparam(1.0, "temperature of pixel KD", low=1.0, high=8.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.weight, self.feature_weight, self.kd_weight) < 0:
            raise ValueError("cwd: weights must be >= 0")
        if min(self.temperature, self.feature_temperature, self.kd_temperature) <= 0:
            raise ValueError("cwd: temperatures must be > 0")


class CWD(AdversarialMethod):
    """Channel-wise distillation: per-channel spatial distributions matched with KL."""

    name = "cwd"
    Config = CWDConfig
    presets = {
        "paper": {"weight": 3.0, "temperature": 4.0},
        "pure": {"weight": 3.0, "temperature": 4.0},
        "cirkd": {
            "weight": 3.0,
            "temperature": 4.0,
            "feature_weight": 50.0,
            "feature_temperature": 4.0,
            "feature": "decoder",
            "kd_weight": 1.0,
            "kd_temperature": 1.0,
            **CIRKD_ADVERSARIAL,
        },
        "mmrazor": {"weight": 5.0, "temperature": 1.0},
    }
    default_preset = "paper"

    def __init__(self, cfg: CWDConfig, student, teacher) -> None:
        super().__init__(cfg, student, teacher)
        if student.num_classes != teacher.num_classes:
            raise ValueError(f"cwd: student and teacher predict {student.num_classes} vs {teacher.num_classes} classes")
        self.connector: nn.Module | None = None
        if cfg.feature_weight > 0:
            cs, ct = student.channels[cfg.feature], teacher.channels[cfg.feature]
            if cs != ct:
                self.connector = nn.Conv2d(cs, ct, kernel_size=1, bias=False)
        self.build_adversary()

    def forward(self, student, teacher, target) -> dict[str, torch.Tensor]:
        c = self.cfg
        z_s, z_t = match_size(student["logits"], teacher["logits"]), teacher["logits"]
        terms: dict[str, torch.Tensor] = {}
        if c.weight > 0:
            terms["cwd_logits"] = c.weight * cwd_loss(z_s, z_t, c.temperature)
        if c.feature_weight > 0:
            f_s, f_t = student[c.feature], teacher[c.feature]
            if self.connector is not None:
                f_s = self.connector(f_s)
            terms[f"cwd_{c.feature}"] = c.feature_weight * cwd_loss(match_size(f_s, f_t), f_t, c.feature_temperature)
        if c.kd_weight > 0:
            terms["kd"] = c.kd_weight * kd_loss(z_s, z_t, c.kd_temperature)
        terms.update(self.adversarial_terms(student, teacher))
        return terms
