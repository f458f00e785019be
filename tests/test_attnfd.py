"""AttnFD: the teacher-side refinement and both normalisations against values computed by hand,
their edge cases, and the method's wiring (gradients, presets, the released code's quirks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.engine import TrainState, train_step
from kdbench.methods import resolve_config
from kdbench.methods.attnfd import (
    LAYERS,
    AttnFD,
    attnfd_distance,
    batch_normalized_distance,
    channel_normalized_distance,
    free_attention,
)
from tests.fakes import NUM_CLASSES, S_CH, T_CH, FakeSegNet, build, t64


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# ---------------------------------------------------------------------------------------------
# the pure functions


def test_free_attention_by_hand():
    # two channels, two pixels: channel 0 = (1, 3), channel 1 = (0, -2)
    x = t64([1, 3, 0, -2], (1, 2, 1, 2))
    a, b = sig(2 + 3), sig(-1 + 0)  # channel gate: sigmoid(avg + max) per channel
    # channel-refined map: (a, 3a) and (0, -2b); spatial gate: sigmoid(max + mean) per pixel
    g0 = sig(a + a / 2)
    g1 = sig(3 * a + (3 * a - 2 * b) / 2)
    expected = t64([a * g0, 3 * a * g1, 0, -2 * b * g1], (1, 2, 1, 2))
    torch.testing.assert_close(free_attention(x), expected)


@pytest.mark.parametrize("expanded", [False, True])
def test_batch_normalization_by_hand(expanded):
    # one map, one pixel, two channels: (3, 4) / 5 vs (1, 0) / 1 -> (.6 - 1)^2 + .8^2 = .8
    one = batch_normalized_distance(t64([3, 4], (1, 2, 1, 1)), t64([1, 0], (1, 2, 1, 1)), expanded)
    assert one.item() == pytest.approx(0.8)
    # the norm is over the whole batch, the sum is divided by B: (.6 - .8)^2 + (.8 - .6)^2 = .08, / 2
    fs, ft = t64([3, 4], (2, 1, 1, 1)), t64([4, 3], (2, 1, 1, 1))
    assert batch_normalized_distance(fs, ft, expanded).item() == pytest.approx(0.04)


def test_batch_normalization_expanded_has_the_direct_forms_value_and_gradient():
    fs = torch.randn(3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(3, 5, 4, 6, dtype=torch.float64) + 0.5 * fs.detach()  # correlated, as distillation's
    values, grads = [], []
    for expanded in (False, True):
        d = batch_normalized_distance(fs, ft, expanded)
        (g,) = torch.autograd.grad(d, fs)
        values.append(d)
        grads.append(g)
    torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-14)


def test_channel_normalization_by_hand():
    # pixel 0: (3, 4) -> (.6, .8) vs (4, 3) -> (.8, .6); pixel 1: (1, 0) vs (0, 2) -> (0, 1)
    fs = t64([3, 1, 4, 0], (1, 2, 1, 2))
    ft = t64([4, 0, 3, 2], (1, 2, 1, 2))
    d0, d1 = math.sqrt(0.08), math.sqrt(2)
    assert channel_normalized_distance(fs, ft).item() == pytest.approx((d0 + d1) / 2)  # / (H*W)
    assert channel_normalized_distance(fs, ft, squared=True).item() == pytest.approx((0.08 + 2) / 2)
    # summed over the batch, not averaged
    two = channel_normalized_distance(torch.cat([fs, fs]), torch.cat([ft, ft]))
    assert two.item() == pytest.approx(d0 + d1)


@pytest.mark.parametrize("normalize", ["batch", "channel"])
def test_identical_or_rescaled_maps_give_zero(normalize):
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    assert attnfd_distance(x, x, normalize).item() == pytest.approx(0, abs=1e-12)
    # both normalisations remove the scale of a map
    assert attnfd_distance(3 * x, x, normalize).item() == pytest.approx(0, abs=1e-12)
    if normalize == "batch":  # the expanded form too, and never below 0 (float32: cos may round above 1)
        g = torch.Generator().manual_seed(0)
        for dtype in [torch.float64] + [torch.float32] * 20:  # unclamped, about 1 float32 draw in 4 is negative
            y = torch.randn(2, 5, 3, 4, generator=g).to(dtype)
            assert 0 <= batch_normalized_distance(y, 3 * y, expanded=True).item() < 1e-6


@pytest.mark.parametrize("normalize", ["batch", "channel"])
def test_student_map_is_resized_to_the_teachers(normalize):
    fs, ft = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8)
    up = F.interpolate(fs, size=(8, 8), mode="bilinear", align_corners=False)
    assert attnfd_distance(fs, ft, normalize).item() == pytest.approx(attnfd_distance(up, ft, normalize).item())


# ---------------------------------------------------------------------------------------------
# the method


def features(batch=2, s_size=(8, 8), t_size=(8, 8)):
    """Student and teacher features as leaves, so a gradient reaching either would show."""
    torch.manual_seed(1)
    student = {k: torch.randn(batch, S_CH[k], *s_size, requires_grad=True) for k in LAYERS}
    teacher = {k: torch.randn(batch, T_CH[k], *t_size, requires_grad=True) for k in LAYERS}
    return student, teacher


VARIANTS = [(a, n) for a in ("free", "pretrained", "random") for n in ("batch", "channel")]


@pytest.mark.parametrize("attention,normalize", VARIANTS)
@pytest.mark.parametrize("batch,s_size", [(2, (8, 8)), (1, (4, 4))], ids=["b2-same-size", "b1-student-os16"])
def test_gradients_reach_student_and_its_attention_never_the_teacher(attention, normalize, batch, s_size):
    method = build(AttnFD, teacher_attention=attention, normalize=normalize, teacher_taps=LAYERS).train()
    student, teacher = features(batch, s_size)
    terms = method(student, teacher, torch.zeros(batch, 16, 16, dtype=torch.long))
    assert set(terms) == {"attnfd"} and terms["attnfd"].dim() == 0 and torch.isfinite(terms["attnfd"])
    terms["attnfd"].backward()
    for k in LAYERS:
        assert student[k].grad is not None and student[k].grad.abs().sum() > 0, k
        assert teacher[k].grad is None, k
    for name, p in method.named_parameters():
        if name.startswith(("student_cbam", "connectors")):
            assert p.requires_grad and p.grad is not None, name
        else:  # the random teacher CBAMs
            assert name.startswith("teacher_cbam") and not p.requires_grad and p.grad is None, name
    # (single parameters may see a zero gradient: a 1-unit channel-MLP bottleneck can start dead)
    for part in ("student_cbam", "connectors"):
        for k, module in getattr(method, part).items():
            assert sum(p.grad.abs().sum() for p in module.parameters()) > 0, (part, k)
    assert set(map(id, method.student_parameters())) == {
        id(p) for n, p in method.named_parameters() if not n.startswith("teacher_cbam")
    }


def test_total_is_alpha_times_the_sum_over_layers():
    student, teacher = features()
    torch.manual_seed(0)
    full = build(AttnFD, alpha=3.0)
    total = full(student, teacher, None)["attnfd"].item()
    parts = 0.0
    for layer in LAYERS:
        one = build(AttnFD, alpha=1.0, layers=[layer])
        one.load_state_dict(full.state_dict(), strict=False)  # the same CBAM and connector weights
        parts += one(student, teacher, None)["attnfd"].item()
    assert total == pytest.approx(3.0 * parts, rel=1e-5)


def test_pretrained_needs_a_teacher_with_its_own_cbams():
    with pytest.raises(ValueError, match="attention_taps"):
        build(AttnFD, teacher_attention="pretrained", teacher_taps=("backbone",))
    assert AttnFD.teacher_requirements(AttnFD.Config(teacher_attention="pretrained", layers=["encoder"])) == {
        "attention_taps": ("encoder",)
    }
    assert AttnFD.teacher_requirements(AttnFD.Config()) == {}
    # the teacher's features are distilled as they are: its CBAMs already refined them
    method = build(AttnFD, teacher_attention="pretrained", teacher_taps=LAYERS)
    x = torch.randn(1, 4, 2, 2)
    assert torch.equal(method.refine_teacher("backbone", x), x)


def test_random_teacher_cbams_stay_frozen_in_eval_mode():
    method = build(AttnFD, teacher_attention="random").train()
    assert not any(m.training for m in method.teacher_cbam.modules())
    bn = method.teacher_cbam["decoder"].spatial_gate.bn
    before = bn.running_mean.clone()
    student, teacher = features()
    method(student, teacher, None)
    assert torch.equal(bn.running_mean, before)


def test_code_preset_warms_connectors_up_then_freezes_them():
    method = build(AttnFD, "code").train()
    assert method.cfg.teacher_attention == "random" and method.cfg.normalize == "batch"
    gates = {id(p) for c in method.student_cbam.values() for p in c.channel_gate.parameters()}
    assert gates and gates.isdisjoint(map(id, method.student_parameters()))  # never updated

    def grads(step: int):
        method.on_step(step, total_steps=10, steps_per_epoch=3)
        student, teacher = features()
        method.zero_grad(set_to_none=True)
        method(student, teacher, None)["attnfd"].backward()
        return student, [p.grad for p in method.connectors.parameters()], [p.grad for p in method.student_cbam.parameters()]

    # first epoch: only the connectors learn; the method asks the engine to freeze the student model
    student, conn, cbam = grads(2)
    assert all(student[k].grad is None for k in LAYERS) and all(g is not None for g in conn)
    assert method.student_frozen and all(g is None for g in cbam)
    # afterwards the connectors are frozen and the student (its CBAMs but their channel MLP) learns
    student, conn, cbam = grads(3)
    assert all(student[k].grad is not None for k in LAYERS) and all(g is None for g in conn)
    assert not method.student_frozen and any(g is not None for g in cbam)


def test_engine_step_with_the_code_preset():
    torch.manual_seed(0)
    student, teacher = FakeSegNet(S_CH), FakeSegNet(T_CH)
    teacher.eval().requires_grad_(False)
    method = build(AttnFD, "code")
    optimizer = torch.optim.SGD(list(student.parameters()) + method.student_parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainState(student, method, teacher, optimizer, scheduler, total_steps=3, steps_per_epoch=1)
    images, target = torch.randn(2, 3, 16, 16), torch.randint(0, NUM_CLASSES, (2, 16, 16))

    def connectors():
        return [p.detach().clone() for p in method.connectors.parameters()]

    before = connectors()
    assert "loss/attnfd" in train_step(state, images, target)  # step 0: warm-up
    warmed = connectors()
    assert any(not torch.equal(a, b) for a, b in zip(before, warmed))
    train_step(state, images, target)  # step 1: frozen
    assert all(torch.equal(a, b) for a, b in zip(warmed, connectors()))
    assert all(p.grad is None for p in teacher.parameters())


def test_options_that_change_nothing_are_named_for_tables():
    """``squared`` only acts under channel normalisation, ``warmup_freezes_student`` only with a warm-up."""
    inert = {p: AttnFD.inert_options(resolve_config("attnfd", p, {})[1]) for p in ("default", "code", "paper")}
    assert inert == {"default": {"squared", "warmup_freezes_student"}, "code": {"squared"}, "paper": {"warmup_freezes_student"}}
