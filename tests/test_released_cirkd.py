"""kdbench's CIRKD DeepLabV3 variant against the released code's layout (tests/manifests/cirkd_*.json).

The manifests were written once from github.com/winycg/CIRKD by tests/manifests/make_cirkd_manifest.py
(which also compared outputs with the released model); these tests read only the JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import UserError
from kdbench.models import cirkd_deeplab
from kdbench.models.cirkd_deeplab import create, from_released, from_released_backbone

MANIFESTS = Path(__file__).parent / "manifests"
COUNTS = {"resnet18": 22_614_099, "resnet101": 76_719_571}  # CIRKD DeepLabV3, 19 classes, no aux head
WIDTH = {"resnet18": (64, 512), "resnet101": (256, 2048)}  # (layer1, layer4) channels


def _manifest(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())


def _random_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        k: torch.randint(0, 100, (), dtype=torch.long) if k.endswith("num_batches_tracked") else torch.randn(s, generator=gen)
        for k, s in shapes.items()
    }


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {b: create(b, 19) for b in COUNTS}


@pytest.mark.parametrize("backbone", sorted(COUNTS))
def test_parameter_count_is_cirkds(models, backbone):
    n = sum(p.numel() for p in models[backbone].parameters())
    doc = _manifest(f"cirkd_deeplabv3_{backbone}.json")
    assert n == COUNTS[backbone] == doc["parameters"]
    assert (doc["classes"], doc["output_stride"], doc["backbone"]) == (19, 8, backbone)
    backbone_doc = _manifest(f"cirkd_{backbone}_v1s_backbone.json")
    assert sum(p.numel() for p in models[backbone].backbone.parameters()) == backbone_doc["parameters"]


# released key -> kdbench key, for tensors whose shapes alone would not tell a swap
PAIRS = {
    "pretrained.conv1.weight": "backbone.conv1.0.weight",
    "pretrained.bn1.running_mean": "backbone.conv1.1.running_mean",
    "pretrained.conv2.weight": "backbone.conv1.3.weight",
    "pretrained.bn2.weight": "backbone.conv1.4.weight",
    "pretrained.conv3.weight": "backbone.conv1.6.weight",
    "pretrained.bn3.bias": "backbone.bn1.bias",
    "pretrained.layer3.1.conv1.weight": "backbone.layer3.1.conv1.weight",
    "head.aspp.b0.0.weight": "aspp.convs.0.0.weight",
    "head.aspp.b1.block.0.weight": "aspp.convs.1.0.weight",  # rate 12
    "head.aspp.b2.block.0.weight": "aspp.convs.2.0.weight",  # rate 24
    "head.aspp.b3.block.0.weight": "aspp.convs.3.0.weight",  # rate 36
    "head.aspp.b3.block.1.running_var": "aspp.convs.3.1.running_var",
    "head.aspp.b4.gap.1.weight": "aspp.convs.4.conv.0.weight",
    "head.aspp.b4.gap.2.weight": "aspp.convs.4.conv.1.weight",
    "head.aspp.project.0.weight": "aspp.project.0.0.weight",
    "head.aspp.project.1.bias": "aspp.project.0.1.bias",
    "head.block.0.weight": "decoder.0.0.weight",
    "head.block.1.running_mean": "decoder.0.1.running_mean",
    "head.block.4.weight": "classifier.weight",
    "head.block.4.bias": "classifier.bias",
}


@pytest.mark.parametrize("backbone", sorted(COUNTS))
def test_from_released_maps_the_manifest_exactly(models, backbone):
    doc = _manifest(f"cirkd_deeplabv3_{backbone}.json")
    assert doc["aux_state_dict"], "released ResNet checkpoints carry an auxiliary head"
    state = _random_state({**doc["state_dict"], **doc["aux_state_dict"]})
    mapped = from_released(state)
    model = models[backbone]
    ours = model.state_dict()
    assert list(mapped) == list(ours)
    assert {k: list(v.shape) for k, v in mapped.items()} == {k: list(v.shape) for k, v in ours.items()}
    # one released tensor per key, none reused, none lost but the auxiliary head
    assert len({id(v) for v in mapped.values()}) == len(mapped) == len(doc["state_dict"])
    assert not {id(state[k]) for k in doc["aux_state_dict"]} & {id(v) for v in mapped.values()}
    for old, new in PAIRS.items():
        assert mapped[new] is state[old], (old, new)
    if backbone == "resnet101":  # the bottleneck's conv3/bn3 must not be taken for the stem's
        assert mapped["backbone.layer1.0.conv3.weight"] is state["pretrained.layer1.0.conv3.weight"]
        assert mapped["backbone.layer2.3.bn3.weight"] is state["pretrained.layer2.3.bn3.weight"]
    with torch.device("meta"):  # a strict load without copying 77M numbers (or touching `models`)
        target = create(backbone, 19)
    target.load_state_dict(mapped, strict=True, assign=True)
    assert torch.equal(target.classifier.weight, state["head.block.4.weight"])


@pytest.mark.parametrize("backbone", sorted(COUNTS))
def test_from_released_backbone_maps_the_v1s_file(models, backbone):
    doc = _manifest(f"cirkd_{backbone}_v1s_backbone.json")
    shapes = dict(doc["state_dict"])
    shapes.update({"fc.weight": [1000, WIDTH[backbone][1]], "fc.bias": [1000]})  # an ImageNet file's classifier
    state = _random_state(shapes)
    mapped = from_released_backbone(state)
    ours = models[backbone].backbone.state_dict()
    assert {k: list(v.shape) for k, v in mapped.items()} == {k: list(v.shape) for k, v in ours.items()}
    assert len({id(v) for v in mapped.values()}) == len(mapped) == len(doc["state_dict"])
    for old, new in PAIRS.items():
        if old.startswith("pretrained."):
            assert mapped[new.removeprefix("backbone.")] is state[old.removeprefix("pretrained.")]
    if backbone == "resnet101":
        assert mapped["layer4.2.conv3.weight"] is state["layer4.2.conv3.weight"]
    with torch.device("meta"):
        target = create(backbone, 19).backbone
    target.load_state_dict(mapped, strict=True, assign=True)


def test_backbone_file_without_num_batches_tracked_still_loads():
    doc = _manifest("cirkd_resnet18_v1s_backbone.json")
    state = {k: v for k, v in _random_state(doc["state_dict"]).items() if not k.endswith("num_batches_tracked")}
    mapped = from_released_backbone(state)
    assert mapped["bn1.num_batches_tracked"].item() == 0
    assert len(mapped) == len(doc["state_dict"])


def test_pretrained_file_in_cirkds_layout(tmp_path):
    doc = _manifest("cirkd_resnet18_v1s_backbone.json")
    state = _random_state(doc["state_dict"])
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    model = create("resnet18", 19, pretrained=str(path))
    assert torch.equal(model.backbone.conv1[6].weight, state["conv3.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    del state["layer2.0.downsample.0.weight"]
    torch.save(state, path)
    with pytest.raises(UserError, match=r"layer2\.0\.downsample\.0\.weight"):
        create("resnet18", 19, pretrained=str(path))


@pytest.mark.parametrize("backbone", sorted(COUNTS))
def test_features_at_output_stride_8(models, backbone):
    model = models[backbone].eval()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        out = model(x)
    low, high = WIDTH[backbone]
    # 33 -> 17 (stem) -> 9 (max pool, stride 4) -> 5 (layer2, stride 8; layer3/4 dilated)
    expect = {
        "out": (1, 19, 33, 33),
        "logits": (1, 19, 5, 5),
        "low": (1, low, 9, 9),
        "backbone": (1, high, 5, 5),
        "encoder": (1, 512, 5, 5),
        "decoder": (1, 512, 5, 5),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == expect
    assert model.feature_channels == {"low": low, "backbone": high, "encoder": 512, "decoder": 512, "logits": 19}
    assert (model.arch, model.num_classes, model.output_stride, model.attention_taps) == ("deeplabv3_cirkd", 19, 8, ())
    # CIRKD upsamples its stride-8 logits with align_corners=True (SegCrossEntropyLoss, evaluation)
    assert torch.allclose(out["out"], F.interpolate(out["logits"], (33, 33), mode="bilinear", align_corners=True))
    assert torch.allclose(out["logits"], model.classifier(out["decoder"]))
    bb, head = model.param_groups()
    assert len(bb) + len(head) == len(list(model.parameters()))
    assert {id(p) for p in bb} == {id(p) for p in model.backbone.parameters()}


def test_features_are_taken_after_dropout_in_training():
    """CIRKD distils the head feature after its Dropout(0.1), exactly what the classifier sees; the
    ASPP output comes after Dropout(0.5)."""
    torch.manual_seed(0)
    model = create("resnet18", 19).train()
    pre = {}
    model.aspp.project[0].register_forward_hook(lambda m, i, o: pre.__setitem__("encoder", o.clone()))
    model.decoder[0].register_forward_hook(lambda m, i, o: pre.__setitem__("decoder", o.clone()))
    out = model(torch.randn(2, 3, 33, 33))
    assert torch.allclose(out["logits"], model.classifier(out["decoder"]))
    for name, p in (("encoder", 0.5), ("decoder", 0.1)):
        kept = out[name] != 0
        assert torch.allclose(out[name], torch.where(kept, pre[name] / (1 - p), 0.0)), name
        dropped = ((pre[name] != 0) & ~kept).float().sum() / (pre[name] != 0).float().sum()
        assert abs(dropped.item() - p) < 0.05, (name, dropped.item())


def test_deep_stem_and_dilation_are_v1s(models):
    for backbone, model in models.items():
        stem = model.backbone.conv1
        convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
        assert [tuple(c.weight.shape) for c in convs] == [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
        assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1)]
        assert model.backbone.bn1.num_features == 128
        assert model.backbone.layer1[0].conv1.in_channels == 128
        # resnetv1b.py, dilated=True: the first block of a dilated stage starts at the previous rate
        net = model.backbone
        k = "conv2" if backbone == "resnet101" else "conv1"  # the block's first 3x3 conv
        assert [getattr(net.layer3[i], k).dilation for i in (0, 1)] == [(1, 1), (2, 2)]
        assert [getattr(net.layer4[i], k).dilation for i in (0, 1)] == [(2, 2), (4, 4)]
        if backbone == "resnet18":
            assert [net.layer4[i].conv2.dilation for i in (0, 1)] == [(4, 4), (4, 4)]


def test_head_is_cirkds(models):
    model = models["resnet18"]
    assert [model.aspp.convs[i][0].dilation for i in (1, 2, 3)] == [(12, 12), (24, 24), (36, 36)]
    assert model.aspp.project[1].p == 0.5 and model.decoder[1].p == 0.1
    assert type(model.aspp.convs[4]).__name__ == "_Pooling"
    # PyTorch's default init (CIRKD's head has none): uniform, std 1/sqrt(3 fan_in); He-normal is 2.4x that
    w = model.decoder[0][0].weight
    assert w.std().item() == pytest.approx((3 * w[0].numel()) ** -0.5, rel=0.05)
    assert model.classifier.bias.abs().max() > 0
    # CIRKD's zero_init_residual=False: the last BN of each block starts at 1 (timm's default is 0)
    assert torch.all(model.backbone.layer1[0].bn2.weight == 1)
    assert torch.all(models["resnet101"].backbone.layer1[0].bn3.weight == 1)


def test_attention_taps():
    model = create("resnet18", 19, attention_taps=("encoder", "decoder")).eval()
    assert set(model.attention) == {"encoder", "decoder"} and model.attention_taps == ("encoder", "decoder")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 33))
    assert torch.allclose(out["logits"], model.classifier(out["decoder"]))
    with pytest.raises(UserError, match="attention_taps"):
        create("resnet18", 19, attention_taps=("logits",))


def test_bad_arguments():
    with pytest.raises(UserError, match="backbone"):
        create("mobilenetv2_100", 19)
    with pytest.raises(UserError, match="pretrained"):
        create("resnet18", 19, pretrained=True)
    with pytest.raises(UserError, match="output_stride"):
        create("resnet18", 19, output_stride=32)


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    doc = _manifest("cirkd_deeplabv3_resnet18.json")
    return _random_state({**doc["state_dict"], **doc["aux_state_dict"]})


def test_unknown_key_is_named(r18_state):
    state = dict(r18_state)
    state["head.block.5.weight"] = state.pop("head.block.4.weight")
    with pytest.raises(UserError, match=r"head\.block\.5\.weight") as err:
        from_released(state)
    assert "\n" not in str(err.value)


def test_stray_key_under_a_known_prefix_is_named(r18_state):
    state = dict(r18_state)
    state["pretrained.layer1.0.bn1.extra"] = torch.zeros(64)
    with pytest.raises(UserError, match=r"extra .*layer1\.0\.bn1\.extra"):
        from_released(state)


def test_missing_key_is_named(r18_state):
    state = dict(r18_state)
    del state["pretrained.layer2.1.bn1.running_var"]
    with pytest.raises(UserError, match=r"missing .*layer2\.1\.bn1\.running_var"):
        from_released(state)


def test_misshaped_key_is_named(r18_state):
    state = dict(r18_state)
    state["head.aspp.b2.block.0.weight"] = torch.zeros(512, 512, 1, 1)
    with pytest.raises(UserError, match=r"mis-shaped .*aspp\.convs\.2\.0\.weight"):
        from_released(state)


def test_backbone_file_errors_name_the_key():
    doc = _manifest("cirkd_resnet18_v1s_backbone.json")
    state = _random_state(doc["state_dict"])
    with pytest.raises(UserError, match=r"layer5\.0\.conv1\.weight"):
        from_released_backbone({**state, "layer5.0.conv1.weight": torch.zeros(1)})
    del state["bn3.running_mean"]
    with pytest.raises(UserError, match=r"missing .*bn1\.running_mean"):
        from_released_backbone(state)
    # a head checkpoint is not a backbone file
    with pytest.raises(UserError, match="pretrained"):
        from_released_backbone({"pretrained.conv1.weight": torch.zeros(64, 3, 3, 3)})


def test_module_says_what_it_reproduces():
    doc = cirkd_deeplab.__doc__
    sha = _manifest("cirkd_deeplabv3_resnet18.json")["commit"]
    assert sha in doc and "winycg/CIRKD" in doc
    for f in _manifest("cirkd_deeplabv3_resnet18.json")["files"]:
        assert f in doc
