"""Recipe loading: overrides, method resolution, and one-line errors for bad input."""

from pathlib import Path

import pytest

from kdbench.errors import UserError
from kdbench.recipe import load_recipe, teacher_key, teacher_recipe


def test_default_and_tiny_recipes_load():
    r = load_recipe()
    assert r.data.dataset == "synthetic"
    t = load_recipe("tiny")
    assert t.train.iterations < r.train.iterations
    assert t.method.name == "kd" and t.method.preset == "cirkd"
    # the resolved method section carries every hyper-parameter, so MLflow logs all of them
    assert t.method.params == {"weight": 1.0, "temperature": 1.0, "mask_ignore": False, "on": "logits"}


@pytest.mark.parametrize("name", ["voc_r101_r18", "voc_r101_mbv2", "cityscapes_r101_r18", "cityscapes_r101_mbv2", "cirkd_cityscapes_r101_r18"])
def test_paper_recipes_are_valid(name, tmp_path):
    weights = tmp_path / "resnet18-imagenet.pth"  # CIRKD's student starts from a file of its release
    weights.touch()
    r = load_recipe(name, [f"student.pretrained={weights}"] if name.startswith("cirkd") else [])
    assert r.teacher.backbone == "resnet101"


def test_overrides_and_types():
    r = load_recipe("tiny", ["train.lr=0.02", "train.crop_size=[16, 24]", "method.temperature=4", "data.flip=false"])
    assert r.train.lr == 0.02 and r.train.crop_size == (16, 24)
    assert r.method.params["temperature"] == 4.0 and r.data.flip is False
    assert load_recipe("tiny", ["train.lr=1"]).train.lr == 1.0  # an int where a float is expected is fine


def test_switching_method_drops_the_other_methods_hyperparameters():
    r = load_recipe("tiny", method="none")
    assert r.method.name == "none" and r.method.params == {}
    with pytest.raises(UserError, match="method.temperature: unknown hyper-parameter of 'none'"):
        load_recipe("tiny", ["method.temperature=4"], method="none")
    r = load_recipe("tiny", ["method.temperature=4"], method="kd", seed=3)
    assert r.method.params["temperature"] == 4.0 and r.seed == 3


def test_a_benchmarks_per_method_settings_apply_to_that_method_only():
    settings = ["methods.skd.adv_width=8", "methods.skd.pair_weight=3"]
    r = load_recipe("tiny", settings, method="skd", preset="paper")
    # over the preset (paper sets pair_weight 0.5), and logged with the run
    assert r.method.params["adv_width"] == 8 and r.method.params["pair_weight"] == 3.0
    assert r.method.params["adv_loss"] == "wgan-gp" and r.methods == {"skd": {"adv_width": 8, "pair_weight": 3}}
    # --set on the method section wins over the benchmark's setting
    assert load_recipe("tiny", [*settings, "method.adv_width=4"], method="skd").method.params["adv_width"] == 4
    assert "adv_width" not in load_recipe("tiny", settings, method="kd").method.params
    # the shipped default benchmark halves CIRKD's discriminator for its 8x8 logits
    assert load_recipe(method="ifvd").method.params["adv_width"] == 32


def test_hash_depends_on_values_and_teacher_key_ignores_student():
    a, b = load_recipe("tiny"), load_recipe("tiny", ["train.lr=0.5"])
    assert a.hash() != b.hash()
    c = load_recipe("tiny", ["student.backbone=resnet18", "seed=5"])
    assert teacher_key(a) == teacher_key(c)
    assert teacher_key(a) != teacher_key(load_recipe("tiny", ["teacher.iterations=9"]))


def test_teacher_learns_from_the_teacher_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    clean = load_recipe("tiny")
    noisy = load_recipe("tiny", ["data.synthetic.label_noise=0.7"])
    assert noisy.hash() != clean.hash()
    # the student's noisy labels are not the teacher's: it learns from the clean ones (one teacher for both)
    assert teacher_recipe(noisy).data.synthetic.label_noise == 0.0 and teacher_recipe(clean) is clean
    assert teacher_key(noisy) == teacher_key(clean)
    both = load_recipe("tiny", ["data.synthetic.label_noise=0.7", "data.synthetic.teacher_label_noise=0.7"])
    assert teacher_recipe(both) is both and teacher_key(both) != teacher_key(clean)
    with pytest.raises(UserError, match=r"^data.synthetic.teacher_label_noise: a probability in \[0, 1\], got 2.0"):
        load_recipe("tiny", ["data.synthetic.teacher_label_noise=2"])
    # a teacher of other images is another teacher: the generator's version is part of the key
    before = teacher_key(clean)
    monkeypatch.setattr("kdbench.data.synthetic.GENERATOR_VERSION", -1)
    assert teacher_key(clean) != before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=0.1"], r"^train.lrr: unknown key"),
        (["train.lr=fast"], r"^train.lr: expected float, got 'fast'"),
        (["train.iterations=0"], r"^train.iterations: must be positive"),
        (["train.crop_size=[32]"], r"^train.crop_size: expected a list of 2 values"),
        (["student.output_stride=32"], r"^student.output_stride: expected one of 8, 16"),
        (["data.dataset=coco"], r"^data.dataset: expected one of 'synthetic', 'voc', 'cityscapes'"),
        (["data.holdout_fraction=1.5"], r"^data.holdout_fraction: must be in \[0, 1\)"),
        (["teacher.checkpoint=/nonexistent/t.pt"], r"^teacher.checkpoint: no checkpoint file /nonexistent/t.pt"),
        (["data.root=/nonexistent/voc"], r"^data.root: no folder"),
        (["method.name=magic"], r"^method: unknown method 'magic'"),
        (["method.preset=nope"], r"^method.preset: method 'kd' has no preset 'nope'"),
        (["method.tau=3"], r"^method.tau: unknown hyper-parameter of 'kd'"),
        (["method.temperature=hot"], r"^method.temperature: expected float"),
        (["student.attention_taps=[low]"], r"^student.attention_taps: unknown taps"),
        (["train=3"], r"^train: expected a section"),
        (["methods.magic.x=1"], r"^methods.magic: unknown method; choose one of"),
        (["methods.skd.tau=3"], r"^methods.skd.tau: unknown hyper-parameter of 'skd'"),
        (["methods.skd.adv_width=wide"], r"^methods.skd.adv_width: expected int"),
        (["methods.kd=3"], r"^methods.kd: expected a mapping"),
        (["train.lr"], r"expected KEY=VALUE"),
    ],
)
def test_bad_values_are_one_clear_line(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        load_recipe("tiny", overrides)
    assert "\n" not in str(err.value)


def test_missing_and_broken_recipe_files(tmp_path: Path):
    with pytest.raises(UserError, match="no recipe named 'nosuch'"):
        load_recipe("nosuch")
    with pytest.raises(UserError, match="no recipe file"):
        load_recipe(str(tmp_path / "x.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(UserError, match="a recipe is a mapping"):
        load_recipe(str(listy))


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    """PyYAML alone reads 1e-3 as a string; learning rates are written that way."""
    r = load_recipe("tiny", ["train.lr=1e-3", "train.weight_decay=5E-4", "method.temperature=2e0"])
    assert (r.train.lr, r.train.weight_decay, r.method.params["temperature"]) == (0.001, 0.0005, 2.0)
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 2e-2\n")
    assert load_recipe(str(path)).train.lr == 0.02
    with pytest.raises(UserError, match="train.iterations: expected int, got 10.0"):  # a float, not a count
        load_recipe(str(path), ["train.iterations=1e1"])


def test_keys_added_later_leave_existing_hashes_alone_until_set():
    base = load_recipe("default")
    hashed = base.hashed_dict()
    assert "select" not in hashed["train"] and "blur" not in hashed["data"] and "resize_short" not in hashed["eval"]
    changes = (["train.select=best"], ["data.blur=0.5"], ["data.scale_mode=short_side", "data.scale_range=[48,96]"], ["data.pad_label=0"], ["eval.resize_short=32"])
    for overrides in changes:
        assert load_recipe("default", overrides).hash() != base.hash(), overrides
    # the teacher trains without evaluations, so which evaluation a run reports is not the teacher's business
    assert teacher_key(load_recipe("default", ["train.select=best"])) == teacher_key(base)
    assert teacher_key(load_recipe("default", ["data.blur=0.5"])) != teacher_key(base)
