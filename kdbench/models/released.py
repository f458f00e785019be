"""What reading the released checkpoints of AttnFD and CIRKD shares: which timm ResNet a state_dict's
block layout describes, and the comparison of renamed weights with the model they must fill."""

from __future__ import annotations

import re

import torch

#: (blocks per stage, bottleneck blocks) -> the timm ResNet with that layout
RESNETS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


def resnet_layout(state: dict[str, torch.Tensor], prefix: str = "") -> tuple[tuple[int, ...], bool]:
    """(blocks per stage, bottleneck?) of the ``{prefix}layerN.i.*`` keys; ``RESNETS`` names it."""
    p = re.escape(prefix)
    blocks = []
    for i in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"{p}layer{i}\.(\d+)\.", k))}
        blocks.append(max(ids) + 1 if ids else 0)
    return tuple(blocks), any(re.match(rf"{p}layer\d\.\d+\.conv3\.", k) for k in state)


def compare(mapped: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``mapped`` against the reference state_dict. A
    BatchNorm ``num_batches_tracked`` the file lacks is set to 0 first (many published files drop
    it; it only counts updates)."""
    for key in ref:
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in ref if k not in mapped]
    unexpected = [k for k in mapped if k not in ref]
    wrong = [k for k in ref if k in mapped and mapped[k].shape != ref[k].shape]
    return missing, unexpected, wrong
