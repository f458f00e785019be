"""What `kdbench bench` times: which rows, on which recipe (the timing itself: test_cli)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from kdbench.bench import EvalRow, Row, TeacherInTrainMode, bench_recipe, benchmark, plan, time_evaluation
from kdbench.engine import build_state, train_step
from kdbench.errors import UserError
from kdbench.methods import registry
from kdbench.methods.base import FeatureSpec
from kdbench.models import build_model
from kdbench.runtime import make_runtime

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_benches_without_its_weights_files(name):
    """CIRKD's recipe names an ImageNet file that a GPU machine for timing does not have."""
    rows = plan(bench_recipe(name, []), None)
    assert rows[0].method == "floor" and rows[0].preset == "-"
    for method in registry():  # every method, each with exactly one row a plain run would time
        mine = [r for r in rows if r.method == method]
        assert mine and sum(r.runs_by_default for r in mine) == 1, (method, [r.preset for r in mine])


def test_presets_with_the_same_options_are_one_row_and_one_can_be_asked_for():
    recipe = bench_recipe("tiny", [])
    rows = {(r.method, r.preset) for r in plan(recipe, ["kd", "cwd:pure", "skd:paper", "skd:pure"])}
    # kd's cirkd preset is its defaults; cwd's paper and pure presets are the same values (w 3, T 4)
    assert rows == {("floor", "-"), ("kd", "default = cirkd*"), ("cwd", "default = paper = pure*"), ("skd", "paper"), ("skd", "pure")}
    assert len(plan(recipe, ["skd:pure", "skd"])) == 1 + 3  # the whole method wins over one preset of it
    # a recipe that sets a method's options moves the '*' to the row a run would get
    starred = [r.preset for r in plan(bench_recipe("tiny", ["methods.cwd.preset=cirkd"]), ["cwd"]) if r.runs_by_default]
    assert starred == ["cirkd*"]


@pytest.mark.parametrize(
    "asked, message",
    [(["magic"], "--method: unknown method 'magic'"), (["skd:nope"], "--method skd:nope: 'skd' has no preset 'nope'; choose one of default, cirkd, paper, pure")],
)
def test_an_unknown_method_or_preset_is_one_clear_line(asked, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
        plan(bench_recipe("tiny", []), asked)


@pytest.mark.parametrize(
    "row, flagged",
    [
        (Row("kd", ratio=[1.05, 1.10, 1.07]), False),  # clearly dearer than the floor
        (Row("kd", ratio=[0.98, 1.04, 1.01]), True),  # the spread reaches 1
        (Row("kd", ratio=[0.89, 0.92, 0.95]), True),  # below the floor in every round: noise, not a speed-up
        (Row("none", needs_teacher=False, ratio=[0.71, 0.74, 0.76]), False),  # no teacher forward: truly cheaper
        (Row("floor", ratio=[1.0, 1.0, 1.0]), False),
    ],
)
def test_a_ratio_the_noise_could_explain_is_flagged(row, flagged):
    assert row.overlaps_floor is flagged


def test_evaluation_is_timed_per_image_through_the_eval_loader_at_each_batch_size():
    """Each loader passes once untimed, then once per round; batches hold up to eval.batch_size
    images of the asked size, as a run's evaluation of same-sized images would."""
    recipe = bench_recipe("tiny", ["eval.batch_size=4"])
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 1)

        def forward(self, x):
            seen.append(tuple(x.shape))
            return {"out": self.conv(x)}

    rows = [EvalRow(1), EvalRow(4)]
    time_evaluation(recipe, Probe(), make_runtime(recipe.runtime), 5, rows, 10, (24, 40), rounds=2)
    one, four = [(1, 3, 24, 40)] * 10, [(4, 3, 24, 40)] * 2 + [(2, 3, 24, 40)]
    assert seen == one + four + (one + four) * 2
    assert [len(r.ms) for r in rows] == [2, 2] and all(ms > 0 for r in rows for ms in [*r.ms, r.first_ms])


def test_a_method_that_runs_the_teacher_in_train_mode_gets_a_floor_that_does_too():
    """AttnFD's ``code`` preset runs the teacher in train mode (the released code): its cost over the
    floor splits into that mode's and its distillation terms', each against a floor timed alike."""
    recipe = bench_recipe("tiny", [])
    result = benchmark(recipe, ["attnfd:code", "kd"], steps=1, rounds=2, warmup=1, loader_batches=0, quiet=True)
    rows = {(r.method, r.preset): r for r in result.rows}
    assert list(rows)[:2] == [("floor", "-"), ("floor", "teacher in train mode")]
    train_floor, code, kd = rows["floor", "teacher in train mode"], rows["attnfd", "code"], rows["kd", "default = cirkd*"]
    assert code.train_floor_ratio == [a / b for a, b in zip(code.ms, train_floor.ms)] and len(code.ms) == 2
    assert kd.train_floor_ratio == [] and train_floor.ratio == [a / b for a, b in zip(train_floor.ms, rows["floor", "-"].ms)]
    as_json = {(r["method"], r["preset"]): r for r in result.to_dict()["rows"]}
    assert as_json["attnfd", "code"]["x_train_floor"]["rounds"] == code.train_floor_ratio and as_json["kd", kd.preset]["x_train_floor"] is None
    # no method asks for it: no such row
    assert [r.preset for r in benchmark(recipe, ["kd"], steps=1, rounds=1, warmup=0, loader_batches=0, quiet=True).rows] == ["-", "default = cirkd*"]

    # the row's step does run the teacher in train mode: its BatchNorm statistics move, the plain floor's do not
    recipe = bench_recipe("tiny", ["train.iterations=2"])
    images, target = torch.randn(2, 3, 32, 32), torch.randint(0, 9, (2, 32, 32))
    moved = []
    for method in (None, TeacherInTrainMode):
        torch.manual_seed(0)
        student, teacher = build_model(recipe.student, 9, pretrained=False), build_model(recipe.teacher, 9, pretrained=False).eval()
        m = method(None, FeatureSpec.of(student, 9), FeatureSpec.of(teacher, 9)) if method else None
        before = [b.clone() for b in teacher.buffers()]
        train_step(build_state(student, m, teacher, recipe.train, make_runtime(recipe.runtime)), images, target)
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, teacher.buffers())))
        assert not teacher.training  # back in eval mode after the step
    assert moved == [False, True]
