"""Segmentation metrics from one confusion matrix accumulated over a whole split."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted; ignored pixels skipped."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegMetrics:
    miou: float
    pixel_acc: float
    iou: list[float]  # per class; NaN for a class absent from both prediction and truth

    @classmethod
    def from_confusion(cls, cm: torch.Tensor) -> "SegMetrics":
        cm = cm.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = tp / union  # 0/0 = NaN: the class never occurs, so it does not count
        present = union > 0
        miou = iou[present].mean().item() if present.any() else float("nan")
        acc = (tp.sum() / cm.sum().clamp(min=1)).item()
        return cls(miou=miou, pixel_acc=acc, iou=iou.tolist())
