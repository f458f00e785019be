"""Shared by the method tests: a tiny stand-in for a segmentation model with the shared feature
names, feature specs for it, and a method built from a preset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.methods.base import FeatureSpec

NUM_CLASSES = 5
S_CH = {"low": 4, "backbone": 16, "encoder": 12, "decoder": 8}
T_CH = {"low": 6, "backbone": 32, "encoder": 20, "decoder": 12}


class FakeSegNet(nn.Module):
    """A tiny model with the shared output names; ``stride`` sets the logits' output stride."""

    def __init__(self, channels: dict[str, int], stride: int = 2) -> None:
        super().__init__()
        self.low = nn.Conv2d(3, channels["low"], 3, stride, 1)
        self.backbone = nn.Conv2d(channels["low"], channels["backbone"], 3, 1, 1)
        self.encoder = nn.Conv2d(channels["backbone"], channels["encoder"], 1)
        self.decoder = nn.Conv2d(channels["encoder"], channels["decoder"], 3, 1, 1)
        self.classifier = nn.Conv2d(channels["decoder"], NUM_CLASSES, 1)

    def forward(self, x):
        low = self.low(x).relu()
        backbone = self.backbone(low).relu()
        encoder = self.encoder(backbone).relu()
        decoder = self.decoder(encoder).relu()
        logits = self.classifier(decoder)
        out = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out, "logits": logits, "low": low, "backbone": backbone, "encoder": encoder, "decoder": decoder}


def t64(values, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def specs(s_ch=S_CH, t_ch=T_CH, teacher_taps: tuple[str, ...] = ()) -> tuple[FeatureSpec, FeatureSpec]:
    return FeatureSpec(dict(s_ch), NUM_CLASSES), FeatureSpec(dict(t_ch), NUM_CLASSES, teacher_taps)


def build(cls, preset: str = "default", teacher_taps: tuple[str, ...] = (), **overrides):
    """``cls`` at ``preset`` with ``overrides`` on top, sized for the fake student and teacher."""
    cfg = cls.Config(**{**cls.presets.get(preset, {}), **overrides})
    return cls(cfg, *specs(teacher_taps=teacher_taps))
