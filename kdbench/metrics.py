"""Segmentation metrics from one confusion matrix accumulated over a whole split."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted; ignored pixels skipped."""
    # scatter-add into an extra bin for ignored pixels instead of boolean indexing and bincount,
    # which must wait for the GPU to learn their output sizes
    k2 = num_classes * num_classes
    idx = torch.where(target != ignore_index, target.long() * num_classes + pred.long(), k2).reshape(-1)
    counts = torch.zeros(k2 + 1, dtype=torch.long, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
    return counts[:k2].reshape(num_classes, num_classes)


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
