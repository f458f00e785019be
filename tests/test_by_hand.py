"""Loss values and updates checked against numbers worked out by hand (plain ``math`` on tiny
tensors, never the code under test): the adversarial wiring (the student's generator term and the
discriminator's own step, hinge and WGAN-GP with its gradient penalty) and every temperature-scaled
loss at T != 1 with non-uniform student and teacher logits (a uniform student hides a missing / T)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdbench.methods.base import FeatureSpec
from kdbench.methods.cwd import CWD, cwd_loss
from kdbench.methods.ifvd import IFVD
from kdbench.methods.kd import KD, kd_loss
from kdbench.methods.skd import SKD, soft_cross_entropy
from kdbench.runtime import Runtime

# ---------------------------------------------------------------------------------------------
# plain-Python helpers: the formulas of the papers, one list of numbers at a time


def softmax(xs: list[float], temperature: float) -> list[float]:
    e = [math.exp(x / temperature) for x in xs]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def cross_entropy(p: list[float], q: list[float]) -> float:
    return -sum(a * math.log(b) for a, b in zip(p, q))


def columns(m: list[list[float]]) -> list[list[float]]:
    return [list(c) for c in zip(*m)]


def tensor(rows: list[list[float]]) -> torch.Tensor:
    """rows[c][i] -> a 1 x C x 1 x N map (channel c, position i)."""
    return torch.tensor(rows, dtype=torch.float64).reshape(1, len(rows), 1, len(rows[0]))


# 2 classes x 2 pixels, every value different: rows are channels (classes), columns pixels
S = [[1.0, 0.5], [-0.5, 1.5]]
T = [[2.0, -1.0], [0.0, 1.0]]


def kd_by_hand(s, t, temp):
    """T^2 * mean over pixels of KL(softmax over classes of t/T || same of s/T)."""
    pix = [kl(softmax(tc, temp), softmax(sc, temp)) for sc, tc in zip(columns(s), columns(t))]
    return temp**2 * sum(pix) / len(pix)


def cwd_by_hand(s, t, temp):
    """T^2 * mean over channels of KL(softmax over positions of t/T || same of s/T) (one image)."""
    per_channel = [kl(softmax(tc, temp), softmax(sc, temp)) for sc, tc in zip(s, t)]
    return temp**2 * sum(per_channel) / len(per_channel)


def ce_by_hand(s, t, temp):
    pix = [cross_entropy(softmax(tc, temp), softmax(sc, temp)) for sc, tc in zip(columns(s), columns(t))]
    return temp**2 * sum(pix) / len(pix)


# ---------------------------------------------------------------------------------------------
# temperature-scaled losses, T != 1


def test_kd_loss_at_temperature_by_hand():
    """Student and teacher both divided by T: a missing / T on either side changes the value."""
    # two classes: p_0 = sigmoid((z_0 - z_1) / T). Pixel 0: p_t0 = sigmoid(1), p_s0 = sigmoid(.75);
    # pixel 1: p_t0 = sigmoid(-1), p_s0 = sigmoid(-.5). 4 * mean of the two KLs = 0.065437...
    expected = kd_by_hand(S, T, 2.0)
    assert kd_loss(tensor(S), tensor(T), temperature=2.0).item() == pytest.approx(expected, rel=1e-9)
    assert kd_loss(tensor(S), tensor(T), temperature=3.0).item() == pytest.approx(kd_by_hand(S, T, 3.0), rel=1e-9)
    assert expected == pytest.approx(0.0654371, abs=1e-7)  # the helper agrees with the sigmoid form


def test_cwd_loss_at_temperature_by_hand():
    """The softmax runs over positions of each channel, both maps over T."""
    expected = cwd_by_hand(S, T, 2.0)
    assert cwd_loss(tensor(S), tensor(T), temperature=2.0).item() == pytest.approx(expected, rel=1e-9)
    assert cwd_loss(tensor(S), tensor(T), temperature=4.0).item() == pytest.approx(cwd_by_hand(S, T, 4.0), rel=1e-9)


def test_soft_cross_entropy_at_temperature_by_hand():
    """SKD code's pixel term: T^2 * mean -sum p_t log p_s, both over T."""
    expected = ce_by_hand(S, T, 2.0)
    assert soft_cross_entropy(tensor(S), tensor(T), temperature=2.0).item() == pytest.approx(expected, rel=1e-9)


def _spec(channels: int = 2) -> FeatureSpec:
    return FeatureSpec({"low": channels, "backbone": channels, "encoder": channels, "decoder": channels}, 2)


def _outputs(s, t, fs=None, ft=None):
    student, teacher = {"logits": tensor(s), "out": tensor(s)}, {"logits": tensor(t), "out": tensor(t)}
    if fs is not None:
        student["decoder"], teacher["decoder"] = tensor(fs), tensor(ft)
    return student, teacher, torch.zeros(1, 1, 2, dtype=torch.long)


def test_kd_method_passes_its_temperature():
    method = KD(KD.Config(weight=0.5, temperature=2.5), _spec(), _spec())
    terms = method(*_outputs(S, T))
    assert terms["kd"].item() == pytest.approx(0.5 * kd_by_hand(S, T, 2.5), rel=1e-9)


def test_cwd_method_passes_each_temperature():
    """Logit term at T = 2, feature term at T = 4 (equal channels: no connector), pixel KD at T = 3."""
    fs, ft = [[0.3, -0.7], [1.5, 0.2]], [[-0.4, 0.9], [0.8, 2.1]]
    cfg = CWD.Config(weight=3.0, temperature=2.0, feature_weight=50.0, feature_temperature=4.0, kd_weight=1.5, kd_temperature=3.0)
    method = CWD(cfg, _spec(), _spec())
    assert method.connector is None
    terms = method(*_outputs(S, T, fs, ft))
    assert terms["cwd_logits"].item() == pytest.approx(3.0 * cwd_by_hand(S, T, 2.0), rel=1e-9)
    assert terms["cwd_decoder"].item() == pytest.approx(50.0 * cwd_by_hand(fs, ft, 4.0), rel=1e-9)
    assert terms["kd"].item() == pytest.approx(1.5 * kd_by_hand(S, T, 3.0), rel=1e-9)


@pytest.mark.parametrize("pixel_loss", ["kl", "ce"])
def test_skd_pixel_term_passes_its_temperature(pixel_loss):
    cfg = SKD.Config(pixel_weight=10.0, pixel_temperature=2.0, pixel_loss=pixel_loss, pair_weight=0.0, adv_weight=0.0)
    terms = SKD(cfg, _spec(), _spec())(*_outputs(S, T))
    hand = kd_by_hand if pixel_loss == "kl" else ce_by_hand
    assert set(terms) == {"kd"}
    assert terms["kd"].item() == pytest.approx(10.0 * hand(S, T, 2.0), rel=1e-9)


@pytest.mark.parametrize("reduction, divisor", [("pixel", 1), ("element", 2)])
def test_ifvd_kd_term_passes_its_temperature(reduction, divisor):
    """``element`` also divides by the number of classes (2 here)."""
    cfg = IFVD.Config(weight=0.0, kd_weight=10.0, kd_temperature=2.0, kd_reduction=reduction, adv_weight=0.0)
    terms = IFVD(cfg, _spec(), _spec())(*_outputs(S, T))
    assert set(terms) == {"kd"}
    assert terms["kd"].item() == pytest.approx(10.0 * kd_by_hand(S, T, 2.0) / divisor, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# the adversarial term through the Method: a linear discriminator with known weights

W, BIAS = (0.5, -1.0), 0.25  # D(z) at a pixel = 0.5 z_0 - 1.0 z_1 + 0.25 (a 1x1 convolution)
# two images of 1 x 2 pixels, 2 classes; each entry is one pixel's (z_0, z_1)
Z_T = [[(2.0, 0.0), (1.0, 1.0)], [(0.0, -1.0), (3.0, 2.0)]]  # D: 1.25, -0.25, 1.25, -0.25
Z_S = [[(0.0, 1.0), (5.0, 0.0)], [(0.0, 0.5), (1.0, 3.0)]]  # D: -0.75, 2.75, -0.25, -2.25


def logit_map(images) -> torch.Tensor:
    """B x 2 x 1 x N from images[b][i] = (z_0, z_1)."""
    return torch.tensor([[[[px[c] for px in img]] for c in (0, 1)] for img in images], dtype=torch.float64)


def score(px) -> float:
    return W[0] * px[0] + W[1] * px[1] + BIAS


def pixels(images):
    return [px for img in images for px in img]


def adversarial_skd(preset: str) -> SKD:
    """SKD at ``preset`` with only its adversarial term, its discriminator swapped for the linear one
    before the optimizer over it is made."""
    cfg = SKD.Config(**{**SKD.presets[preset], "pixel_weight": 0.0, "pair_weight": 0.0, "adv_width": 1})  # D is replaced
    method = SKD(cfg, _spec(), _spec())
    disc = nn.Conv2d(2, 1, 1).double()
    with torch.no_grad():
        disc.weight.copy_(torch.tensor(W, dtype=torch.float64).reshape(1, 2, 1, 1))
        disc.bias.fill_(BIAS)
    method.adversary.discriminator = disc
    method.train()
    return method


@pytest.mark.parametrize("preset", ["cirkd", "paper"])
def test_generator_term_by_hand(preset):
    """L_adv = lambda_adv * -mean D(z_s): its value, and its gradient on the student's logits
    (-lambda_adv * w / N per pixel: pushes D(z_s) up), with none left on D."""
    method = adversarial_skd(preset)
    lam = method.cfg.adv_weight
    z_s = logit_map(Z_S).requires_grad_(True)
    terms = method({"logits": z_s}, {"logits": logit_map(Z_T)}, torch.zeros(2, 1, 2, dtype=torch.long))
    d_s = [score(px) for px in pixels(Z_S)]
    assert d_s == [-0.75, 2.75, -0.25, -2.25]
    assert set(terms) == {"adv"}
    assert terms["adv"].item() == pytest.approx(lam * -(sum(d_s) / 4), rel=1e-9)  # = lam * 0.125
    assert terms["adv"].item() > 0
    terms["adv"].backward()
    grad = torch.tensor([-lam * W[0] / 4, -lam * W[1] / 4], dtype=torch.float64).reshape(1, 2, 1, 1).expand(2, 2, 1, 2)
    assert torch.allclose(z_s.grad, grad, rtol=1e-9, atol=0)
    assert all(p.grad is None for p in method.adversary.discriminator.parameters())


def test_hinge_discriminator_step_by_hand():
    """CIRKD: L_D = lambda_d (mean relu(1 - D(z_t)) + mean relu(1 + D(z_s))), teacher "real"; its value,
    and the first Adam step (-lr * g / (|g| + eps) per weight) with the gradient worked out by hand."""
    method = adversarial_skd("cirkd")
    c = method.cfg
    assert c.adv_loss == "hinge" and c.adv_optimizer == "adam"
    d_t = [score(px) for px in pixels(Z_T)]
    d_s = [score(px) for px in pixels(Z_S)]
    real = [max(0.0, 1 - v) for v in d_t]  # 0, 1.25, 0, 1.25
    fake = [max(0.0, 1 + v) for v in d_s]  # .25, 3.75, .75, 0
    expected = c.adv_d_weight * (sum(real) / 4 + sum(fake) / 4)
    assert expected == pytest.approx(0.1 * (0.625 + 1.1875))
    # d/dw: -z over the teacher pixels inside the hinge, +z over the student pixels inside it, / N
    g_w = [
        c.adv_d_weight * (-sum(px[k] for px, v in zip(pixels(Z_T), d_t) if 1 - v > 0) + sum(px[k] for px, v in zip(pixels(Z_S), d_s) if 1 + v > 0)) / 4
        for k in (0, 1)
    ]
    g_b = c.adv_d_weight * (-sum(1 for v in d_t if 1 - v > 0) + sum(1 for v in d_s if 1 + v > 0)) / 4
    assert g_w == pytest.approx([0.1 * (-4 + 5) / 4, 0.1 * (-3 + 1.5) / 4]) and g_b == pytest.approx(0.1 * (-2 + 3) / 4)

    logged = method.own_step({"logits": logit_map(Z_S)}, {"logits": logit_map(Z_T)}, None, Runtime())
    assert logged["adv_disc"].item() == pytest.approx(expected, rel=1e-9)
    disc = method.adversary.discriminator
    step = [-c.adv_lr * g / (abs(g) + 1e-8) for g in (*g_w, g_b)]  # Adam's first step: m / sqrt(v) = g / |g|
    new = [disc.weight[0, 0].item(), disc.weight[0, 1].item(), disc.bias.item()]
    assert [n - o for n, o in zip(new, (*W, BIAS))] == pytest.approx(step, rel=1e-6, abs=1e-12)


def test_wgan_gp_discriminator_step_by_hand():
    """SKD paper: L_D = lambda_d (mean D(z_s) - mean D(z_t) + lambda_gp GP). For a linear D the gradient
    at every interpolate is w at each of the h*w pixels, so GP = (sqrt(h w) |w| - 1)^2 whatever the
    random mix. Checks the value and the first SGD step (momentum buffer = g + wd * w)."""
    method = adversarial_skd("paper")
    c = method.cfg
    assert c.adv_loss == "wgan-gp" and c.adv_optimizer == "sgd" and c.adv_gp_weight == 10.0
    mean_s = sum(score(px) for px in pixels(Z_S)) / 4  # -.125
    mean_t = sum(score(px) for px in pixels(Z_T)) / 4  # .5
    norm_w = math.sqrt(W[0] ** 2 + W[1] ** 2)
    grad_norm = math.sqrt(2) * norm_w  # 2 pixels per image
    gp = (grad_norm - 1) ** 2
    expected = c.adv_d_weight * (mean_s - mean_t + c.adv_gp_weight * gp)
    assert expected == pytest.approx(0.1 * (-0.625 + 10 * (math.sqrt(2.5) - 1) ** 2))

    # d/dw: mean z_s - mean z_t + lambda_gp * 2 (|g| - 1) * sqrt(hw) * w / |w|; the bias cancels
    mean_zs = [sum(px[k] for px in pixels(Z_S)) / 4 for k in (0, 1)]
    mean_zt = [sum(px[k] for px in pixels(Z_T)) / 4 for k in (0, 1)]
    g_w = [
        c.adv_d_weight * (mean_zs[k] - mean_zt[k] + c.adv_gp_weight * 2 * (grad_norm - 1) * math.sqrt(2) * W[k] / norm_w)
        for k in (0, 1)
    ]
    logged = method.own_step({"logits": logit_map(Z_S)}, {"logits": logit_map(Z_T)}, None, Runtime())
    assert logged["adv_disc"].item() == pytest.approx(expected, rel=1e-9)
    disc = method.adversary.discriminator
    delta_w = [disc.weight[0, k].item() - W[k] for k in (0, 1)]
    assert delta_w == pytest.approx([-c.adv_lr * (g + c.adv_weight_decay * w) for g, w in zip(g_w, W)], rel=1e-6)
    assert disc.bias.item() - BIAS == pytest.approx(-c.adv_lr * c.adv_weight_decay * BIAS, rel=1e-6)


def test_ce_batch_average_divides_the_task_loss_by_the_batch_size():
    # pytorch-deeplab-xception's SegmentationLosses(batch_average=True): the mean CE over pixels / n.
    # A 1x1-conv "model" with known logits: CE by hand on two pixels, batch of 2
    from kdbench.engine import build_state, update
    from kdbench.recipe import TrainConfig
    from kdbench.runtime import Runtime

    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):  # logits (0, log 3) at every pixel: p(class 1) = 3/4
            logits = torch.stack([torch.zeros_like(x[:, 0]), torch.full_like(x[:, 0], math.log(3))], 1)
            return {"out": logits + 0 * self.w}

        def param_groups(self):
            return [self.w], []

    images, target = torch.zeros(2, 1, 1, 1), torch.tensor([[[1]], [[0]]])
    by_hand = (-math.log(3 / 4) - math.log(1 / 4)) / 2  # mean over the two pixels
    for average, expected in ((False, by_hand), (True, by_hand / 2)):
        state = build_state(Fixed(), None, None, TrainConfig(iterations=1, batch_size=2, ce_batch_average=average), Runtime())
        assert math.isclose(float(update(state, images, target)["loss/task"]), expected, rel_tol=1e-6)
