"""A tiny stand-in for a segmentation model with the shared feature names, for method tests."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

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
