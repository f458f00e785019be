"""The KD loss against values computed by hand."""

import math

import pytest
import torch

from kdbench.methods.kd import kd_loss


def _pixels(*logit_pairs):
    """(1, 2, 1, n) logits: n pixels, 2 classes."""
    return torch.tensor(logit_pairs, dtype=torch.float64).T.reshape(1, 2, 1, len(logit_pairs))


def test_kd_by_hand():
    s = _pixels((0.0, 0.0))
    t = _pixels((math.log(3), 0.0))
    # p_t = (0.75, 0.25), p_s = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    assert kd_loss(s, t).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # T = 2: p_t = (√3, 1) / (√3 + 1); times T^2 = 4
    r3 = math.sqrt(3)
    pt = (r3 / (r3 + 1), 1 / (r3 + 1))
    expected = 4 * (pt[0] * math.log(pt[0] / 0.5) + pt[1] * math.log(pt[1] / 0.5))
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(expected)
    assert expected == pytest.approx(0.145363, abs=1e-6)


def test_kd_identical_is_zero_and_ignore_mask():
    t = _pixels((math.log(3), 0.0), (0.0, 0.0))
    s = _pixels((0.0, 0.0), (0.0, 0.0))
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-12)
    one = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    # mean over both pixels (the second one agrees exactly) ...
    assert kd_loss(s, t).item() == pytest.approx(one / 2)
    # ... or over labelled pixels only: the second pixel is ignore (255)
    target = torch.tensor([[[1, 255]]])
    assert kd_loss(s, t, target=target).item() == pytest.approx(one)
    # all pixels ignored: zero, not NaN
    assert kd_loss(s, t, target=torch.full((1, 1, 2), 255)).item() == 0.0
