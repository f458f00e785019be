"""DeepLabV3+ (the AttnFD setting) and DeepLabV3 (the CIRKD setting) on any timm backbone.

Module names follow the reference code (DeepLabV3Plus-Pytorch, on which AttnFD builds): ``backbone``,
``aspp``, ``project`` (low-level projection), ``decoder``, ``classifier``. Every model returns one
dict with the same named features, so methods can tap any model; models know nothing about
distillation.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import UserError
from kdbench.models.cbam import CBAM

TAPS = ("backbone", "encoder", "decoder")


def check_model_args(output_stride: int, attention_taps: tuple[str, ...], pretrained: object) -> None:
    """The arguments every model family takes, checked the same way (one line each)."""
    if output_stride not in (8, 16):
        raise UserError(f"output_stride: must be 8 or 16, got {output_stride}")
    bad = [t for t in attention_taps if t not in TAPS]
    if bad:
        raise UserError(f"attention_taps: unknown taps {bad}; use a subset of {', '.join(TAPS)}")
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise UserError(f"pretrained: expected true, false or a weights file path, got {pretrained!r}")


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    """Bias-free conv (BN follows), "same" padding for 1x1 and (dilated) 3x3."""
    pad = 0 if kernel == 1 else dilation
    conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPPooling(nn.Module):
    """Image-level context: global average, 1x1 conv-BN-ReLU, broadcast back to the input size."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """1x1 branch, three atrous 3x3 branches and image pooling, concatenated and projected."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        branches = [conv_bn_relu(cin, cout)] + [conv_bn_relu(cin, cout, 3, r) for r in rates] + [ASPPPooling(cin, cout)]
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(conv_bn_relu(5 * cout, cout), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.convs], dim=1))


def _init_head(module: nn.Module) -> None:
    """The reference's head init (DeepLabV3Plus-Pytorch ``_init_weight``): He-normal convs, BN = identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegmentationModel(nn.Module):
    """Backbone -> ASPP (``encoder``) -> [low-level fusion] -> 3x3 conv (``decoder``) -> classifier.

    ``plus=True`` is DeepLabV3+ (the decoder fuses the ASPP output, upsampled, with the projected
    low-level feature); ``plus=False`` is DeepLabV3 (the decoder is a 3x3 conv on the ASPP output).
    """

    def __init__(
        self,
        backbone: nn.Module,
        low_index: int,
        num_classes: int,
        output_stride: int,
        plus: bool,
        aspp_channels: int,
        decoder_channels: int,
        low_channels: int,
        attention_taps: tuple[str, ...],
    ) -> None:
        super().__init__()
        info = backbone.feature_info
        self.backbone = backbone
        self.low_index = low_index
        self.plus = plus
        self.arch = "deeplabv3plus" if plus else "deeplabv3"
        self.num_classes = num_classes
        low_c, high_c = info.channels()[low_index], info.channels()[-1]
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(high_c, aspp_channels, rates)
        if plus:
            self.project = conv_bn_relu(low_c, low_channels)
            self.decoder = conv_bn_relu(aspp_channels + low_channels, decoder_channels, 3)
        else:
            self.decoder = nn.Sequential(conv_bn_relu(aspp_channels, decoder_channels, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self.feature_channels = {
            "low": low_c,
            "backbone": high_c,
            "encoder": aspp_channels,
            "decoder": decoder_channels,
            "logits": num_classes,
        }
        self.output_stride = output_stride
        self.attention_taps = tuple(attention_taps)
        for head in (self.aspp, self.decoder, self.classifier, getattr(self, "project", None)):
            if head is not None:
                _init_head(head)
        # created after the head init: CBAM keeps PyTorch's default init, like the paper's code
        self.attention = nn.ModuleDict({t: CBAM(self.feature_channels[t]) for t in self.attention_taps})

    def _tap(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The refined map flows onward, so a teacher's CBAMs are trained by its own task loss."""
        return self.attention[name](x) if name in self.attention else x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        low = feats[self.low_index]
        high = self._tap("backbone", feats[-1])
        enc = self._tap("encoder", self.aspp(high))
        if self.plus:
            up = F.interpolate(enc, size=low.shape[-2:], mode="bilinear", align_corners=False)
            dec = self.decoder(torch.cat([up, self.project(low)], dim=1))
        else:
            dec = self.decoder(enc)
        dec = self._tap("decoder", dec)
        logits = self.classifier(dec)
        out = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out, "logits": logits, "low": low, "backbone": high, "encoder": enc, "decoder": dec}

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head): the head usually learns faster (train.head_lr_mult)."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]
