"""AttnFD's `code` preset: the released code's training details, through real engine steps on the
tiny recipe's models (SGD with momentum and weight decay, as `kdbench run` builds it).

- warm-up: only the connectors train in the first epoch, then only the student (and its CBAMs);
- connectors: He's fan-out init, BN weight 1 and bias 0;
- the teacher in train mode for each step: its BatchNorm running statistics move, its weights do not.
The resume test for this preset (teacher buffers included) is in test_run.py."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.engine import build_state, state_dict, step_phase, train_step
from kdbench.methods import method_for, resolve_config
from kdbench.methods.attnfd import LAYERS, AttnFD, connector
from kdbench.models import build_model
from kdbench.recipe import load_recipe
from kdbench.runtime import Runtime
from tests.fakes import NUM_CLASSES, build, specs

STEPS_PER_EPOCH = 2


def code_state(preset: str = "code", **overrides):
    """The tiny recipe's teacher, student and AttnFD at ``preset``, two steps per epoch."""
    recipe = load_recipe("tiny")
    torch.manual_seed(0)
    _, cfg = resolve_config("attnfd", preset, overrides)
    teacher = build_model(recipe.teacher, NUM_CLASSES).eval().requires_grad_(False)
    student = build_model(recipe.student, NUM_CLASSES)
    method = method_for("attnfd", cfg, student, teacher, NUM_CLASSES)
    return build_state(student, method, teacher, recipe.train, Runtime(), steps_per_epoch=STEPS_PER_EPOCH)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (4, 32, 32), generator=g)


def snapshot(named) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in named}


def changed(before: dict[str, torch.Tensor], named) -> set[str]:
    return {n for n, t in named if not torch.equal(before[n], t)}


def parts(state) -> dict[str, dict[str, torch.Tensor]]:
    """What may learn, by part: the student model, its CBAMs (on the method), their channel-gate
    MLPs (never updated by the code preset), the connectors; and the student's BatchNorm statistics."""
    cbam = dict(state.method.student_cbam.named_parameters())
    gates = {n: p for n, p in cbam.items() if ".channel_gate." in f".{n}"}
    return {
        "student": dict(state.student.named_parameters()),
        "cbam": {n: p for n, p in cbam.items() if n not in gates},
        "gates": gates,
        "connectors": dict(state.method.connectors.named_parameters()),
        "student_stats": {n: b for n, b in state.student.named_buffers() if "running_" in n},
    }


def take(live: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: snapshot(v.items()) for k, v in live.items()}


def moved(before, after) -> dict[str, set[str]]:
    return {k: changed(before[k], after[k].items()) for k in before}


@pytest.mark.parametrize("freezes", [True, False], ids=["code", "student-trains-in-warmup"])
def test_warm_up_trains_only_the_connectors_then_only_the_student(freezes):
    state = code_state(warmup_freezes_student=freezes)
    live = parts(state)
    start = take(live)
    for step in range(STEPS_PER_EPOCH):  # the first epoch: the warm-up
        train_step(state, *batch(step))
    warm, warm_key = take(live), step_phase(state)
    for step in range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):  # the second epoch
        logged = train_step(state, *batch(step))
    assert all(math.isfinite(float(v)) for v in logged.values())
    end, after_key = take(live), step_phase(state)
    in_warmup, after = moved(start, warm), moved(warm, end)

    assert in_warmup["connectors"] == set(live["connectors"])  # every connector parameter learned
    if freezes:  # the released code steps only the connectors' optimizer in the first epoch:
        # nothing of the student moves, not even by weight decay or momentum
        assert in_warmup["student"] == set() and in_warmup["cbam"] == set()
    else:  # the student trains on the task loss, its CBAMs on the distillation term
        assert in_warmup["student"] == set(live["student"]) and in_warmup["cbam"]
    assert in_warmup["student_stats"] == set(live["student_stats"])  # in train mode either way
    # afterwards the connectors are frozen (momentum and weight decay do not move them either) and
    # the student, its CBAMs included, learns; the channel-gate MLP never does
    assert after["connectors"] == set() and after["student"] == set(live["student"]) and after["cbam"]
    assert moved(start, end)["gates"] == set()
    assert all(p.requires_grad for p in live["student"].values())
    # the step's CUDA-graph key holds the student's flags: a frozen student is another phase
    n = len(live["student"])
    assert warm_key != after_key and (warm_key[0][:n] != after_key[0][:n]) == freezes


def test_the_graph_key_has_the_students_flags():
    state = code_state("default")
    key = step_phase(state)
    next(state.student.parameters()).requires_grad_(False)
    assert step_phase(state) != key


def test_he_connector_init():
    torch.manual_seed(0)
    c_in, c_out = 256, 512
    conv, bn = connector(c_in, c_out, "he")
    std = math.sqrt(2 / (1 * 1 * c_out))  # n = k*k*out_channels
    w = conv.weight.detach()
    assert w.shape == (c_out, c_in, 1, 1) and conv.bias is None
    assert abs(float(w.mean())) < 0.01 * std and float(w.std()) == pytest.approx(std, rel=0.02)
    assert torch.equal(bn.weight.detach(), torch.ones(c_out)) and torch.equal(bn.bias.detach(), torch.zeros(c_out))
    # PyTorch's default (kaiming uniform, a = sqrt(5)): std 1 / sqrt(3 * fan_in), another distribution
    default = connector(c_in, c_out, "torch")[0].weight.detach()
    assert float(default.std()) == pytest.approx(1 / math.sqrt(3 * c_in), rel=0.02)
    # the presets: `code` builds its connectors so, the others keep PyTorch's
    assert build(AttnFD, "code").cfg.connector_init == "he" and build(AttnFD).cfg.connector_init == "torch"
    wide = AttnFD(AttnFD.Config(**AttnFD.presets["code"]), *specs(dict.fromkeys(LAYERS, 64), dict.fromkeys(LAYERS, 512)))
    for conv, bn in wide.connectors.values():
        assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / 512), rel=0.05)
        assert torch.equal(bn.weight.detach(), torch.ones(512)) and torch.equal(bn.bias.detach(), torch.zeros(512))


def bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return snapshot((n, b) for n, b in module.named_buffers() if "running_" in n)


@pytest.mark.parametrize("train_mode", [True, False], ids=["teacher-train", "teacher-eval"])
def test_teacher_in_train_mode_updates_its_statistics_not_its_weights(train_mode):
    state = code_state(teacher_train_mode=train_mode)
    teacher, method = state.teacher, state.method
    weights, stats, cbam_stats = snapshot(teacher.named_parameters()), bn_stats(teacher), bn_stats(method.teacher_cbam)
    assert stats and cbam_stats
    train_step(state, *batch())
    assert not teacher.training and not any(m.training for m in teacher.modules())  # eval again outside the step
    assert not changed(weights, teacher.named_parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    moved = changed(stats, bn_stats(teacher).items())
    assert moved == (set(stats) if train_mode else set())
    # the random teacher CBAMs are part of the teacher: in its mode
    assert changed(cbam_stats, bn_stats(method.teacher_cbam).items()) == (set(cbam_stats) if train_mode else set())
    # only then the checkpoint holds the teacher's buffers (the running statistics a resume needs)
    ckpt = state_dict(state)
    assert ("teacher_buffers" in ckpt) == train_mode
    if train_mode:
        assert ckpt["teacher_buffers"].keys() == dict(teacher.named_buffers()).keys()
