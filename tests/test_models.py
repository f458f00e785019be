"""Models expose the same named features, at the expected sizes, for any timm backbone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from kdbench.errors import UserError
from kdbench.models import CBAM, FEATURE_NAMES, create_model
from kdbench.models.cbam import channel_descriptors, spatial_descriptor

SMALL = dict(aspp_channels=16, decoder_channels=16, low_channels=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP's spin-waiting on a busy 2-core machine
    makes a 3 ms forward take seconds (unless OMP_WAIT_POLICY=passive is set before torch loads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2_050"])
@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv3"])
@pytest.mark.parametrize("os_", [8, 16])
def test_named_features_and_shapes(backbone: str, arch: str, os_: int) -> None:
    model = create_model(arch, backbone, num_classes=5, output_stride=os_, **SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert set(out) == set(FEATURE_NAMES) | {"out"}
    assert out["out"].shape == (2, 5, 64, 64)
    assert out["backbone"].shape[-2:] == out["encoder"].shape[-2:] == (64 // os_, 64 // os_)
    assert out["low"].shape[-2:] == (16, 16)
    dec = (16, 16) if arch == "deeplabv3plus" else (64 // os_, 64 // os_)
    assert out["decoder"].shape[-2:] == out["logits"].shape[-2:] == dec
    assert set(model.feature_channels) == set(FEATURE_NAMES)
    for name, c in model.feature_channels.items():
        assert out[name].shape[1] == c, name
    assert model.feature_channels["encoder"] == 16 and model.feature_channels["logits"] == model.num_classes == 5


@pytest.mark.parametrize(
    "backbone, low, high",
    [("resnet18", 64, 512), ("resnet50", 256, 2048), ("mobilenetv2_100", 24, 320), ("convnext_atto", 40, 320)],
)
def test_taps_chosen_by_reduction_across_families(backbone: str, low: int, high: int) -> None:
    # os 8 reports capped reductions (2, 4, 8, 8, 8); ConvNeXt has 4 levels starting at stride 4
    model = create_model("deeplabv3plus", backbone, 3, output_stride=8, **SMALL)
    assert (model.feature_channels["low"], model.feature_channels["backbone"]) == (low, high)
    assert model.backbone.feature_info.reduction()[model.low_index] == 4


def test_reference_module_names_and_aspp_rates() -> None:
    plus = create_model("deeplabv3plus", "resnet10t", 3, output_stride=8, **SMALL)
    names = {n for n, _ in plus.named_children()}
    assert {"backbone", "aspp", "project", "decoder", "classifier"} <= names
    assert [b[0].dilation[0] for b in plus.aspp.convs[1:4]] == [12, 24, 36]
    v3 = create_model("deeplabv3", "resnet10t", 3, output_stride=16, **SMALL)
    assert not hasattr(v3, "project")
    assert [b[0].dilation[0] for b in v3.aspp.convs[1:4]] == [6, 12, 18]


def test_training_step_reaches_backbone_and_attention() -> None:
    model = create_model("deeplabv3", "resnet10t", 3, attention_taps=("backbone", "encoder", "decoder"), **SMALL)
    out = model(torch.randn(2, 3, 32, 32))
    out["out"].sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_param_groups_split_backbone_and_head() -> None:
    model = create_model("deeplabv3plus", "resnet10t", 3, attention_taps=("encoder",), **SMALL)
    backbone, head = model.param_groups()
    assert len(backbone) + len(head) == len(list(model.parameters()))
    assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in model.attention.parameters()} <= {id(p) for p in head}


def test_cbam_is_channel_then_spatial_gate() -> None:
    cbam = CBAM(64).eval()
    assert cbam.channel_gate.mlp[0].out_channels == 4  # 64 // 16
    assert CBAM(8).channel_gate.mlp[0].out_channels == 1
    conv = cbam.spatial_gate.conv
    assert conv.weight.shape == (1, 2, 7, 7) and conv.bias is None and conv.padding == (3, 3)
    x = torch.randn(2, 64, 5, 6)
    mc, ms = cbam.attention_maps(x)
    assert mc.shape == (2, 64, 1, 1) and ms.shape == (2, 1, 5, 6)
    torch.testing.assert_close(cbam(x), x * mc * ms)
    avg, mx = channel_descriptors(x)
    assert torch.equal(mx, x.amax(dim=(2, 3), keepdim=True))
    assert torch.equal(spatial_descriptor(x)[:, 0], x.amax(dim=1))


def test_attention_taps_refine_features_inside_forward() -> None:
    torch.manual_seed(0)
    plain = create_model("deeplabv3plus", "resnet10t", 3, **SMALL)
    attn = create_model("deeplabv3plus", "resnet10t", 3, attention_taps=("backbone", "decoder"), **SMALL)
    assert set(attn.attention) == {"backbone", "decoder"} and attn.attention_taps == ("backbone", "decoder")
    assert sum(p.numel() for p in attn.parameters()) > sum(p.numel() for p in plain.parameters())
    attn.load_state_dict({**attn.state_dict(), **plain.state_dict()})  # same weights apart from the CBAMs
    plain.eval(), attn.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, p = attn(x), plain(x)
        # the refined map is returned under the tap's name and is what flows onward
        torch.testing.assert_close(a["backbone"], attn.attention["backbone"](p["backbone"]))
    assert torch.equal(a["low"], p["low"])
    assert not torch.allclose(a["encoder"], p["encoder"])
    assert not torch.allclose(a["out"], p["out"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_pretrained_weights_round_trip(tmp_path, suffix: str) -> None:
    torch.manual_seed(0)
    src = create_model("deeplabv3plus", "mobilenetv2_050", 3, **SMALL).eval()
    state = {k: v for k, v in src.backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["classifier.weight"] = torch.zeros(1000, 8)  # extra keys (a classifier) are fine
    path = tmp_path / f"backbone{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    torch.manual_seed(1)
    dst = create_model("deeplabv3plus", "mobilenetv2_050", 3, pretrained=str(path), **SMALL).eval()
    head = {k: v for k, v in src.state_dict().items() if not k.startswith("backbone.")}
    dst.load_state_dict(head, strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x)["out"], src(x)["out"], rtol=0, atol=0)


def test_broken_pretrained_files_are_user_errors(tmp_path) -> None:
    good = create_model("deeplabv3plus", "resnet10t", 3, **SMALL).backbone.state_dict()
    path = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in good.items() if not k.startswith("layer4.")}, path)
    with pytest.raises(UserError, match=r"backbone.pth does not fit the backbone .*missing \['layer4"):
        create_model("deeplabv3plus", "resnet10t", 3, pretrained=str(path), **SMALL)
    torch.save({**good, "conv1.0.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match=r"mis-shaped \['conv1.0.weight'\]"):
        create_model("deeplabv3plus", "resnet10t", 3, pretrained=path, **SMALL)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        create_model("deeplabv3plus", "resnet10t", 3, pretrained=str(path), **SMALL)
    with pytest.raises(UserError, match="not found"):
        create_model("deeplabv3plus", "resnet10t", 3, pretrained=str(tmp_path / "nope.pth"), **SMALL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backbone="resnet_nope"), r"timm has no model 'resnet_nope' \(see timm.list_models"),
        (dict(arch="pspnet"), "unknown architecture 'pspnet'"),
        (dict(output_stride=32), "output_stride: must be 8 or 16"),
        (dict(attention_taps=("low",)), "attention_taps: unknown taps"),
    ],
)
def test_bad_configuration_is_a_user_error(kwargs: dict, message: str) -> None:
    args = {"arch": "deeplabv3plus", "backbone": "resnet10t", **kwargs}
    with pytest.raises(UserError, match=message):
        create_model(args.pop("arch"), args.pop("backbone"), 3, **args)


class _Probe(torch.nn.Module):
    """A strided conv, a dilated grouped conv, a BatchNorm and a matrix product: multiply-adds by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 8 x 10 -> 4 x 5
        self.b = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)  # 4 x 5 -> 4 x 5
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.b(self.a(x)))
        return self.fc(y.flatten(2).transpose(1, 2))  # each of the 20 positions: 4 -> 6


def test_multiply_adds_by_hand_without_computing_anything() -> None:
    from kdbench.models.complexity import multiply_adds

    probe = _Probe().train()
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    # a: 20 positions x 4 out x 3 in x 9; b: 20 x 4 out x (4 / 2 groups) in x 9; fc: 20 x 6 x 4
    assert multiply_adds(probe, (8, 10)) == 20 * 4 * 3 * 9 + 20 * 4 * 2 * 9 + 20 * 6 * 4 == 4080
    assert probe.training and all(torch.equal(v, before[k]) for k, v in probe.state_dict().items())  # BN statistics untouched
    model = create_model("deeplabv3plus", "resnet18", num_classes=5, **SMALL)
    assert multiply_adds(model, (64, 96)) > 1.4 * multiply_adds(model, (64, 64))  # grows with the image
