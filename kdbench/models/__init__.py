"""Segmentation models: ``create_model`` builds DeepLabV3+ / DeepLabV3 on any timm backbone."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from kdbench.errors import UserError
from kdbench.models.cbam import CBAM
from kdbench.models.deeplab import SegmentationModel

FEATURE_NAMES = ("low", "backbone", "encoder", "decoder", "logits")
ARCHS = ("deeplabv3plus", "deeplabv3")


def _load_backbone_weights(backbone: torch.nn.Module, path: str) -> None:
    """timm's features_only loading is non-strict (a mismatch only warns): check every key here."""
    p = Path(path).expanduser()
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"pretrained: cannot read weights file {p} ({type(err).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    ref = backbone.state_dict()
    missing = [k for k in ref if k not in state]
    wrong = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or wrong:
        raise UserError(
            f"pretrained: {p} does not fit the backbone ({len(missing)} missing, {len(wrong)} mis-shaped keys, "
            f"e.g. {(missing or wrong)[:3]})"
        )
    backbone.load_state_dict({k: state[k] for k in ref})


def create_model(
    arch: str,
    backbone: str,
    num_classes: int,
    *,
    output_stride: int = 16,
    pretrained: bool | str = False,
    aspp_channels: int = 256,
    decoder_channels: int = 256,
    low_channels: int = 48,
    attention_taps: tuple[str, ...] = (),
) -> SegmentationModel:
    """A segmentation model whose forward returns ``out`` plus the named features FEATURE_NAMES."""
    if arch not in ARCHS:
        raise UserError(f"arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if output_stride not in (8, 16):
        raise UserError(f"output_stride: must be 8 or 16, got {output_stride}")
    if not timm.is_model(backbone):
        raise UserError(f"backbone: timm has no model {backbone!r} (see timm.list_models('resnet*'))")
    try:
        net = timm.create_model(backbone, features_only=True, output_stride=output_stride, pretrained=pretrained is True)
    except Exception as err:
        raise UserError(f"backbone: timm cannot build {backbone!r} with features_only, output_stride={output_stride} ({err})") from None
    reductions = net.feature_info.reduction()
    if 4 not in reductions:
        raise UserError(f"backbone: {backbone!r} has no stage at stride 4 for the low-level feature (strides: {reductions})")
    if isinstance(pretrained, str):
        _load_backbone_weights(net, pretrained)
    return SegmentationModel(
        net,
        reductions.index(4),
        num_classes,
        output_stride,
        plus=arch == "deeplabv3plus",
        aspp_channels=aspp_channels,
        decoder_channels=decoder_channels,
        low_channels=low_channels,
        attention_taps=tuple(attention_taps),
    )


__all__ = ["CBAM", "FEATURE_NAMES", "SegmentationModel", "create_model"]
