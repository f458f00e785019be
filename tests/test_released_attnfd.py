"""kdbench.models.attnfd_deeplab against the released AttnFD DeepLabV3+ (github.com/AmirMansurian/AttnFD).

The manifests (tests/manifests/attnfd_deeplabv3plus_*.json) were made once from the released code by
tests/manifests/make_attnfd_manifest.py (which also compares outputs numerically, with --check);
these tests read only the JSON files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from kdbench.errors import UserError
from kdbench.models.attnfd_deeplab import create, from_released, pre_relu_stages, released_dilations

MANIFESTS = Path(__file__).parent / "manifests"
PARAMETERS = {"resnet18": 16_658_721, "resnet101": 59_888_001}  # the release at 21 classes, OS16, three CBAMs


def manifest(backbone: str) -> dict:
    return json.loads((MANIFESTS / f"attnfd_deeplabv3plus_{backbone}.json").read_text())


def released_state(backbone: str) -> dict[str, torch.Tensor]:
    """A state_dict in the released layout; each tensor filled with its own index, to trace where it lands."""
    shapes = manifest(backbone)["state_dict"]
    return {k: torch.full(s, float(i)) for i, (k, s) in enumerate(shapes.items())}


@pytest.fixture(scope="module")
def r101():
    torch.manual_seed(0)
    return create("resnet101", 21).eval()


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return create("resnet18", 21).eval()


@pytest.fixture(scope="module")
def models(r18, r101):
    return {"resnet18": r18, "resnet101": r101}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet101"])
def test_parameter_count_is_the_released_one(models, backbone):
    m = manifest(backbone)
    assert (m["commit"], m["classes"], m["output_stride"]) == ("f090bbe02dead3fe453ad6aa3c5c085cde16c933", 21, 16)
    count = sum(p.numel() for p in models[backbone].parameters())
    assert count == m["parameters"] == PARAMETERS[backbone]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet101"])
def test_from_released_maps_every_key_onto_the_variant(models, backbone):
    model = copy.deepcopy(models[backbone])
    state = released_state(backbone)
    mapped = from_released(state)
    ours = model.state_dict()
    assert set(mapped) == set(ours)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    model.load_state_dict(mapped, strict=True)
    # each released tensor sits in one place, and same-shaped ones are not swapped (checked by meaning below)
    where = {float(v.flatten()[0]): k for k, v in model.state_dict().items() if v.numel()}
    index = {k: i for i, k in enumerate(state)}
    assert len(where) == sum(1 for v in state.values() if v.numel())
    assert where[index["aspp.cbam.ChannelGate.mlp.1.weight"]] == "attention.encoder.channel_gate.mlp.1.weight"
    assert where[index["decoder.cbam.SpatialGate.spatial.bn.weight"]] == "attention.decoder.spatial_gate.bn.weight"
    assert where[index["backbone.cbam.ChannelGate.mlp.3.bias"]] == "attention.backbone.channel_gate.mlp.3.bias"
    assert where[index["decoder.last_conv.8.bias"]] == "classifier.bias"
    modules = dict(model.named_modules())
    for k, i in index.items():  # ASPP branch n of the release has rate (1, 6, 12, 18)[n - 1]
        if k.startswith("aspp.aspp") and k.endswith("atrous_conv.weight"):
            conv = modules[where[i].removesuffix(".weight")]
            assert conv.dilation[0] == (1, 6, 12, 18)[int(k[len("aspp.aspp")]) - 1]
    # a released conv and the BatchNorm after it stay neighbours: decoder.last_conv.0/1 and .4/.5
    for conv, bn in [("decoder.last_conv.0", "decoder.last_conv.1"), ("decoder.last_conv.4", "decoder.last_conv.5")]:
        c, b = where[index[f"{conv}.weight"]].rsplit(".", 2), where[index[f"{bn}.weight"]].rsplit(".", 2)
        assert c[0] == b[0] and int(b[1]) == int(c[1]) + 1


def test_from_released_fills_num_batches_tracked():
    state = {k: v for k, v in released_state("resnet18").items() if not k.endswith("num_batches_tracked")}
    mapped = from_released(state)
    assert mapped["backbone.bn1.num_batches_tracked"].item() == 0


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda s: s.pop("aspp.aspp3.bn.running_mean"), "aspp.aspp3.bn.running_mean"),
        (lambda s: s.pop("decoder.cbam.ChannelGate.mlp.3.weight"), "decoder.cbam.ChannelGate.mlp.3.weight"),
        (lambda s: s.__setitem__("decoder.last_conv.9.weight", torch.zeros(1)), "decoder.last_conv.9.weight"),
        (lambda s: s.__setitem__("backbone.fc.weight", torch.zeros(1)), "backbone.fc.weight"),
        (lambda s: s.__setitem__("module.aspp.conv1.weight", s.pop("aspp.conv1.weight")), "module.aspp.conv1.weight"),
        (lambda s: s.__setitem__("aspp.bn1.bias", torch.zeros(255)), "aspp.bn1.bias"),
        (lambda s: s.pop("backbone.layer4.1.conv2.weight"), "backbone.layer4.1.conv2.weight"),
    ],
    ids=["missing", "missing-cbam", "unknown", "unexpected", "prefixed", "mis-shaped", "missing-backbone"],
)
def test_from_released_names_a_wrong_or_missing_key(edit, named):
    state = released_state("resnet18")
    edit(state)
    with pytest.raises(UserError, match=named.replace(".", r"\.")) as err:
        from_released(state)
    assert "\n" not in str(err.value)


def test_from_released_rejects_a_backbone_that_is_no_resnet():
    state = {k: v for k, v in released_state("resnet18").items() if not k.startswith("backbone.layer4.1.")}
    with pytest.raises(UserError, match=r"\[2, 2, 2, 1\] basic blocks"):
        from_released(state)


@pytest.mark.parametrize("backbone, low, high", [("resnet18", 64, 512), ("resnet101", 256, 2048)])
def test_feature_shapes_at_output_stride_16(models, backbone, low, high):
    model = models[backbone]
    with torch.no_grad():
        y = model(torch.randn(1, 3, 65, 65))
    shapes = {k: tuple(v.shape) for k, v in y.items()}
    assert shapes == {
        "out": (1, 21, 65, 65),
        "logits": (1, 21, 17, 17),
        "low": (1, low, 17, 17),
        "backbone": (1, high, 5, 5),
        "encoder": (1, 256, 5, 5),
        "decoder": (1, 256, 17, 17),
    }
    assert model.feature_channels == {"low": low, "backbone": high, "encoder": 256, "decoder": 256, "logits": 21}
    assert (model.arch, model.num_classes, model.output_stride) == ("deeplabv3plus_attnfd", 21, 16)
    assert model.attention_taps == ("backbone", "encoder", "decoder")
    backbone_params, head = model.param_groups()
    assert {id(p) for p in backbone_params} == {id(p) for p in model.backbone.parameters()}
    assert len(backbone_params) + len(head) == len(list(model.parameters()))


def test_released_dilations_multi_grid_and_strides():
    with torch.device("meta"):
        r101_16, r101_8 = create("resnet101", 21), create("resnet101", 21, output_stride=8)
        r18_16 = create("resnet18", 21)
    assert [b.conv2.dilation for b in r101_16.backbone.layer4] == [(2, 2), (4, 4), (8, 8)]
    assert [b.conv2.padding for b in r101_16.backbone.layer4] == [(2, 2), (4, 4), (8, 8)]
    assert {b.conv2.dilation for b in r101_16.backbone.layer3} == {(1, 1)}
    assert r101_16.backbone.layer4[0].conv2.stride == (1, 1) and r101_16.backbone.layer3[0].conv2.stride == (2, 2)
    assert [b.conv2.dilation for b in r101_8.backbone.layer4] == [(4, 4), (8, 8), (16, 16)]
    assert {b.conv2.dilation for b in r101_8.backbone.layer3} == {(2, 2)}  # the first block too (timm: 1)
    assert [(b.conv1.dilation, b.conv2.dilation) for b in r18_16.backbone.layer4] == [((2, 2), (2, 2))] * 2  # no multi-grid
    assert r18_16.backbone.layer4[0].conv1.padding == (2, 2)
    assert [m.convs[i][0].dilation for m in [r101_16.aspp] for i in range(1, 4)] == [(6, 6), (12, 12), (18, 18)]
    assert [r101_8.aspp.convs[i][0].dilation for i in range(1, 4)] == [(12, 12), (24, 24), (36, 36)]


def test_init_dropout_and_cbam_as_released(r101):
    assert all(bool((b[-1].bn3.weight == 1).all()) for b in [r101.backbone.layer1, r101.backbone.layer4])  # no zero-init
    assert (r101.aspp_dropout.p, r101.decoder[1].p, r101.decoder_dropout.p) == (0.5, 0.5, 0.1)
    cbam = r101.attention["encoder"]
    assert cbam.spatial_gate.bn.momentum == 0.01
    assert [type(m).__name__ for m in cbam.channel_gate.mlp] == ["Flatten", "Linear", "ReLU", "Linear"]


def test_pre_relu_stages_change_nothing_but_the_stage_outputs():
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", features_only=True, out_indices=(1, 4), output_stride=16, zero_init_last=False)
    released_dilations(plain, 16)
    ours = copy.deepcopy(plain)
    pre_relu_stages(ours)
    plain.eval(), ours.eval()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        got, ref = ours(x), plain(x)
    for a, b in zip(got, ref):
        assert a.min() < 0 <= b.min()
        torch.testing.assert_close(F.relu(a), b)


def test_backbone_feature_is_before_the_relu_and_the_aspp_gets_it_after(r18):
    model = copy.deepcopy(r18)
    model.attention = torch.nn.ModuleDict()  # raw features in the dict
    seen = {}
    model.aspp.register_forward_pre_hook(lambda m, a: seen.__setitem__("aspp", a[0]))
    model.project.register_forward_pre_hook(lambda m, a: seen.__setitem__("project", a[0]))
    with torch.no_grad():
        y = model(torch.randn(1, 3, 65, 65))
    assert y["backbone"].min() < 0
    torch.testing.assert_close(seen["aspp"], F.relu(y["backbone"]))
    assert y["low"].min() >= 0 and seen["project"] is y["low"]


def test_upsampling_uses_align_corners(r18):
    model = copy.deepcopy(r18)
    model.attention = torch.nn.ModuleDict()
    seen = {}
    model.decoder.register_forward_pre_hook(lambda m, a: seen.__setitem__("decoder", a[0]))
    with torch.no_grad():
        y = model(torch.randn(1, 3, 65, 65))
        up = F.interpolate(y["encoder"], size=(17, 17), mode="bilinear", align_corners=True)
        out = F.interpolate(y["logits"], size=(65, 65), mode="bilinear", align_corners=True)
    torch.testing.assert_close(seen["decoder"][:, :256], up)
    torch.testing.assert_close(y["out"], out)
    assert not torch.allclose(y["out"], F.interpolate(y["logits"], size=(65, 65), mode="bilinear"), atol=1e-4)


def test_cbams_are_side_branches_and_refine_the_returned_features(r18):
    plain = copy.deepcopy(r18)
    plain.attention = torch.nn.ModuleDict()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        a, b = r18(x), plain(x)
        torch.testing.assert_close(a["out"], b["out"])  # the prediction never passes through a CBAM
        torch.testing.assert_close(a["low"], b["low"])
        for tap in ("backbone", "encoder", "decoder"):
            torch.testing.assert_close(a[tap], r18.attention[tap](b[tap]))


def test_kd_path_skips_the_aspp_dropout(r18):
    model = copy.deepcopy(r18).train()
    model.attention = torch.nn.ModuleDict()
    model.decoder[1].p = model.decoder_dropout.p = 0.0  # only the ASPP dropout left
    seen = {}
    model.decoder.register_forward_pre_hook(lambda m, a: seen.__setitem__("decoder", a[0]))
    x = torch.randn(2, 3, 33, 33)
    for kd_path in (False, True):
        model.kd_path = kd_path
        with torch.no_grad():
            y = model(x)
            up = F.interpolate(y["encoder"], size=seen["decoder"].shape[-2:], mode="bilinear", align_corners=True)
        assert torch.allclose(seen["decoder"][:, :256], up) == kd_path


def test_bad_arguments_are_user_errors():
    for kwargs, match in [
        ({"backbone": "mobilenetv2_100"}, "plain timm ResNet"),
        ({"backbone": "resnet18", "output_stride": 32}, "output_stride"),
        ({"backbone": "resnet18", "attention_taps": ("low",)}, "attention_taps"),
    ]:
        with pytest.raises(UserError, match=match):
            create(num_classes=21, **kwargs)
