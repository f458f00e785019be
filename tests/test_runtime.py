"""Device and precision: resolution and its errors, loss math in float32 under autocast, and every
method's step under bf16 autocast against the same step in float32 (all on the CPU)."""

import copy
import math

import pytest
import torch

from kdbench.engine import TrainState, StepSlices, train_step
from kdbench.errors import UserError
from kdbench.methods import registry
from kdbench.methods.adversarial import generator_loss, hinge_d_loss, wgan_d_loss
from kdbench.methods.attnfd import attnfd_distance
from kdbench.methods.cwd import cwd_loss
from kdbench.methods.ifvd import ifv_loss
from kdbench.methods.kd import kd_loss
from kdbench.methods.skd import pairwise_loss, soft_cross_entropy
from kdbench.recipe import RuntimeConfig, load_recipe
from kdbench.runtime import Runtime, make_runtime, on_a_gpu, resolve_device, resolve_precision, sharing_cores

from tests.fakes import NUM_CLASSES, S_CH, T_CH, FakeSegNet, build


def test_device_and_precision_resolution_on_a_cpu():
    rt = make_runtime(RuntimeConfig())
    assert rt.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert rt.precision == "fp32" and not rt.channels_last and not rt.cuda_graphs and not rt.compile_method
        assert rt.loader_workers("auto") == 0 and rt.loader_workers(3) == 3
    assert resolve_device("cpu") == torch.device("cpu")
    # channels_last and compile_method: auto is on a GPU only; an explicit value holds anywhere
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [on_a_gpu("auto", cpu), on_a_gpu("auto", gpu)] == [False, True]
    assert [on_a_gpu(True, cpu), on_a_gpu(False, gpu)] == [True, False]
    assert make_runtime(load_recipe("tiny", ["runtime.compile_method=true"]).runtime).compile_method
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(UserError, match="runtime.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(UserError, match="runtime.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        load_recipe("tiny", ["runtime.device=gpu"])
    with pytest.raises(UserError, match="runtime.precision: expected one of"):
        load_recipe("tiny", ["runtime.precision=fp8"])


def test_evaluation_autotunes_convolutions_only_when_asked_and_leaves_training_s_setting_alone():
    """cudnn.benchmark is training's setting for the process; evaluation sets its own
    (runtime.eval_cudnn_benchmark, on a GPU only) and puts training's back afterwards."""
    from kdbench.engine import evaluate
    from kdbench.recipe import EvalConfig

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return {"out": self.conv(x)}

    data = [(torch.randn(3, 4, 4), torch.zeros(4, 4, dtype=torch.long))] * 2
    before = torch.backends.cudnn.benchmark
    try:
        for training, asked in ((True, False), (False, True), (True, True)):
            torch.backends.cudnn.benchmark = training
            evaluate(Probe(), data, 2, EvalConfig(), rt=Runtime(eval_cudnn_benchmark=asked))
            assert seen[-2:] == [asked, asked] and torch.backends.cudnn.benchmark is training
    finally:
        torch.backends.cudnn.benchmark = before
    assert not make_runtime(load_recipe("tiny", ["runtime.eval_cudnn_benchmark=true", "runtime.device=cpu"]).runtime).eval_cudnn_benchmark


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_cuda_asked_for_without_a_gpu_is_a_user_error():
    for setting in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=f"runtime.device: '{setting}' asked for, but torch .* sees no GPU; use --device cpu"):
            resolve_device(setting)


def test_processes_training_side_by_side_share_the_cores_between_their_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    # cores // processes, at least one; the cores are read each time (the affinity can change)
    for cores, processes, threads in ((6, 2, 3), (6, 4, 1), (6, 8, 1), (4, 2, 2)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        with sharing_cores(processes) as env:
            assert torch.get_num_threads() == threads and env["OMP_NUM_THREADS"] == str(threads)
        assert torch.get_num_threads() == before
    with sharing_cores(1) as env:  # alone: torch's default, nothing passed on
        assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in env
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's setting wins
    with sharing_cores(2) as env:
        assert torch.get_num_threads() == before and env["OMP_NUM_THREADS"] == "5"


def test_step_slices_split_each_global_batch_over_processes():
    one = list(StepSlices(3, 6, batch_size=4))
    assert one == list(range(12, 24))
    for world in (2, 4):
        parts = [list(StepSlices(3, 6, 4, rank, world)) for rank in range(world)]
        local = 4 // world
        for step in range(3):  # rank slices of each step, in rank order, are that step's global batch
            joined = [i for p in parts for i in p[step * local : (step + 1) * local]]
            assert joined == one[step * 4 : (step + 1) * 4]
        assert all(len(p) == len(StepSlices(3, 6, 4, r, world)) == 3 * local for r, p in enumerate(parts))


# ---------------------------------------------------------------------------------------------
# loss math in float32 under autocast


def _maps(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


def _loss_cases():
    s, t = _maps(0, 2, 5, 6, 6), _maps(1, 2, 5, 6, 6)
    labels = torch.randint(0, 5, (2, 12, 12), generator=torch.Generator().manual_seed(2))
    labels[0, :3] = 255
    near = s + 1e-3 * _maps(3, 2, 5, 6, 6)  # almost the teacher: a KL near 0, where bf16 went negative
    return {
        "kd": (kd_loss, (s, t), {"temperature": 2.0}),
        "kd_near": (kd_loss, (near, s), {}),
        "cwd": (cwd_loss, (s, t), {"temperature": 4.0}),
        "cwd_near": (cwd_loss, (near, s), {"temperature": 4.0}),
        "soft_ce": (soft_cross_entropy, (s, t), {}),
        "pairwise": (pairwise_loss, (s, t), {"pool_kernel": 2}),
        "ifv": (ifv_loss, (s, t, labels, 5), {}),
        "attnfd_batch": (attnfd_distance, (s, t), {"normalize": "batch"}),
        "attnfd_channel": (attnfd_distance, (s, t), {"normalize": "channel"}),
        "hinge": (hinge_d_loss, (t[:, :1], s[:, :1]), {}),
        "wgan": (wgan_d_loss, (t[:, :1], s[:, :1]), {}),
        "generator": (generator_loss, (s[:, :1],), {}),
    }


@pytest.mark.parametrize("name", list(_loss_cases()))
def test_every_loss_is_computed_in_float32_under_bf16_autocast(name):
    """bf16 inputs under autocast give exactly the float32 loss of those (rounded) inputs."""
    fn, args, kwargs = _loss_cases()[name]
    half = [a.bfloat16() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    rounded = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in half]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*half, **kwargs)
    want = fn(*rounded, **kwargs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    if name.endswith("_near") or name.startswith(("kd", "cwd")):
        assert got.item() >= 0  # a KL divergence


# ---------------------------------------------------------------------------------------------
# every method's step in bf16 against fp32

ALL = [(cls, p) for cls in registry().values() for p in ["default", *cls.presets]]


def _state(cls, preset, rt):
    torch.manual_seed(0)
    student, teacher = FakeSegNet(S_CH), FakeSegNet(T_CH)
    teacher.eval().requires_grad_(False)
    method = build(cls, preset, teacher_taps=("backbone", "encoder", "decoder") if preset == "paper" else ())
    params = list(student.parameters()) + method.student_parameters()
    optimizer = torch.optim.SGD(params, lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return TrainState(student, method, teacher, optimizer, scheduler, total_steps=4, runtime=rt)


@pytest.mark.parametrize("cls,preset", ALL, ids=[f"{c.name}-{p}" for c, p in ALL])
def test_bf16_step_of_every_method_matches_fp32(cls, preset):
    """The first step's loss terms under CPU bf16 autocast: finite, and within 3% (or 2e-3) of fp32.
    bf16 keeps 8 bits of mantissa, so the models' outputs differ by about 0.5% and the losses by
    about as much; a loss computed in bf16 itself (the KL of two near-equal maps) misses by far more."""
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    target = torch.randint(0, NUM_CLASSES, (2, 16, 16), generator=torch.Generator().manual_seed(6))
    fp32 = train_step(_state(cls, preset, Runtime()), images, target)
    bf16 = train_step(_state(cls, preset, Runtime(precision="bf16")), images, target)
    assert fp32.keys() == bf16.keys()
    assert any(float(fp32[k]) != float(bf16[k]) for k in fp32)  # autocast did run
    for key in fp32:
        a, b = float(fp32[key]), float(bf16[key])
        assert math.isfinite(b), key
        assert abs(a - b) <= 0.03 * abs(a) + 2e-3, (key, a, b)


def test_fp16_step_uses_a_grad_scaler_for_the_student_and_the_discriminator():
    cls = registry()["skd"]
    state = _state(cls, "paper", Runtime(precision="fp16"))  # WGAN-GP: a double backward in D's step
    before = copy.deepcopy(state.student.state_dict())
    images, target = torch.randn(2, 3, 16, 16), torch.randint(0, NUM_CLASSES, (2, 16, 16))
    logged = train_step(state, images, target)
    assert all(math.isfinite(float(v)) for v in logged.values())
    assert set(state.runtime.scaler_states()) == {"student", "discriminator"}
    assert any(not torch.equal(before[k], v) for k, v in state.student.state_dict().items())


def test_compiled_step_trains_like_the_eager_step_and_checkpoints_the_modules(monkeypatch):
    """torch.compile of student, teacher and method (``compile``), and of the method alone
    (``compile_method``), traced by dynamo as in a run. No inductor (its C++ code generation takes
    about 90 s cold on this CPU, which the suite cannot afford): the graphs run on the ``eager``
    backend (dynamo's capture, guards and wrappers), the discriminator's on ``aot_eager``, whose
    AOTAutograd traces the backward too, as inductor would (every graph on aot_eager: 23 s
    instead of 16). The first step's losses agree to 2%; the checkpoint keys are the modules'
    own, never the compiled wrappers'."""
    import functools

    compile_ = torch.compile

    def backend(name: str) -> None:
        monkeypatch.setattr(torch, "compile", functools.partial(compile_, backend=name))

    from kdbench.engine import build_state, state_dict
    from kdbench.methods import method_for, resolve_config
    from kdbench.models import build_model

    recipe = load_recipe("tiny")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 9, (4, 32, 32), generator=torch.Generator().manual_seed(2))

    def first_step(rt, name="kd", preset=None):
        torch.manual_seed(0)
        teacher = build_model(recipe.teacher, 9).eval().requires_grad_(False)
        student = build_model(recipe.student, 9)
        method = method_for(name, resolve_config(name, preset, {})[1], student, teacher, 9)
        state = build_state(student, method, teacher, recipe.train, rt)
        return state, {k: float(v) for k, v in train_step(state, images, target).items()}

    def agree(compiled, eager):
        for key, value in eager.items():
            assert math.isfinite(compiled[key]) and abs(compiled[key] - value) <= 0.02 * abs(value), key

    _, eager = first_step(Runtime())
    backend("eager")
    state, compiled = first_step(Runtime(compile=True))
    assert state.student_forward is not state.student  # the step really ran the compiled form
    agree(compiled, eager)
    assert not any("_orig_mod" in k for k in state_dict(state)["student"])
    # compile_method: only the method's forward (AttnFD's CBAMs, connectors and distances)
    _, eager = first_step(Runtime(), "attnfd")
    state, compiled = first_step(Runtime(compile_method=True), "attnfd")
    assert state.method_forward is not state.method and state.student_forward is state.student
    assert state.teacher_forward is state.teacher
    agree(compiled, eager)
    assert not any("_orig_mod" in k for k in state_dict(state)["method"])
    # a discriminator's student term is one graph too: D's parameters detached, not D's flags toggled
    from torch._dynamo.utils import counters

    _, eager = first_step(Runtime(), "cwd", "cirkd")
    backend("aot_eager")
    counters.clear()
    state, compiled = first_step(Runtime(compile_method=True), "cwd", "cirkd")
    agree(compiled, eager)
    assert "loss/adv" in compiled and not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
