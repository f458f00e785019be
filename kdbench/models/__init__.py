"""Segmentation models: ``create_model`` builds DeepLabV3+ / DeepLabV3 on any timm backbone, and the
released models of AttnFD and CIRKD exactly (``RELEASED``: one file each, with the key mapping of
their published checkpoints)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdbench.errors import UserError
from kdbench.models.cbam import CBAM
from kdbench.models.deeplab import SegmentationModel, check_model_args

FEATURE_NAMES = ("low", "backbone", "encoder", "decoder", "logits")
#: architectures that reproduce a released code's model definition (and read its checkpoints)
RELEASED = {
    "deeplabv3plus_attnfd": "kdbench.models.attnfd_deeplab",  # AmirMansurian/AttnFD's DeepLabV3+ with its CBAMs
    "deeplabv3_cirkd": "kdbench.models.cirkd_deeplab",  # winycg/CIRKD's DeepLabV3 on ResNet v1s
}
ARCHS = ("deeplabv3plus", "deeplabv3", *RELEASED)


def released_model(arch: str) -> Any:
    """The module of a released architecture: ``create``, ``from_released``."""
    return importlib.import_module(RELEASED[arch])


def from_released(arch: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint as the released code saved it, under ``arch``'s keys: unwrapped from a
    ``state_dict`` entry (AttnFD's ``*.pth.tar``), ``module.`` (DataParallel) stripped, renamed."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return released_model(arch).from_released(state)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"pretrained: weights file {path} not found (a backbone state_dict .pth/.safetensors, or true)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        from kdbench.checkpoint import load_error

        raise load_error("pretrained", path, err, "weights file ") from None
    for wrapper in ("state_dict", "model"):  # common training-checkpoint layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"pretrained: {path} is not a state_dict of tensors")
    return state


def _load_backbone_weights(
    backbone: torch.nn.Module, path: str | os.PathLike[str], adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
) -> None:
    """timm's features_only loading is non-strict (a mismatch only warns): check every key here.

    Extra keys (the classifier ``fc.*``, ``conv_head``) are fine; BatchNorm's ``num_batches_tracked``
    may be absent (many published checkpoints drop it). Anything else missing or mis-shaped is an error.
    """
    p = Path(path).expanduser()
    state = _read_state_dict(p)
    if adapt is not None:  # a file in a released code's own key layout (CIRKD's v1s), renamed to timm's
        try:
            state = adapt(state)
        except UserError as err:
            raise UserError(f"pretrained: {path}: {err}") from None
    ref = backbone.state_dict()
    missing = [k for k in ref if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else ""
        detail += ("; " if missing and wrong else "") + (f"mis-shaped {wrong[:3]}" if wrong else "")
        raise UserError(
            f"pretrained: {p} does not fit the backbone ({len(missing)} missing, {len(wrong)} mis-shaped keys: {detail})"
        )
    backbone.load_state_dict({k: state[k] for k in ref if k in state}, strict=False)


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def create_model(
    arch: str,
    backbone: str,
    num_classes: int,
    *,
    output_stride: int = 16,
    pretrained: bool | str | os.PathLike[str] = False,
    aspp_channels: int = 256,
    decoder_channels: int = 256,
    low_channels: int = 48,
    attention_taps: tuple[str, ...] = (),
) -> SegmentationModel:
    """DeepLabV3+ (AttnFD's setting) or DeepLabV3 (CIRKD's) on a timm ``features_only`` backbone.

    forward(x) returns one dict: ``out`` (logits at the input size) plus FEATURE_NAMES.
    ``pretrained``: False (random init), True (timm's weights, needs network) or a local backbone
    state_dict file (.pth / .safetensors), checked key by key.
    """
    if arch not in ARCHS:
        raise UserError(f"arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch in RELEASED:
        return released_model(arch).create(
            backbone,
            num_classes,
            output_stride=output_stride,
            pretrained=pretrained,
            aspp_channels=aspp_channels,
            decoder_channels=decoder_channels,
            low_channels=low_channels,
            attention_taps=tuple(attention_taps),
        )
    check_model_args(output_stride, tuple(attention_taps), pretrained)
    import timm  # here, not at the top: it imports torchvision and torch._dynamo (2-3 s), which the
    # commands that only read runs (table, plot) and import the methods (CBAM) need not pay

    if not timm.is_model(backbone):
        raise UserError(f"backbone: timm has no model {backbone!r} (see timm.list_models('resnet*'))")
    try:
        net = timm.create_model(backbone, features_only=True, output_stride=output_stride, pretrained=pretrained is True)
    except Exception as err:
        why = "building it or fetching its weights (needs network; or give a local file)" if pretrained is True else "building it"
        raise UserError(
            f"backbone: timm failed {why}: {backbone!r}, features_only, output_stride={output_stride}: {_first_line(err)}"
        ) from None
    # Taps by reduction, not index: families differ in level count (ConvNeXt has 4). With
    # output_stride 8 the later reductions are reported capped (8, 8, 8), so only 4 is unambiguous.
    reductions = net.feature_info.reduction()
    if 4 not in reductions:
        raise UserError(f"backbone: {backbone!r} has no stage at stride 4 for the low-level feature (strides: {reductions})")
    low_index = len(reductions) - 1 - reductions[::-1].index(4)  # the deepest stride-4 stage
    if not isinstance(pretrained, bool):
        _load_backbone_weights(net, pretrained)
    return SegmentationModel(
        net,
        low_index,
        num_classes,
        output_stride,
        plus=arch == "deeplabv3plus",
        aspp_channels=aspp_channels,
        decoder_channels=decoder_channels,
        low_channels=low_channels,
        attention_taps=tuple(attention_taps),
    )


def build_model(cfg: Any, num_classes: int, pretrained: bool | str | None = None) -> SegmentationModel:
    """The model a recipe's ``teacher`` or ``student`` section describes (``pretrained`` overrides it)."""
    model = create_model(
        cfg.arch,
        cfg.backbone,
        num_classes,
        output_stride=cfg.output_stride,
        pretrained=cfg.pretrained if pretrained is None else pretrained,
        aspp_channels=cfg.aspp_channels,
        decoder_channels=cfg.decoder_channels,
        low_channels=cfg.low_channels,
        attention_taps=tuple(cfg.attention_taps),
    )
    if not cfg.aspp_dropout:
        model.kd_path = True  # deeplabv3plus_attnfd (checked at recipe load)
    return model


__all__ = ["ARCHS", "CBAM", "FEATURE_NAMES", "RELEASED", "SegmentationModel", "build_model", "create_model", "from_released"]
