"""Write the CIRKD key/shape manifests that tests/test_released_cirkd.py checks kdbench against.

Run ONCE by hand against the released code, never from the tests (they read only the JSON files).
It copies the three files that define CIRKD's DeepLabV3 on ResNet "v1s" backbones out of a checkout
of github.com/winycg/CIRKD into a temporary package, imports them with torch, builds the released
model classes (19 classes, output stride 8, no pretrained file read) and records every state_dict
key with its shape and the parameter count:

    cirkd_deeplabv3_resnet18.json     DeepLabV3(backbone="resnet18",  aux=False) (student)
    cirkd_deeplabv3_resnet101.json    DeepLabV3(backbone="resnet101", aux=False) (teacher)
    cirkd_resnet18_v1s_backbone.json  resnet18_v1s(dilated=True), and the same for resnet101: the
    cirkd_resnet101_v1s_backbone.json layout CIRKD expects of its ImageNet files resnet18-imagenet.pth
                                      and resnet101-imagenet.pth (its loader keeps the keys of this
                                      model; an ImageNet file may add a classifier fc.*)

The model files carry ``aux_state_dict``: the extra ``auxlayer.*`` keys of the same model built
with aux=True, which is how CIRKD trains and saves ResNet teachers and students (train_kd.py builds
the teacher with aux=True and sets aux=True for ResNet students), so released ``*_best_model.pth``
files hold them.

Rerun (from the kdbench root), with either a work tree or a bare git directory of CIRKD:

    git clone https://github.com/winycg/CIRKD /tmp/CIRKD
    python tests/manifests/make_cirkd_manifest.py --src /tmp/CIRKD
    python tests/manifests/make_cirkd_manifest.py --git-dir /path/to/CIRKD.git [--rev <sha>]

With ``--check`` it also builds kdbench's variant (kdbench.models.cirkd_deeplab), loads the released
model's random weights into it through ``from_released`` and compares eval-mode outputs (logits, the
distilled feature, and layer4 of the v1s backbone loaded through ``from_released_backbone``) on a
random image: a check of behaviour, not only of names and shapes. Needs kdbench importable (run from
its root).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# the released files the model comes from (nothing else of CIRKD is imported)
FILES = ("models/deeplabv3.py", "models/segbase.py", "models/base_models/resnetv1b.py")
NUM_CLASSES = 19
OUTPUT_STRIDE = 8  # ResNetV1b(dilated=True): layer3 and layer4 keep stride 8


def _read_sources(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    if args.git_dir:
        git = ["git", f"--git-dir={args.git_dir}"]
        sha = subprocess.run([*git, "rev-parse", args.rev], check=True, capture_output=True, text=True).stdout.strip()
        text = {f: subprocess.run([*git, "show", f"{sha}:{f}"], check=True, capture_output=True, text=True).stdout for f in FILES}
        return text, sha
    src = Path(args.src)
    sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {f: (src / f).read_text() for f in FILES}, sha or "unknown"


def _import_released(text: dict[str, str], root: Path):
    """A package ``cirkd_released`` with just the three files; the packages' __init__ files stay
    empty (CIRKD's model_zoo imports every model, SegFormer and MobileViT included, unrelated here)."""
    pkg = root / "cirkd_released"
    for rel, body in text.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    for init in (pkg / "__init__.py", pkg / "models" / "__init__.py", pkg / "models" / "base_models" / "__init__.py"):
        init.write_text("")
    sys.path.insert(0, str(root))
    return importlib.import_module("cirkd_released.models.deeplabv3"), importlib.import_module(
        "cirkd_released.models.base_models.resnetv1b"
    )


def _build(deeplab, backbone: str, aux: bool) -> torch.nn.Module:
    # pretrained / pretrained_base = the string 'None' is CIRKD's own "load no file" switch
    return deeplab.get_deeplabv3(backbone=backbone, pretrained="None", pretrained_base="None", num_class=NUM_CLASSES, aux=aux)


def _shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _write(name: str, sha: str, files: list[str], backbone: str, module: torch.nn.Module, extra: dict) -> None:
    doc = {
        "source": "github.com/winycg/CIRKD",
        "commit": sha,
        "files": files,
        "backbone": backbone,
        "classes": NUM_CLASSES,
        "output_stride": OUTPUT_STRIDE,
        "parameters": sum(p.numel() for p in module.parameters()),
        **extra,
        "state_dict": _shapes(module),
    }
    (HERE / name).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{name}: {doc['parameters']:,} parameters, {len(doc['state_dict'])} keys")


def _check(deeplab, resnet, backbone: str) -> None:
    """Released model with random weights vs kdbench's variant loaded through from_released."""
    from kdbench.models import cirkd_deeplab

    torch.manual_seed(0)
    ref = _build(deeplab, backbone, aux=True)  # aux=True: the released forward needs it (see below)
    with torch.no_grad():  # random BN statistics, so eval mode is not an identity
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    ours = cirkd_deeplab.create(backbone, NUM_CLASSES)
    ours.load_state_dict(cirkd_deeplab.from_released(ref.state_dict()), strict=True)
    ref.eval(), ours.eval()
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        logits, _aux, feat = ref(x)  # with aux=False the released forward returns an unbound name
        out = ours(x)
    for name, a, b in (("logits", logits, out["logits"]), ("decoder", feat, out["decoder"])):
        err = (a - b).abs().max().item()
        print(f"check {backbone} {name}: {tuple(a.shape)} max |diff| {err:.2e}")
        assert a.shape == b.shape and err < 1e-4, (backbone, name, err)
    up = torch.nn.functional.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=True)
    print(f"check {backbone} out (align_corners=True upsampling): max |diff| {(up - out['out']).abs().max().item():.2e}")
    # the ImageNet backbone layout: ResNetV1b's own forward vs timm's, weights through from_released_backbone
    net = getattr(resnet, f"{backbone}_v1s")(pretrained="None", dilated=True)
    net.load_state_dict(ref.pretrained.state_dict())
    net.eval()
    ours.backbone.load_state_dict(cirkd_deeplab.from_released_backbone(net.state_dict()), strict=True)
    with torch.no_grad():
        err = (net(x) - ours.backbone(x)[-1]).abs().max().item()
    print(f"check {backbone}_v1s backbone file: layer4 max |diff| {err:.2e}")
    assert err < 1e-4, (backbone, "backbone", err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--src", help="a work tree of github.com/winycg/CIRKD")
    where.add_argument("--git-dir", help="a (bare) git directory of github.com/winycg/CIRKD")
    ap.add_argument("--rev", default="HEAD", help="commit to read with --git-dir (default HEAD)")
    ap.add_argument("--check", action="store_true", help="also compare outputs with kdbench's variant")
    args = ap.parse_args()
    text, sha = _read_sources(args)
    with tempfile.TemporaryDirectory(prefix="cirkd_") as tmp:
        deeplab, resnet = _import_released(text, Path(tmp))
        for backbone in ("resnet18", "resnet101"):
            plain, with_aux = _build(deeplab, backbone, aux=False), _build(deeplab, backbone, aux=True)
            aux_keys = {k: v for k, v in _shapes(with_aux).items() if k.startswith("auxlayer.")}
            _write(f"cirkd_deeplabv3_{backbone}.json", sha, list(FILES), backbone, plain, {"aux": False, "aux_state_dict": aux_keys})
        for depth in (18, 101):
            net = getattr(resnet, f"resnet{depth}_v1s")(pretrained="None", dilated=True)
            fn = {"function": f"resnet{depth}_v1s(dilated=True)"}
            _write(f"cirkd_resnet{depth}_v1s_backbone.json", sha, [FILES[2]], f"resnet{depth}", net, fn)
        if args.check:
            for backbone in ("resnet18", "resnet101"):
                _check(deeplab, resnet, backbone)


if __name__ == "__main__":
    main()
