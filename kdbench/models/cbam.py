"""CBAM (Woo et al., ECCV 2018): a channel gate, then a spatial gate; out = x * Mc * Ms.

Used inside a model's forward pass (AttnFD's "pretrained" teacher attention, ``attention_taps``)
and by AttnFD's student side. The descriptor functions are the parameter-free halves of the gates,
so methods can build attention variants on exactly the same pooling.
"""

from __future__ import annotations

import torch
from torch import nn


def channel_descriptors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(average, max) over space: two B x C x 1 x 1 descriptors, the channel gate's inputs."""
    return x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)


def spatial_descriptor(x: torch.Tensor) -> torch.Tensor:
    """[max, mean] over channels as a B x 2 x H x W map, the spatial gate's input (CBAM's order)."""
    return torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)


class ChannelGate(nn.Module):
    """Mc = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), one shared MLP with a bottleneck."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        # 1x1 convs on B x C x 1 x 1 are the paper's Linear layers without the flatten
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        avg, mx = channel_descriptors(x)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class SpatialGate(nn.Module):
    """Ms = sigmoid(BN(conv7x7([channel-max, channel-mean])))."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(spatial_descriptor(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class CBAM(nn.Module):
    """Channel gate, then spatial gate on the channel-refined map (sequential, as in the paper)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(kernel_size)

    def attention_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Mc, Ms): B x C x 1 x 1 and B x 1 x H x W; forward(x) == x * Mc * Ms."""
        mc = self.channel_gate.attention_map(x)
        return mc, self.spatial_gate.attention_map(x * mc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_gate(self.channel_gate(x))
