"""Models expose the same named features, at the expected sizes, for any timm backbone."""

import pytest
import torch

from kdbench.errors import UserError
from kdbench.models import FEATURE_NAMES, create_model

SMALL = dict(aspp_channels=16, decoder_channels=16, low_channels=8)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2_050"])
@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv3"])
@pytest.mark.parametrize("os_", [8, 16])
def test_named_features_and_shapes(backbone, arch, os_):
    model = create_model(arch, backbone, num_classes=5, output_stride=os_, **SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert set(FEATURE_NAMES) | {"out"} == set(out)
    assert out["out"].shape == (2, 5, 64, 64)
    assert out["backbone"].shape[-2:] == out["encoder"].shape[-2:] == (64 // os_, 64 // os_)
    assert out["low"].shape[-2:] == (16, 16)
    dec = (16, 16) if arch == "deeplabv3plus" else (64 // os_, 64 // os_)
    assert out["decoder"].shape[-2:] == out["logits"].shape[-2:] == dec
    for name, c in model.feature_channels.items():
        assert out[name].shape[1] == c, name
    assert model.feature_channels["encoder"] == 16 and model.feature_channels["logits"] == 5


def test_param_groups_split_backbone_and_head():
    model = create_model("deeplabv3plus", "resnet10t", 3, **SMALL)
    backbone, head = model.param_groups()
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters()}


def test_attention_taps_refine_features_inside_forward():
    torch.manual_seed(0)
    plain = create_model("deeplabv3plus", "resnet10t", 3, **SMALL)
    torch.manual_seed(0)
    attn = create_model("deeplabv3plus", "resnet10t", 3, attention_taps=("backbone", "decoder"), **SMALL)
    assert set(attn.attention) == {"backbone", "decoder"}
    assert sum(p.numel() for p in attn.parameters()) > sum(p.numel() for p in plain.parameters())
    x = torch.randn(2, 3, 32, 32)
    attn.load_state_dict({**attn.state_dict(), **plain.state_dict()})
    plain.eval(), attn.eval()
    a, p = attn(x), plain(x)
    assert not torch.allclose(a["backbone"], p["backbone"])
    assert torch.equal(a["low"], p["low"])


def test_local_pretrained_weights(tmp_path):
    src = create_model("deeplabv3plus", "resnet10t", 3, **SMALL)
    path = tmp_path / "backbone.pth"
    torch.save(src.backbone.state_dict(), path)
    dst = create_model("deeplabv3plus", "resnet10t", 3, pretrained=str(path), **SMALL)
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(v, dst.backbone.state_dict()[k])
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="does not fit the backbone"):
        create_model("deeplabv3plus", "resnet10t", 3, pretrained=str(path), **SMALL)


def test_bad_backbone_is_a_user_error():
    with pytest.raises(UserError, match="timm has no model 'resnet_nope'"):
        create_model("deeplabv3plus", "resnet_nope", 3)
    with pytest.raises(UserError, match="unknown architecture"):
        create_model("pspnet", "resnet18", 3)
