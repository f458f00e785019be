"""CWD, SKD, IFVD and the shared adversarial term: the pure losses against values computed by hand,
their edge cases, and every preset of every method wired through the Method contract (fake outputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.engine import TrainState, train_step
from kdbench.runtime import Runtime
from kdbench.methods.adversarial import (
    Discriminator,
    generator_loss,
    gradient_penalty,
    hinge_d_loss,
    wgan_d_loss,
)
from kdbench.methods.cwd import CWD, cwd_loss
from kdbench.methods.ifvd import IFVD, class_similarity_map, ifv_loss
from kdbench.methods.skd import SKD, node_pool, pairwise_loss, soft_cross_entropy
from tests.fakes import NUM_CLASSES, S_CH, T_CH, FakeSegNet, build, specs, t64

LN3 = math.log(3)
KL_75_25 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL((.75, .25) || (.5, .5))


# ---------------------------------------------------------------------------------------------
# CWD


def test_cwd_by_hand():
    # one image, one channel, two positions: softmax over the positions
    s = t64([0.0, 0.0], (1, 1, 1, 2))  # p_s = (.5, .5)
    t = t64([LN3, 0.0], (1, 1, 1, 2))  # p_t = (3, 1) / 4
    assert cwd_loss(s, t).item() == pytest.approx(KL_75_25)
    # T = 2: p_t = (√3, 1) / (√3 + 1), p_s uniform, times T^2 = 4
    r3 = math.sqrt(3)
    pt = (r3 / (r3 + 1), 1 / (r3 + 1))
    expected = 4 * (pt[0] * math.log(pt[0] / 0.5) + pt[1] * math.log(pt[1] / 0.5))
    assert cwd_loss(s, t, temperature=2.0).item() == pytest.approx(expected)


def test_cwd_averages_over_images_and_channels():
    # 1 x 2 x 1 x 2: channel 0 as above, channel 1 equal in both -> (KL + 0) / (B*C = 2)
    s = t64([0.0, 0.0, 5.0, 1.0], (1, 2, 1, 2))
    t = t64([LN3, 0.0, 5.0, 1.0], (1, 2, 1, 2))
    assert cwd_loss(s, t).item() == pytest.approx(KL_75_25 / 2)
    # the softmax runs over positions, not channels: a constant added to a channel changes nothing
    assert cwd_loss(s + t64([7.0, 7.0, -2.0, -2.0], (1, 2, 1, 2)), t).item() == pytest.approx(KL_75_25 / 2)
    # two images, the second identical: halved again
    s2, t2 = torch.cat([s, t]), torch.cat([t, t])
    assert cwd_loss(s2, t2).item() == pytest.approx(KL_75_25 / 4)


def test_cwd_identical_is_zero_and_shapes_must_match():
    x = torch.randn(2, 3, 4, 5)
    assert cwd_loss(x, x, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        cwd_loss(torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3))


# ---------------------------------------------------------------------------------------------
# SKD


def test_soft_cross_entropy_by_hand():
    s = t64([0.0, 0.0], (1, 2, 1, 1))  # p_s = (.5, .5)
    t = t64([LN3, 0.0], (1, 2, 1, 1))  # p_t = (.75, .25)
    # -(.75 ln .5 + .25 ln .5) = ln 2
    assert soft_cross_entropy(s, t).item() == pytest.approx(math.log(2))


def test_pairwise_by_hand_without_pooling():
    # 1 x 2 x 1 x 2: two nodes. Student nodes (1, 0), (0, 1) -> A_s = I.
    fs = t64([1.0, 0.0, 0.0, 1.0], (1, 2, 1, 2))
    # teacher nodes (1, 0), (1, 1) -> normalised (1, 0), (1, 1)/√2 -> A_t = [[1, 1/√2], [1/√2, 1]]
    ft = t64([1.0, 1.0, 0.0, 1.0], (1, 2, 1, 2))
    # squared errors: 0, 1/2, 1/2, 0 -> mean 1/4
    assert pairwise_loss(fs, ft, pool_kernel=1).item() == pytest.approx(0.25)
    # scale does not matter (L2-normalised nodes); the detached norm gives the same value
    assert pairwise_loss(3 * fs, ft, pool_kernel=1, detach_norm=True).item() == pytest.approx(0.25)


def test_pairwise_by_hand_with_max_pool():
    # 1 x 2 x 2 x 4, 2x2 max-pool -> two nodes: left (max c0, max c1) = (1, 0), right = (0, 2)
    fs = torch.zeros(1, 2, 2, 4, dtype=torch.float64)
    fs[0, 0, 0, 0] = 1.0
    fs[0, 1, 1, 3] = 2.0
    fs[0, 0, 1, 1] = -5.0  # max-pooled away
    ft = torch.ones(1, 2, 2, 4, dtype=torch.float64)  # nodes (1, 1), (1, 1) -> A_t all ones
    # A_s = I: squared errors 0, 1, 1, 0 -> mean 1/2
    assert pairwise_loss(fs, ft, pool_kernel=2).item() == pytest.approx(0.5)
    # pool_scale 0.5 on a 2 x 4 map -> 1 x 2 kernel -> 2 x 2 = 4 nodes, same as a (1, 2) kernel by hand
    nodes_s = F.max_pool2d(fs, (1, 2), stride=(1, 2))
    nodes_t = F.max_pool2d(ft, (1, 2), stride=(1, 2))
    assert pairwise_loss(fs, ft, pool_scale=0.5).item() == pytest.approx(pairwise_loss(nodes_s, nodes_t, pool_kernel=1).item())


def test_pairwise_edge_cases():
    x = torch.randn(2, 3, 6, 6)
    assert pairwise_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    # different channel counts (affinities are nodes x nodes) and spatial sizes (student resized)
    fs = torch.randn(1, 4, 3, 3, requires_grad=True)
    ft = torch.randn(1, 7, 6, 6)
    loss = pairwise_loss(fs, ft, pool_kernel=2)
    loss.backward()
    assert torch.isfinite(loss) and fs.grad is not None and fs.grad.abs().sum() > 0
    # a kernel larger than the map: one node each, identical affinities
    assert pairwise_loss(torch.randn(1, 2, 1, 1), torch.randn(1, 2, 1, 1), pool_kernel=4).item() == pytest.approx(0.0)


def _affinity_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """The pair-wise term as the paper writes it: M x M affinities of normalised nodes, mean squared difference."""
    ns, nt = F.normalize(fs.flatten(2), dim=1), F.normalize(ft.flatten(2), dim=1)
    return ((ns.transpose(1, 2) @ ns - nt.transpose(1, 2) @ nt) ** 2).mean()


def test_pairwise_through_gram_matrices_is_the_affinity_loss():
    # 3 and 5 channels, 8 x 10 = 80 nodes: more nodes than channels, so pairwise_loss takes the
    # C x C Gram route; in float64 it is the affinity formula, value and gradient
    torch.manual_seed(0)
    fs = torch.randn(2, 3, 8, 10, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 5, 8, 10, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(ref := _affinity_loss(fs, ft), fs)
    (g,) = torch.autograd.grad(loss := pairwise_loss(fs, ft, pool_kernel=1), fs)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12) and ref.item() > 0.05
    assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-15)
    # float32 at a realistic closeness (the student's ReLU features within 10% noise of the
    # teacher's, 16 channels, 40 x 40 nodes): within 1e-4 of float64 (measured 2.8e-6)
    ft = torch.relu(torch.randn(2, 16, 40, 40, dtype=torch.float64))
    fs = ft + 0.1 * torch.randn_like(ft)
    ref = _affinity_loss(fs, ft).item()
    assert pairwise_loss(fs.float(), ft.float(), pool_kernel=1).item() == pytest.approx(ref, rel=1e-4)


def test_large_pool_windows_in_two_passes_are_max_pool2d_exactly():
    # VOC's pool_scale 0.5 window (64 x 64 on 129 x 129, ceil mode: a 3 x 3 grid) and an odd
    # one, on ReLU-like maps full of ties (zeros, small integers): values and gradients bit-equal
    # to one max_pool2d, whose gradient goes to the first maximum in row-major order
    torch.manual_seed(0)
    for h, w, kh, kw in ((129, 129, 64, 64), (17, 23, 8, 5)):
        x = torch.relu(torch.randn(2, 3, h, w)).round()
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_ref, y = F.max_pool2d(a, (kh, kw), stride=(kh, kw), ceil_mode=True), node_pool(b, kh, kw)
        grad = torch.randn_like(y_ref)
        y_ref.backward(grad)
        y.backward(grad)
        assert torch.equal(y, y_ref) and torch.equal(b.grad, a.grad), (h, w, kh, kw)


def test_pairwise_detach_norm_changes_the_gradient_only():
    torch.manual_seed(0)
    fs0, ft = torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 3, 4, 4, dtype=torch.float64)
    grads, values = [], []
    for detach in (False, True):
        fs = fs0.clone().requires_grad_(True)
        loss = pairwise_loss(fs, ft, pool_kernel=1, detach_norm=detach)
        loss.backward()
        grads.append(fs.grad)
        values.append(loss.item())
    assert values[0] == pytest.approx(values[1])
    assert not torch.allclose(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------
# IFVD

R2 = 1 / math.sqrt(2)


def _ifv_example():
    # 1 x 2 x 1 x 3. Student pixels (1, 0), (0, 1), (5, 5); teacher (1, 0), (1, 0), (3, 1)
    fs = t64([1.0, 0.0, 5.0, 0.0, 1.0, 5.0], (1, 2, 1, 3))
    ft = t64([1.0, 1.0, 3.0, 0.0, 0.0, 1.0], (1, 2, 1, 3))
    return fs, ft


def test_ifv_by_hand():
    fs, ft = _ifv_example()
    labels = torch.tensor([[[0, 0, 1]]])
    # student: class-0 prototype (.5, .5): cos = 1/√2 for both pixels; class 1 is one pixel: cos = 1
    # teacher: class-0 prototype (1, 0): cos = 1, 1; class 1: cos = 1
    # mean over 3 pixels of (1/√2 - 1)^2, (1/√2 - 1)^2, 0
    expected = 2 * (R2 - 1) ** 2 / 3
    assert ifv_loss(fs, ft, labels, num_classes=2).item() == pytest.approx(expected, rel=1e-6)


def test_ifv_ignore_label_and_dilution():
    fs, ft = _ifv_example()
    labels = torch.tensor([[[0, 0, 255]]])
    # the third pixel is ignored: mean over the two labelled pixels ...
    assert ifv_loss(fs, ft, labels, 2).item() == pytest.approx((R2 - 1) ** 2, rel=1e-6)
    # ... or, CIRKD's way, over all three (the ignored one counting as zero error)
    assert ifv_loss(fs, ft, labels, 2, dilute_ignore=True).item() == pytest.approx(2 * (R2 - 1) ** 2 / 3, rel=1e-6)


def test_ifv_all_ignore_is_zero_without_nan():
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ft = torch.randn(2, 5, 4, 4)
    labels = torch.full((2, 8, 8), 255)
    for dilute in (False, True):
        loss = ifv_loss(fs, ft, labels, 4, dilute_ignore=dilute)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(fs.grad).all()


def test_ifv_prototypes_are_per_image_and_absent_classes_are_harmless():
    torch.manual_seed(0)
    fs, ft = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.randn(2, 4, 2, 2, dtype=torch.float64)
    # image 0 has classes 0 and 2 only, image 1 class 1 only (classes 3, 4 absent everywhere)
    labels = torch.tensor([[[0, 0], [2, 2]], [[1, 1], [1, 1]]])
    both = ifv_loss(fs, ft, labels, num_classes=5)
    one = ifv_loss(fs[:1], ft[:1], labels[:1], 5)
    two = ifv_loss(fs[1:], ft[1:], labels[1:], 5)
    assert torch.isfinite(both)
    # every image has 4 labelled pixels: the batch mean is the mean of the per-image means
    assert both.item() == pytest.approx((one.item() + two.item()) / 2)

    # by hand for image 0: row 0 is class 0, row 1 class 2; each pixel against its row's mean
    def rows(f):
        return [F.cosine_similarity(f[:, r, c], f[:, r, :].mean(1), dim=0) for r in (0, 1) for c in (0, 1)]

    expected = sum((x - y) ** 2 for x, y in zip(rows(fs[0]), rows(ft[0]))) / 4
    assert one.item() == pytest.approx(expected.item(), rel=1e-6)
    # image 1: one class, every pixel against the image mean
    proto_s, proto_t = fs[1].flatten(1).mean(1), ft[1].flatten(1).mean(1)
    ms = F.cosine_similarity(fs[1].flatten(1), proto_s[:, None], dim=0)
    mt = F.cosine_similarity(ft[1].flatten(1), proto_t[:, None], dim=0)
    assert two.item() == pytest.approx(((ms - mt) ** 2).mean().item(), rel=1e-6)


def test_class_prototypes_by_one_hot_products_are_the_scatter_sums():
    # the GPU route (one-hot matrix products) against the by-hand-checked CPU route (scatter_add,
    # gather), in float64: unlabelled pixels (-1), a class present in one image only, absent classes,
    # a pixel whose feature is zero (the eps of cosine similarity)
    torch.manual_seed(0)
    f0 = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    f0[0, :, 1, 1] = 0
    labels = torch.randint(-1, 3, (2, 4, 5))
    labels[1][labels[1] == 2] = 0
    out, grads = [], []
    for onehot in (False, True):
        f = f0.clone().requires_grad_(True)
        m, valid = class_similarity_map(f, labels, num_classes=5, onehot=onehot)
        (m * torch.linspace(-1, 2, m.numel(), dtype=m.dtype).view_as(m)).sum().backward()
        out.append((m, valid))
        grads.append(f.grad)
    assert torch.equal(out[0][1], out[1][1]) and not out[0][1].all()
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14) and grads[0].abs().sum() > 0


def test_the_gpu_experiment_on_ifvd_class_sums_computes_the_same_map_by_every_route(tmp_path):
    """results/ifvd_products.py times candidate routes on a GPU; a faster one is worth nothing if it
    computes another map. 17 x 17 pixels in 16 chunks: the last chunk is padded."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "results" / "ifvd_products.py"
    args = ["--device", "cpu", "--size", "17", "--batch", "2", "--channels", "8", "--reps", "1", "--no-compile", "--json", "out.json"]
    r = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [row["route"] for row in rows] == ["scatter", "onehot", "chunked"]  # tf32: CUDA only
    for row in rows:  # float32 against float64
        assert row["rel_err_map"] < 1e-6 and row["rel_err_grad"] < 1e-6, row


def test_ifv_identical_sizes_channels_and_downsampled_labels():
    x = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 16, 16))
    assert ifv_loss(x, x, labels, 3).item() == pytest.approx(0.0, abs=1e-10)
    # student 3 channels at 2 x 2, teacher 6 channels at 4 x 4, labels at 16 x 16
    fs = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = ifv_loss(fs, torch.randn(2, 6, 4, 4), labels, 3)
    loss.backward()
    assert torch.isfinite(loss) and fs.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# adversarial pieces


def test_adversarial_losses_by_hand():
    d_t = torch.tensor([0.5, 2.0])
    d_s = torch.tensor([-3.0, 0.0])
    # hinge: mean(relu(1 - .5), relu(1 - 2)) + mean(relu(1 - 3), relu(1 + 0)) = .25 + .5
    assert hinge_d_loss(d_t, d_s).item() == pytest.approx(0.75)
    # WGAN: mean D(s) - mean D(t) = -1.5 - 1.25
    assert wgan_d_loss(d_t, d_s).item() == pytest.approx(-2.75)
    assert generator_loss(d_s).item() == pytest.approx(1.5)


def test_gradient_penalty_by_hand():
    # a linear critic D(x) = sum(a * x) has gradient a everywhere: GP = (|a| - 1)^2 = (5 - 1)^2
    a = torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1)

    def critic(x):
        return (a * x).sum(dim=(1, 2, 3))

    real, fake = torch.randn(3, 2, 1, 1), torch.randn(3, 2, 1, 1)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(16.0)


@pytest.mark.parametrize("size", [(12, 12), (64, 64), (3, 5), (9, 16)])
def test_discriminator_scores_any_map(size):
    d = Discriminator(num_classes=5, width=8)
    out = d(torch.randn(1, 5, *size))  # batch of one
    assert out.shape[:2] == (1, 1) and torch.isfinite(out).all()
    assert d(torch.randn(1, 5, 64, 64)).shape == (1, 1, 1, 1)  # one score per image at CIRKD's crop


# ---------------------------------------------------------------------------------------------
# every method and preset through the Method contract

CASES = [(cls, p) for cls in (CWD, SKD, IFVD) for p in ("default", *cls.presets)]
EXPECTED_TERMS = {
    (CWD, "default"): {"cwd_logits"},
    (CWD, "paper"): {"cwd_logits"},
    (CWD, "pure"): {"cwd_logits"},
    (CWD, "mmrazor"): {"cwd_logits"},
    (CWD, "cirkd"): {"cwd_logits", "cwd_decoder", "kd", "adv"},
    (SKD, "default"): {"kd", "pairwise", "adv"},
    (SKD, "cirkd"): {"kd", "pairwise", "adv"},
    (SKD, "paper"): {"kd", "pairwise", "adv"},
    (SKD, "pure"): {"pairwise"},
    (IFVD, "default"): {"ifv", "kd", "adv"},
    (IFVD, "cirkd"): {"ifv", "kd", "adv"},
    (IFVD, "paper"): {"ifv", "kd", "adv"},
    (IFVD, "pure"): {"ifv"},
}


def fake_outputs(batch=2, s_size=(8, 8), t_size=(8, 8)):
    """Student outputs as leaves that record gradients; teacher outputs computed under no_grad."""
    torch.manual_seed(1)
    student = {"logits": torch.randn(batch, NUM_CLASSES, *s_size)}
    student.update({k: torch.randn(batch, c, *s_size) for k, c in S_CH.items()})
    student = {k: v.requires_grad_(True) for k, v in student.items()}
    teacher_net = FakeSegNet(T_CH)
    with torch.no_grad():
        t = teacher_net(torch.randn(batch, 3, 2 * t_size[0], 2 * t_size[1]))
    target = torch.randint(0, NUM_CLASSES, (batch, 4 * t_size[0], 4 * t_size[1]))
    target[:, :3] = 255
    return student, t, target, teacher_net


def disc_params(method):
    return {n: p for n, p in method.named_parameters() if "discriminator" in n}


@pytest.mark.parametrize("cls,preset", CASES, ids=[f"{c.name}-{p}" for c, p in CASES])
@pytest.mark.parametrize("batch,s_size", [(2, (8, 8)), (1, (4, 4))], ids=["b2-same-size", "b1-student-os16"])
def test_method_contract(cls, preset, batch, s_size):
    method = build(cls, preset)
    method.train()
    student, teacher, target, teacher_net = fake_outputs(batch, s_size)
    terms = method(student, teacher, target)
    assert set(terms) == EXPECTED_TERMS[(cls, preset)]
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(terms.values()).backward()
    # gradients reach the student's outputs that the terms read, never the teacher
    uses = {"logits": {"cwd_logits", "kd", "adv"}, "decoder": {"cwd_decoder", "pairwise", "ifv"}}
    for key, names in uses.items():
        if names & set(terms):
            assert student[key].grad is not None and student[key].grad.abs().sum() > 0, key
    assert all(not v.requires_grad for v in teacher.values())
    assert all(p.grad is None for p in teacher_net.parameters())
    # the student's pass leaves no gradient on the discriminator
    assert all(p.grad is None for p in disc_params(method).values())
    adversarial = method.cfg.adv_weight > 0
    assert ("adv" in terms) == adversarial == bool(disc_params(method))
    before = {n: p.detach().clone() for n, p in disc_params(method).items()}
    logged = method.own_step({k: v.detach() for k, v in student.items()}, teacher, target, Runtime())
    if adversarial:
        assert set(logged) == {"adv_disc"} and math.isfinite(logged["adv_disc"])
        assert any(not torch.equal(before[n], p) for n, p in disc_params(method).items())
        # the discriminator is trained by its own optimizer only
        own = set(map(id, disc_params(method).values()))
        assert own.isdisjoint(map(id, method.student_parameters()))
        assert set(method.configure_optimizers()) == {"discriminator"}
    else:
        assert logged == {} and method.configure_optimizers() == {}


@pytest.mark.parametrize("cls", [CWD, SKD, IFVD])
def test_zero_adversarial_weight_builds_no_discriminator(cls):
    preset = "cirkd"
    method = build(cls, preset, adv_weight=0.0)
    assert not disc_params(method) and method.adversary is None
    student, teacher, target, _ = fake_outputs()
    assert "adv" not in method(student, teacher, target)
    with pytest.raises(ValueError):
        cls.Config(**{**cls.presets[preset], "adv_d_weight": 0.0})  # a frozen random D is refused


def test_zero_weight_terms_are_not_computed(monkeypatch):
    import kdbench.methods.cwd as cwd_mod
    import kdbench.methods.ifvd as ifvd_mod

    def boom(*args, **kwargs):
        raise AssertionError("a zero-weight term was computed")

    monkeypatch.setattr(cwd_mod, "kd_loss", boom)
    monkeypatch.setattr(ifvd_mod, "ifv_loss", boom)
    student, teacher, target, _ = fake_outputs()
    assert set(build(CWD, "paper")(student, teacher, target)) == {"cwd_logits"}
    assert set(build(IFVD, "cirkd", weight=0.0)(student, teacher, target)) == {"kd", "adv"}


def test_cwd_feature_connector():
    method = build(CWD, "cirkd")
    assert isinstance(method.connector, nn.Conv2d)
    assert method.connector.weight.shape[:2] == (T_CH["decoder"], S_CH["decoder"])
    student, teacher, target, _ = fake_outputs(2, (4, 4))
    method(student, teacher, target)["cwd_decoder"].backward()
    assert method.connector.weight.grad is not None and method.connector.weight.grad.abs().sum() > 0
    assert student["decoder"].grad.abs().sum() > 0
    # the connector is trained with the student
    assert id(method.connector.weight) in set(map(id, method.student_parameters()))
    # equal channel counts: no connector; no feature term: no connector either
    same = CWD(CWD.Config(**CWD.presets["cirkd"]), *specs(S_CH, S_CH))
    assert same.connector is None
    assert build(CWD, "paper").connector is None


def test_presets_name_known_fields():
    for cls in (CWD, SKD, IFVD):
        for preset, values in cls.presets.items():
            cls.Config(**values)  # raises on an unknown field or an invalid combination
        assert cls.default_preset in cls.presets
        # the Config defaults are the default preset, so "default" and it never disagree
        assert cls.Config() == cls.Config(**cls.presets[cls.default_preset])


def test_ifvd_paper_kd_is_the_element_wise_mean():
    student, teacher, target, _ = fake_outputs()
    kd = build(IFVD, "paper")(student, teacher, target)["kd"]
    from kdbench.methods.kd import kd_loss

    assert kd.item() == pytest.approx(10 * kd_loss(student["logits"], teacher["logits"]).item() / NUM_CLASSES)


@pytest.mark.parametrize("cls,preset", [(CWD, "cirkd"), (SKD, "paper"), (IFVD, "paper"), (SKD, "pure")])
def test_engine_step_trains_student_connectors_and_discriminator(cls, preset):
    torch.manual_seed(0)
    student, teacher = FakeSegNet(S_CH), FakeSegNet(T_CH)
    teacher.eval().requires_grad_(False)
    method = build(cls, preset)
    params = list(student.parameters()) + method.student_parameters()
    optimizer = torch.optim.SGD(params, lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainState(student, method, teacher, optimizer, scheduler, total_steps=4)
    d_before = {n: p.detach().clone() for n, p in disc_params(method).items()}
    s_before = [p.detach().clone() for p in student.parameters()]
    images = torch.randn(2, 3, 16, 16)
    target = torch.randint(0, NUM_CLASSES, (2, 16, 16))
    logged = train_step(state, images, target)
    assert all(math.isfinite(v) for v in logged.values())
    assert any(not torch.equal(a, b) for a, b in zip(s_before, student.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
    if method.cfg.adv_weight > 0:
        assert "loss/adv" in logged and "loss/adv_disc" in logged
        assert any(not torch.equal(d_before[n], p) for n, p in disc_params(method).items())
    else:
        assert not disc_params(method) and "loss/adv_disc" not in logged
    if method.cfg.adv_lr_power > 0:  # the discriminator's lr follows the poly schedule
        train_step(state, images, target)
        lr = method._own_optimizers["discriminator"].param_groups[0]["lr"]
        assert lr == pytest.approx(method.cfg.adv_lr * (1 - 1 / 4) ** method.cfg.adv_lr_power)
