"""CIRKD's DeepLabV3 on ResNet "v1s" backbones, rebuilt on timm with kdbench's module names.

Reproduces the teacher (DeepLabV3-ResNet101) and student (DeepLabV3-ResNet18) of the CIRKD benchmark
code, github.com/winycg/CIRKD at commit dab64dbb5e4172141166cf8434a80ce55d9d3aa7, files
``models/deeplabv3.py`` (head), ``models/segbase.py`` (backbone choice, ``base_forward``) and
``models/base_models/resnetv1b.py`` (``resnet{18,50,101}_v1s``, ``dilated=True``). Same layers, same
parameter counts (19 classes, no auxiliary head: R18 22,614,099, R101 76,719,571), and released
checkpoints load through ``from_released``; tests/manifests/ holds the released key/shape layout.

Differences from kdbench's plain ``deeplabv3`` (kdbench.models.create_model):
- backbone: the ResNet "v1s" deep stem, three 3x3 convs 64-64-128 (timm ``stem_type="deep",
  stem_width=64``; timm's own ``*d`` models use width 32) instead of the 7x7 conv; no zero-init of
  the last BN of each block (CIRKD's ``zero_init_residual=False``). Dilation is timm's, which is
  CIRKD's: at output stride 8 the first block of layer3 / layer4 keeps dilation 1 / 2 in its first
  3x3 conv, the rest use 2 / 4.
- head 512 wide (ASPP and the 3x3 conv) by default, not 256; dropout 0.5 after the ASPP projection
  (kdbench: 0.1); ASPP rates 12, 24, 36 at output stride 8 (kdbench's too).
- upsampling with ``align_corners=True`` (image pooling, and ``out``: CIRKD's loss and evaluation
  upsample the stride-8 logits that way).
- head init: PyTorch's default layer init (CIRKD's head has no init code), not kdbench's He-normal.
- no auxiliary FCN head: CIRKD trains ResNet models with one on layer3 (loss weight 0.4) and saves it
  in its checkpoints, but no distillation method reads it; ``from_released`` drops it.

Where CIRKD's methods tap (train_kd.py, train_cirkdv2.py): ``outputs[0]`` = the logits at stride 8
(KD, CWD on logits, the adversarial term; CIRKD's memory contrast takes its predictions from them)
= ``logits`` here; ``outputs[-1]`` = the head's feature after 3x3 conv-BN-ReLU-Dropout(0.1), the
classifier's input (SKD, IFVD, CWD on features, FitNet, AT, CIRKD's mini-batch, memory and channel
contrast) = ``decoder`` here. Only DSD also reads ``outputs[-2]``, the auxiliary head's logits,
which this model does not have. ``encoder`` is the ASPP output (after its dropout), ``backbone``
the dilated layer4, ``low`` layer1 (stride 4).

Output stride 16 is not CIRKD's (its v1s nets are dilated to 8 or not at all); it is allowed, with
the usual DeepLabV3 rates 6, 12, 18, as an extension.
"""

from __future__ import annotations

import re

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import UserError
from kdbench.models.deeplab import ASPPPooling, SegmentationModel, check_model_args
from kdbench.models.released import RESNETS, compare, resnet_layout

ARCH = "deeplabv3_cirkd"
BACKBONES = ("resnet18", "resnet50", "resnet101")  # segbase.py: the v1s nets CIRKD builds
STEM_WIDTH = 64  # resnetv1b.py deep_stem: 3x3 convs 3->64, 64->64, 64->128
PROJECT_DROPOUT = 0.5  # deeplabv3.py _ASPP.project

# CIRKD v1s backbone -> timm ResNet(stem_type="deep"). Anchored: only the stem's top-level keys;
# block keys (layer1.0.conv3.weight, ...) are the same in both and pass through unchanged.
_STEM = (
    (r"conv1\.(weight)", r"conv1.0.\1"),
    (r"bn1\.(.+)", r"conv1.1.\1"),
    (r"conv2\.(weight)", r"conv1.3.\1"),
    (r"bn2\.(.+)", r"conv1.4.\1"),
    (r"conv3\.(weight)", r"conv1.6.\1"),
    (r"bn3\.(.+)", r"bn1.\1"),
    (r"(layer[1-4]\..+)", r"\1"),
)
# CIRKD DeepLabV3 head -> kdbench's SegmentationModel (aspp.convs[0..4], aspp.project, decoder, classifier)
_HEAD = (
    (r"head\.aspp\.b0\.([01]\..+)", r"aspp.convs.0.\1"),
    (r"head\.aspp\.b([123])\.block\.([01]\..+)", r"aspp.convs.\1.\2"),
    (r"head\.aspp\.b4\.gap\.1\.(.+)", r"aspp.convs.4.conv.0.\1"),  # gap.0 is the parameter-free pooling
    (r"head\.aspp\.b4\.gap\.2\.(.+)", r"aspp.convs.4.conv.1.\1"),
    (r"head\.aspp\.project\.([01]\..+)", r"aspp.project.0.\1"),
    (r"head\.block\.([01]\..+)", r"decoder.0.\1"),  # block.2 ReLU, block.3 Dropout(0.1): no state
    (r"head\.block\.4\.(.+)", r"classifier.\1"),
)
# Left out on purpose. ``auxlayer.*``: CIRKD's auxiliary FCN head on layer3 (train_kd.py builds the
# teacher with aux=True and ResNet students with aux=True, so checkpoints carry it); it adds a
# training loss (weight 0.4), only CIRKD's DSD also reads its logits, and kdbench's models have no
# such head. ``fc.*``: the
# ImageNet classifier of a backbone file, which CIRKD's loader filters out too.
_DROP_RELEASED = re.compile(r"auxlayer\..+")
_DROP_BACKBONE = re.compile(r"fc\..+")



class _Pooling(ASPPPooling):
    """kdbench's image pooling, broadcast back with align_corners=True as CIRKD's _AsppPooling does
    (from a 1x1 map both modes give the same values; kept for fidelity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)


class CIRKDDeepLabV3(SegmentationModel):
    """kdbench's DeepLabV3 (``plus=False``) with CIRKD's head details; same features, same interface."""

    def __init__(self, backbone: nn.Module, low_index: int, num_classes: int, output_stride: int, **kw) -> None:
        super().__init__(backbone, low_index, num_classes, output_stride, plus=False, **kw)
        self.arch = ARCH
        old = self.aspp.convs[4]
        self.aspp.convs[4] = _Pooling(old.conv[0].in_channels, old.conv[0].out_channels)
        self.aspp.project[1] = nn.Dropout(PROJECT_DROPOUT)
        for head in (self.aspp, self.decoder, self.classifier):  # undo kdbench's He init
            for m in head.modules():
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                    m.reset_parameters()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        high = self._tap("backbone", feats[-1])
        enc = self._tap("encoder", self.aspp(high))
        dec = self._tap("decoder", self.decoder(enc))
        logits = self.classifier(dec)
        out = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return {"out": out, "logits": logits, "low": feats[self.low_index], "backbone": high, "encoder": enc, "decoder": dec}


def _timm_backbone(backbone: str, output_stride: int) -> nn.Module:
    return timm.create_model(
        backbone,
        features_only=True,
        output_stride=output_stride,
        stem_type="deep",
        stem_width=STEM_WIDTH,
        zero_init_last=False,
    )


def create(
    backbone: str,
    num_classes: int,
    *,
    output_stride: int = 8,
    pretrained: bool | str = False,
    aspp_channels: int = 512,
    decoder_channels: int = 512,
    low_channels: int = 48,
    attention_taps: tuple[str, ...] = (),
) -> nn.Module:
    """CIRKD's DeepLabV3 on timm's ``backbone`` (resnet18 / resnet50 / resnet101) with the v1s deep stem.

    ``pretrained``: False (random init, CIRKD's), or a local ImageNet backbone file, either CIRKD's
    own v1s layout (resnet18-imagenet.pth, resnet101-imagenet.pth) or timm's keys; checked key by
    key. ``low_channels`` is accepted for kdbench's interface; DeepLabV3 has no low-level branch.
    """
    if backbone not in BACKBONES:
        raise UserError(f"backbone: CIRKD's DeepLabV3 uses ResNet v1s backbones; choose one of {', '.join(BACKBONES)}, got {backbone!r}")
    check_model_args(output_stride, tuple(attention_taps), pretrained)  # CIRKD's is 8
    if pretrained is True:
        raise UserError(
            f"pretrained: timm has no ImageNet weights for {backbone} with CIRKD's 64-64-128 deep stem; "
            f"give the path of CIRKD's ImageNet file (e.g. {backbone}-imagenet.pth)"
        )
    net = _timm_backbone(backbone, output_stride)
    if pretrained:
        from kdbench.models import _load_backbone_weights  # here, not at the top: kdbench.models imports this module

        _load_backbone_weights(net, pretrained, _timm_layout)
    reductions = net.feature_info.reduction()  # [2, 4, 8, 8, 8]: the stem, then layer1..4
    low_index = len(reductions) - 1 - reductions[::-1].index(4)
    return CIRKDDeepLabV3(
        net,
        low_index,
        num_classes,
        output_stride,
        aspp_channels=aspp_channels,
        decoder_channels=decoder_channels,
        low_channels=low_channels,
        attention_taps=tuple(attention_taps),
    )


def _timm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A backbone file in timm's keys as it is; one in CIRKD's v1s layout renamed."""
    return state if "conv1.0.weight" in state else from_released_backbone(state)


def _rename(state: dict[str, torch.Tensor], rules, drop: re.Pattern, what: str) -> dict[str, torch.Tensor]:
    out, left = {}, []
    for key, value in state.items():
        for pattern, repl in rules:
            if m := re.fullmatch(pattern, key):
                out[m.expand(repl)] = value
                break
        else:
            if not drop.fullmatch(key):
                left.append(key)
    if left:
        raise UserError(f"{what}: {len(left)} keys match nothing in CIRKD's layout, e.g. {left[:3]} (not a CIRKD v1s DeepLabV3 file?)")
    return out


def _depth(state: dict[str, torch.Tensor], prefix: str, what: str) -> str:
    """The timm ResNet name whose block layout the state's ``layerN.i.*`` keys describe."""
    blocks, bottleneck = resnet_layout(state, prefix)
    kind = "bottleneck" if bottleneck else "basic"
    name = RESNETS.get((blocks, bottleneck))
    if name is None:
        raise UserError(f"{what}: blocks per stage {list(blocks)} ({kind}) are no ResNet CIRKD uses")
    return name


def _check(mapped: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Every reference key present with its shape, nothing extra (``released.compare``)."""
    missing, extra, wrong_keys = compare(mapped, ref)
    wrong = [f"{k} {list(mapped[k].shape)} != {list(ref[k].shape)}" for k in wrong_keys]
    if missing or extra or wrong:
        parts = [f"{name} {keys[:3]}" for name, keys in (("missing", missing), ("extra", extra), ("mis-shaped", wrong)) if keys]
        raise UserError(f"{what}: does not fit ({len(missing)} missing, {len(extra)} extra, {len(wrong)} mis-shaped): {'; '.join(parts)}")
    return {k: mapped[k] for k in ref}


def from_released_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CIRKD's ImageNet v1s backbone file (``resnetv1b.py`` keys: conv1..3/bn1..3 stem, layer1..4,
    maybe ``fc.*``) -> the keys of ``create(...).backbone`` (timm features_only, deep stem)."""
    what = "CIRKD backbone file"
    mapped = _rename(state, _STEM, _DROP_BACKBONE, what)
    name = _depth(state, "", what)
    with torch.device("meta"):
        ref = _timm_backbone(name, 8).state_dict()
    return _check(mapped, ref, what)


def from_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released CIRKD DeepLabV3 checkpoint (``*_best_model.pth`` state_dict, ``module.`` already
    stripped) -> the keys of ``create(...)`` without attention taps. ``auxlayer.*`` is dropped."""
    what = "CIRKD DeepLabV3 checkpoint"
    rules = tuple((rf"pretrained\.{p}", rf"backbone.{r}") for p, r in _STEM) + _HEAD
    mapped = _rename(state, rules, _DROP_RELEASED, what)
    for key in ("head.aspp.b0.0.weight", "head.block.0.weight", "head.block.4.weight"):
        if key not in state:
            raise UserError(f"{what}: missing {key!r} (not a CIRKD DeepLabV3 file?)")
    name = _depth(state, "pretrained.", what)
    aspp, dec, classes = (state[k].shape[0] for k in ("head.aspp.b0.0.weight", "head.block.0.weight", "head.block.4.weight"))
    with torch.device("meta"):
        ref = create(name, classes, aspp_channels=aspp, decoder_channels=dec).state_dict()
    return _check(mapped, ref, what)


__all__ = ["ARCH", "BACKBONES", "CIRKDDeepLabV3", "create", "from_released", "from_released_backbone"]
