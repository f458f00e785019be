"""Released teacher files through `teacher.checkpoint`: AttnFD's ``teacher-pascal.pth.tar`` (a dict
with ``state_dict``, saved from DataParallel, with a numpy ``best_pred``) and CIRKD's
``*_best_model.pth`` (a bare state_dict with its auxiliary head), made here from the key/shape
manifests of the released model definitions; and a run on the released models end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdbench.errors import UserError
from kdbench.recipe import load_recipe
from kdbench.run import load_teacher, run

MANIFESTS = Path(__file__).parent / "manifests"


def _released_weights(name: str, key: str = "state_dict") -> dict[str, torch.Tensor]:
    manifest = json.loads((MANIFESTS / name).read_text())
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) if shape else torch.tensor(7) for k, shape in manifest[key].items()}


def test_attnfd_teacher_file_as_released_loads_with_its_cbams(tmp_path):
    weights = _released_weights("attnfd_deeplabv3plus_resnet18.json")
    path = tmp_path / "teacher-pascal.pth.tar"
    torch.save({"epoch": 120, "state_dict": {f"module.{k}": v for k, v in weights.items()}, "best_pred": np.float64(0.7781)}, path)
    recipe = load_recipe("voc_r101_r18", [f"teacher.checkpoint={path}", "teacher.backbone=resnet18"])
    teacher, _ = load_teacher(recipe, path, 21)
    state = teacher.state_dict()
    assert torch.equal(state["classifier.weight"], weights["decoder.last_conv.8.weight"])
    cbam = [k for k in weights if k.startswith("aspp.cbam.ChannelGate.mlp.") and k.endswith("weight")][0]
    assert any(torch.equal(v, weights[cbam]) for k, v in state.items() if k.startswith("attention.encoder."))
    out = teacher(torch.randn(1, 3, 33, 33))
    assert out["out"].shape == (1, 21, 33, 33) and out["encoder"].shape[1] == 256


def test_cirkd_teacher_file_as_released_loads_without_its_auxiliary_head(tmp_path):
    weights = {**_released_weights("cirkd_deeplabv3_resnet18.json"), **_released_weights("cirkd_deeplabv3_resnet18.json", "aux_state_dict")}
    path = tmp_path / "deeplabv3_resnet18_citys_best_model.pth"
    torch.save(weights, path)
    recipe = load_recipe("cirkd_cityscapes_r101_r18", [f"teacher.checkpoint={path}", "teacher.backbone=resnet18", "student.pretrained=false"])
    teacher, _ = load_teacher(recipe, path, 19)
    assert teacher.arch == "deeplabv3_cirkd" and sum(p.numel() for p in teacher.parameters()) == 22_614_099
    assert torch.equal(teacher.state_dict()["backbone.conv1.0.weight"], weights["pretrained.conv1.weight"])
    # a file of the other release is one line naming the file, not a traceback
    attnfd = load_recipe("voc_r101_r18", [f"teacher.checkpoint={path}", "teacher.backbone=resnet18"])
    with pytest.raises(UserError, match=r"^teacher\.checkpoint: .*deeplabv3_resnet18_citys_best_model\.pth: "):
        load_teacher(attnfd, path, 21)


@pytest.mark.parametrize(
    "arch, sets",
    [
        ("deeplabv3plus_attnfd", ["method.name=attnfd", "method.preset=code", "method.teacher_attention=pretrained"]),
        ("deeplabv3_cirkd", ["method.name=cwd", "method.preset=cirkd"]),
    ],
)
def test_the_released_models_train_and_distil_end_to_end(workdir, arch, sets):
    models = [f"{r}.{k}={v}" for r in ("teacher", "student") for k, v in (("arch", arch), ("backbone", "resnet18"), ("aspp_channels", 16), ("decoder_channels", 16))]
    recipe = load_recipe("tiny", [*models, *sets, "train.iterations=2", "teacher.iterations=2", "student.attention_taps=[]"])
    result = run(recipe, quiet=True)
    assert 0.0 <= result.metrics.miou <= 1.0 and result.checkpoint.is_file()


def test_imagenet_backbone_files_of_both_releases(tmp_path):
    import timm

    from kdbench.models import create_model

    # AttnFD's ResNets load torchvision's ImageNet files: torchvision's keys, the classifier included
    torchvision_style = timm.create_model("resnet18", pretrained=False).state_dict()
    assert "fc.weight" in torchvision_style and "layer4.1.bn2.running_var" in torchvision_style
    path = tmp_path / "resnet18-5c106cde.pth"
    torch.save(torchvision_style, path)
    model = create_model("deeplabv3plus_attnfd", "resnet18", 21, pretrained=str(path), attention_taps=())
    assert torch.equal(model.backbone.state_dict()["layer4.1.conv2.weight"], torchvision_style["layer4.1.conv2.weight"])
    # CIRKD's v1s files (resnetv1b.py keys: a three-conv stem conv1..3 / bn1..3)
    v1s = _released_weights("cirkd_resnet18_v1s_backbone.json")
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(v1s, path)
    model = create_model("deeplabv3_cirkd", "resnet18", 19, output_stride=8, pretrained=str(path))
    assert torch.equal(model.backbone.state_dict()["conv1.3.weight"], v1s["conv2.weight"])


def test_aspp_dropout_false_is_the_released_distillation_path():
    from kdbench.models import build_model

    recipe = load_recipe("voc_r101_r18", ["student.pretrained=false", "teacher.backbone=resnet18"])
    assert build_model(recipe.student, 21).kd_path and build_model(recipe.teacher, 21, pretrained=False).kd_path
    assert not build_model(load_recipe("voc_r101_r18", ["student.pretrained=false", "student.aspp_dropout=true"]).student, 21).kd_path
    with pytest.raises(UserError, match=r"student\.aspp_dropout: .*only arch deeplabv3plus_attnfd"):
        load_recipe("tiny", ["student.aspp_dropout=false"])
