"""A training step as one CUDA graph: the checkpoint side on any machine; on a GPU, graphed steps
against eager steps of the same run (every kind of step: a plain loss, a discriminator with Adam, a
WGAN-GP double backward, class prototypes, AttnFD's connector warm-up that captures again)."""

import dataclasses
import math

import pytest
import torch

from kdbench.cuda_graphs import WARMUP_STEPS, portable, set_lr
from kdbench.engine import build_state, train_step
from kdbench.methods import method_for, registry, resolve_config
from kdbench.models import build_model
from kdbench.recipe import load_recipe
from kdbench.runtime import Runtime


def test_checkpoints_hold_plain_learning_rates_whatever_the_step_made_of_them():
    p = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    adam = torch.optim.Adam([p], lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 0.5)
    for opt in (sgd, adam):  # what a captured step does to them
        opt.param_groups[0]["lr"] = torch.tensor(float(opt.param_groups[0]["lr"]))
    adam.param_groups[0]["capturable"] = True
    sgd.step()
    schedule.step()
    assert isinstance(sgd.param_groups[0]["lr"], torch.Tensor)  # the schedule filled the tensor in place
    set_lr(adam.param_groups[0], 0.003)
    assert float(adam.param_groups[0]["lr"]) == pytest.approx(0.003)
    assert portable(sgd.state_dict())["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert portable(schedule.state_dict())["_last_lr"] == [pytest.approx(0.05)]
    group = portable(adam.state_dict())["param_groups"][0]
    assert type(group["lr"]) is float and group["lr"] == pytest.approx(0.003) and group["capturable"] is False
    plain = torch.optim.SGD([p], lr=1.0)  # and the checkpoint loads into an eager optimizer as it was
    plain.load_state_dict(portable(sgd.state_dict()))
    assert plain.param_groups[0]["lr"] == pytest.approx(0.05)


def test_a_cpu_step_is_never_a_graph():
    recipe = load_recipe("tiny")
    state = build_state(build_model(recipe.student, 9), None, None, recipe.train, Runtime(cuda_graphs=True))
    assert state.step_graph is None


CASES = [("kd", "default", "sgd"), ("cwd", "cirkd", "sgd"), ("skd", "paper", "adamw"), ("ifvd", "cirkd", "sgd"), ("attnfd", "code", "sgd")]


def _ten_steps(name: str, preset: str, optimizer: str, rt: Runtime):
    """Ten float64 steps of the tiny recipe from fixed weights and batches: (state, losses, change
    of the student's weights). Dropout is off (a replayed graph draws other masks)."""
    recipe = load_recipe("tiny")
    train = dataclasses.replace(recipe.train, iterations=20, optimizer=optimizer)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 9, (4, 32, 32), generator=g)) for _ in range(10)]
    torch.manual_seed(0)
    _, cfg = resolve_config(name, preset, {})
    needs = registry()[name].teacher_requirements(cfg)
    teacher = build_model(dataclasses.replace(recipe.teacher, **needs), 9).eval().requires_grad_(False)
    student = build_model(recipe.student, 9)
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    method = method_for(name, cfg, student, teacher, 9)
    for module in (student, teacher, method):
        module.double()
    state = build_state(student, method, teacher, train, rt, steps_per_epoch=4)
    start = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
    losses = [{k: float(v) for k, v in train_step(state, images, target).items()} for images, target in batches]
    change = torch.cat([p.detach().flatten() for p in student.parameters()]) - start
    return state, losses, change


def _same_training(eager, graphed, name: str) -> None:
    (eager, eager_losses, eager_change), (graphed, graphed_losses, graphed_change) = eager, graphed
    assert eager.step_graph is None and not graphed.step_graph.failed and graphed.step_graph.graph is not None
    assert graphed.step_graph.captures == (2 if name == "attnfd" else 1)
    assert len(eager_losses) == 10 > 2 * WARMUP_STEPS + 2  # replays happened in both phases
    for step, (a, b) in enumerate(zip(eager_losses, graphed_losses)):
        assert a.keys() == b.keys()
        for key in a:
            assert math.isfinite(b[key]) and b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (step, key)
    miss = float((graphed_change - eager_change).norm() / eager_change.norm())
    assert 0 < eager_change.norm() and miss < 1e-6, miss
    assert float(graphed.optimizer.param_groups[0]["lr"]) == pytest.approx(eager.optimizer.param_groups[0]["lr"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name,preset,optimizer", CASES, ids=[f"{n}-{p}" for n, p, _ in CASES])
def test_graphed_steps_train_like_eager_steps(name, preset, optimizer, monkeypatch):
    """Ten steps on the GPU, with and without the step's CUDA graph, from the same weights on the
    same batches: the same losses at every step, the same change of the weights and the same
    learning rate at the end. In float64: in float32, atomic adds in some backward kernels
    (bilinear upsampling, scatter-add) make even two eager runs differ by 1e-4 after one step and
    by 47% (IFVD's loss) after ten, which would hide a wrong graph. AttnFD's connector warm-up ends
    after 4 steps, so its graph is captured twice."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cuda = torch.device("cuda")
    eager = _ten_steps(name, preset, optimizer, Runtime(device=cuda, cuda_graphs=False))
    _same_training(eager, _ten_steps(name, preset, optimizer, Runtime(device=cuda, cuda_graphs=True)), name)


COMPILED = [("cwd", "cirkd", "sgd"), ("attnfd", "code", "sgd")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name,preset,optimizer", COMPILED, ids=[f"{n}-{p}" for n, p, _ in COMPILED])
def test_a_compiled_method_inside_the_step_graph_trains_like_eager_steps(name, preset, optimizer, monkeypatch):
    """``runtime.compile_method``: the method's forward compiled by inductor (Triton kernels), the
    whole step captured around it, against plain eager steps. AttnFD's warm-up end recompiles the
    method during the eager steps before the second capture; CWD's discriminator term is in the
    compiled graph."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cuda = torch.device("cuda")
    eager = _ten_steps(name, preset, optimizer, Runtime(device=cuda, cuda_graphs=False))
    compiled = _ten_steps(name, preset, optimizer, Runtime(device=cuda, cuda_graphs=True, compile_method=True))
    assert compiled[0].method_forward is not compiled[0].method
    _same_training(eager, compiled, name)
