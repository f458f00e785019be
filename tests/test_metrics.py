"""mIoU, pixel accuracy and per-class IoU against a confusion matrix worked out by hand."""

import math

import torch

from kdbench.metrics import SegMetrics, confusion_matrix


def test_confusion_matrix_and_miou_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 0]])
    cm = confusion_matrix(pred, target, num_classes=4)
    # rows = truth, columns = prediction; the ignored pixel (255) is not counted
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    m = SegMetrics.from_confusion(cm)
    # IoU0 = 1 / (2 + 1 - 1) = 0.5; IoU1 = 2 / (2 + 4 - 2) = 0.5; IoU2 = 0 / 1 = 0; class 3 never occurs
    assert m.iou[:3] == [0.5, 0.5, 0.0] and math.isnan(m.iou[3])
    assert math.isclose(m.miou, 1 / 3)
    assert math.isclose(m.pixel_acc, 3 / 5)


def test_confusion_matrices_add_up_over_a_split():
    a = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
    b = confusion_matrix(torch.tensor([1]), torch.tensor([1]), 2)
    m = SegMetrics.from_confusion(a + b)
    # IoU0 = 1 / (2 + 1 - 1) = 0.5, IoU1 = 1 / (1 + 2 - 1) = 0.5
    assert m.iou == [0.5, 0.5] and math.isclose(m.pixel_acc, 2 / 3)
