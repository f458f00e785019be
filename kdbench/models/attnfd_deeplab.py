"""DeepLabV3+ exactly as AttnFD's released code defines it, on a timm ResNet.

Reproduces ``DeepLab`` of github.com/AmirMansurian/AttnFD at commit
f090bbe02dead3fe453ad6aa3c5c085cde16c933 (files modeling/deeplab.py, modeling/aspp.py,
modeling/decoder.py, modeling/backbone/resnet.py, cbam.py; the distilled features are read off
``extract_feature`` there and distiller.py), a descendant of jfzhang95/pytorch-deeplab-xception via
clovaai/overhaul-distillation. Same parameters (``from_released`` renames a released state_dict onto
this module's), same forward; 21 classes at output stride 16: ResNet-18 16,658,721 and ResNet-101
59,888,001 parameters, the three CBAMs included.

Differences from kdbench's plain ``deeplabv3plus`` (kdbench.models.deeplab):

- backbone: stage outputs before the final ReLU (overhaul-distillation's blocks apply the ReLU at
  the start of the next block instead); the decoder gets ReLU(layer1) (the ``low`` feature), the
  ASPP ReLU(layer4), and the ``backbone`` feature is the pre-ReLU layer4. Dilated stages dilate their first block too, and
  ResNets with bottleneck blocks use multi-grid (1, 2, 4) in layer4 (dilations 2, 4, 8 at output
  stride 16); ResNet-18/34 do not (dilation 2 in every layer4 conv). timm gives the first block of a
  dilated stage the previous stage's dilation; here every 3x3 conv is set to the released rate.
- ASPP: dropout 0.5 after the projection (not 0.1); the ``encoder`` feature is taken before it.
- decoder: two 3x3 conv-BN-ReLU with dropout 0.5 between them and dropout 0.1 before the
  classifier (kdbench: one 3x3 conv); the ``decoder`` feature is the second conv's output (after its
  ReLU, before the dropout).
- all upsampling uses align_corners=True.
- CBAMs (``attention_taps``) are side branches, as in the release: the prediction never passes
  through them; a tapped feature in the output dict is CBAM(feature) (what distiller.py distils),
  an untapped one the raw feature. kdbench's plain model instead feeds the refined map onward.
  The released CBAM has Linear channel-MLP layers (kdbench's CBAM uses 1x1 convs: other weight
  shapes) and a spatial BatchNorm with momentum 0.01, hence ``ReleasedCBAM`` below.
- the released train.py trains through ``forward``, which never calls the CBAMs: a teacher trained
  by it keeps its CBAMs at their initial values (weights and BN statistics) in its checkpoint. The
  released train_kd.py runs both nets through ``extract_feature``, which skips the ASPP dropout: set
  ``model.kd_path = True`` for that.
- ``pretrained=True`` loads timm's ``<resnet>.tv_in1k`` (torchvision's ImageNet weights, which the
  released code loads) unless the name carries a tag.
- init as released: He-normal convs (fan-out in the backbone, fan-in in the head), BN weight 1
  (no zero-init of the last BN in a block), PyTorch's default for the classifier bias and CBAM MLPs.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck
from torch import nn

from kdbench.errors import UserError
from kdbench.models.cbam import CBAM, ChannelGate, channel_descriptors
from kdbench.models.deeplab import TAPS, ASPPPooling, _init_head, check_model_args, conv_bn_relu
from kdbench.models.released import RESNETS, compare, resnet_layout

ARCH = "deeplabv3plus_attnfd"
STAGE_DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}
MULTI_GRID = (1, 2, 4)  # layer4 of bottleneck ResNets (``_make_MG_unit``)


class ReleasedChannelGate(ChannelGate):
    """kdbench's channel gate with the released layout: mlp = Flatten, Linear, ReLU, Linear."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__(channels, reduction)
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        avg, mx = channel_descriptors(x)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))[:, :, None, None]


class ReleasedCBAM(CBAM):
    """kdbench's CBAM (same gates, same maps) with the released parameter layout and BN momentum 0.01."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__(channels, reduction)
        self.channel_gate = ReleasedChannelGate(channels, reduction)
        self.spatial_gate.bn.momentum = 0.01


class ReleasedASPP(nn.Module):
    """1x1, three atrous 3x3 and image-pooling branches, then 1x1 conv-BN-ReLU (dropout: the model's)."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        # ASPPPooling upsamples a 1x1 map: align_corners makes no difference there
        branches = [conv_bn_relu(cin, cout)] + [conv_bn_relu(cin, cout, 3, r) for r in rates] + [ASPPPooling(cin, cout)]
        self.convs = nn.ModuleList(branches)
        self.project = conv_bn_relu(5 * cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.convs], dim=1))


def _relu_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Forward pre-hook: the released block's leading ReLU, for the pre-ReLU output of the stage before."""
    return (F.relu(args[0]), *args[1:])


def released_dilations(net: nn.Module, output_stride: int) -> None:
    """Set every 3x3 conv of a timm ResNet to the released dilation (padding = dilation)."""
    for i, rate in enumerate(STAGE_DILATIONS[output_stride]):
        for j, block in enumerate(getattr(net, f"layer{i + 1}")):
            if isinstance(block, Bottleneck):
                convs, d = [block.conv2], rate * (MULTI_GRID[j] if i == 3 else 1)
            else:
                convs, d = [block.conv1, block.conv2], rate
            for conv in convs:
                conv.dilation, conv.padding = (d, d), (d, d)


def pre_relu_stages(net: nn.Module) -> None:
    """Make a timm ResNet's stages return their output before the final ReLU, which moves to the
    start of the next stage (overhaul-distillation's blocks); the computation is otherwise the same."""
    for i in range(1, 5):
        layer = getattr(net, f"layer{i}")
        if isinstance(layer[-1], Bottleneck):
            layer[-1].act3 = nn.Identity()
        else:
            layer[-1].act2 = nn.Identity()
        if i > 1:
            layer.register_forward_pre_hook(_relu_input)


class AttnFDDeepLab(nn.Module):
    """Released AttnFD DeepLabV3+: same interface as kdbench's SegmentationModel (see the module doc)."""

    arch = ARCH
    plus = True
    low_index = 0

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        output_stride: int,
        aspp_channels: int,
        decoder_channels: int,
        low_channels: int,
        attention_taps: tuple[str, ...],
    ) -> None:
        super().__init__()
        low_c, high_c = backbone.feature_info.channels()
        self.backbone = backbone
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.kd_path = False  # True: no ASPP dropout, like the released extract_feature (train_kd.py)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ReleasedASPP(high_c, aspp_channels, rates)
        self.aspp_dropout = nn.Dropout(0.5)
        self.project = conv_bn_relu(low_c, low_channels)
        self.decoder = nn.Sequential(
            conv_bn_relu(aspp_channels + low_channels, decoder_channels, 3),
            nn.Dropout(0.5),
            conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.decoder_dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        for head in (self.aspp, self.project, self.decoder, self.classifier):
            _init_head(head)
        self.feature_channels = {
            "low": low_c,
            "backbone": high_c,
            "encoder": aspp_channels,
            "decoder": decoder_channels,
            "logits": num_classes,
        }
        self.attention_taps = tuple(attention_taps)
        self.attention = nn.ModuleDict({t: ReleasedCBAM(self.feature_channels[t]) for t in self.attention_taps})
        for tap, cbam in self.attention.items():  # the backbone's CBAM gets the backbone's init (fan-out)
            nn.init.kaiming_normal_(cbam.spatial_gate.conv.weight, mode="fan_out" if tap == "backbone" else "fan_in")

    def _tap(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A side branch, as released: the refined map is returned, the raw one flows on."""
        return self.attention[name](x) if name in self.attention else x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        stage1, stage4 = self.backbone(x)  # both before their final ReLU
        low = F.relu(stage1)
        enc = self.aspp(F.relu(stage4))
        up = enc if self.kd_path else self.aspp_dropout(enc)
        skip = self.project(low)
        up = F.interpolate(up, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        dec = self.decoder(torch.cat([up, skip], dim=1))
        logits = self.classifier(self.decoder_dropout(dec))
        out = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return {
            "out": out,
            "logits": logits,
            "low": low,
            "backbone": self._tap("backbone", stage4),
            "encoder": self._tap("encoder", enc),
            "decoder": self._tap("decoder", dec),
        }

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head): the head, CBAMs included, usually learns faster (train.head_lr_mult)."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]


def create(
    backbone: str,
    num_classes: int,
    *,
    output_stride: int = 16,
    pretrained: bool | str = False,
    aspp_channels: int = 256,
    decoder_channels: int = 256,
    low_channels: int = 48,
    attention_taps: tuple[str, ...] = TAPS,
) -> nn.Module:
    """The released AttnFD DeepLabV3+ on a timm ResNet (resnet18 and resnet101 are the released ones).

    ``pretrained``: False (random init), True (timm's torchvision ImageNet weights, needs network) or
    a local backbone state_dict file, checked key by key.
    """
    from kdbench.models import _first_line, _load_backbone_weights  # lazy: kdbench.models may import this module

    check_model_args(output_stride, tuple(attention_taps), pretrained)  # STAGE_DILATIONS has 8 and 16
    if backbone.split(".")[0] not in RESNETS.values() or not timm.is_model(backbone):
        raise UserError(f"backbone: {ARCH} needs a plain timm ResNet ({', '.join(RESNETS.values())}), got {backbone!r}")
    name = backbone if "." in backbone or pretrained is not True else f"{backbone}.tv_in1k"
    try:
        net = timm.create_model(
            name,
            features_only=True,
            out_indices=(1, 4),
            output_stride=output_stride,
            pretrained=pretrained is True,
            zero_init_last=False,
        )
    except Exception as err:  # noqa: BLE001  (timm raises many kinds: one line for the user)
        why = "building it or fetching its weights (needs network; or give a local file)" if pretrained is True else "building it"
        raise UserError(f"backbone: timm failed {why}: {name!r}: {_first_line(err)}") from None
    if not isinstance(pretrained, bool):
        _load_backbone_weights(net, pretrained)
    released_dilations(net, output_stride)
    pre_relu_stages(net)
    return AttnFDDeepLab(net, num_classes, output_stride, aspp_channels, decoder_channels, low_channels, tuple(attention_taps))


# (released key prefix, this module's key prefix), first match wins in either direction
RENAMES = [
    ("backbone.cbam.ChannelGate.mlp.", "attention.backbone.channel_gate.mlp."),
    ("backbone.cbam.SpatialGate.spatial.", "attention.backbone.spatial_gate."),
    ("aspp.cbam.ChannelGate.mlp.", "attention.encoder.channel_gate.mlp."),
    ("aspp.cbam.SpatialGate.spatial.", "attention.encoder.spatial_gate."),
    ("decoder.cbam.ChannelGate.mlp.", "attention.decoder.channel_gate.mlp."),
    ("decoder.cbam.SpatialGate.spatial.", "attention.decoder.spatial_gate."),
    ("backbone.", "backbone."),  # the released ResNet's names are timm's
    ("aspp.aspp1.atrous_conv.", "aspp.convs.0.0."),
    ("aspp.aspp1.bn.", "aspp.convs.0.1."),
    ("aspp.aspp2.atrous_conv.", "aspp.convs.1.0."),
    ("aspp.aspp2.bn.", "aspp.convs.1.1."),
    ("aspp.aspp3.atrous_conv.", "aspp.convs.2.0."),
    ("aspp.aspp3.bn.", "aspp.convs.2.1."),
    ("aspp.aspp4.atrous_conv.", "aspp.convs.3.0."),
    ("aspp.aspp4.bn.", "aspp.convs.3.1."),
    ("aspp.global_avg_pool.1.", "aspp.convs.4.conv.0."),
    ("aspp.global_avg_pool.2.", "aspp.convs.4.conv.1."),
    ("aspp.conv1.", "aspp.project.0."),
    ("aspp.bn1.", "aspp.project.1."),
    ("decoder.conv1.", "project.0."),
    ("decoder.bn1.", "project.1."),
    ("decoder.last_conv.0.", "decoder.0.0."),
    ("decoder.last_conv.1.", "decoder.0.1."),
    ("decoder.last_conv.4.", "decoder.2.0."),
    ("decoder.last_conv.5.", "decoder.2.1."),
    ("decoder.last_conv.8.", "classifier."),
]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _released_name(key: str) -> str:
    return _rename(key, [(new, old) for old, new in RENAMES]) or key


def _skeleton(state: dict[str, torch.Tensor]) -> nn.Module:
    """The variant the mapped state describes (ResNet depth, classes, widths), built on the meta device."""
    blocks, bottleneck = resnet_layout(state, "backbone.")
    arch = RESNETS.get((blocks, bottleneck))
    if arch is None:
        raise UserError(
            f"released AttnFD checkpoint: its backbone ({list(blocks)} {'bottleneck' if bottleneck else 'basic'} blocks) is no ResNet"
        )
    widths = ("classifier.weight", "aspp.project.0.weight", "project.0.weight", "decoder.2.0.weight")
    if any(k not in state for k in widths):
        raise UserError(f"released AttnFD checkpoint: missing keys: {[_released_name(k) for k in widths if k not in state]}")
    shapes = {k: state[k].shape[0] for k in widths}
    with torch.device("meta"):
        return create(
            arch,
            shapes["classifier.weight"],
            aspp_channels=shapes["aspp.project.0.weight"],
            decoder_channels=shapes["decoder.2.0.weight"],
            low_channels=shapes["project.0.weight"],
        )


def from_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released AttnFD DeepLab state_dict (``checkpoint['state_dict']``, no ``module.`` prefix) in this
    module's key names, checked: every key mapped, none missing, every shape as the variant's.

    A missing BatchNorm ``num_batches_tracked`` is filled with 0 (many published files drop it).
    """
    unknown = [key for key in state if _rename(key, RENAMES) is None]
    if unknown:
        raise UserError(f"released AttnFD checkpoint: {len(unknown)} keys match no released DeepLab parameter: {unknown[:3]}")
    mapped = {_rename(key, RENAMES): value for key, value in state.items()}
    ref = _skeleton(mapped).state_dict()
    missing, unexpected, wrong = compare(mapped, ref)
    problems = {
        "unexpected": [_released_name(k) for k in unexpected],
        "missing": [_released_name(k) for k in missing],
        "mis-shaped": [f"{_released_name(k)} {list(mapped[k].shape)} (expected {list(ref[k].shape)})" for k in wrong],
    }
    for what, keys in problems.items():
        if keys:
            raise UserError(f"released AttnFD checkpoint: {len(keys)} {what} keys: {keys[:3]}")
    return mapped
