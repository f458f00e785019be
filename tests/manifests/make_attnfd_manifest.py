"""Write the key/shape manifests of the released AttnFD DeepLabV3+ (run by hand, once; never imported by tests).

The tests in tests/test_released_attnfd.py read the JSON files next to this script; they never
import the released code. To remake the manifests from the released code:

    git clone https://github.com/AmirMansurian/AttnFD /tmp/AttnFD
    git -C /tmp/AttnFD checkout f090bbe02dead3fe453ad6aa3c5c085cde16c933
    .venv/bin/python tests/manifests/make_attnfd_manifest.py --src /tmp/AttnFD [--check]
    .venv/bin/python tests/manifests/make_attnfd_manifest.py --git-dir /path/to/AttnFD.git [--rev SHA] [--check]

(run from the kdbench root; ``--commit`` names the commit of a --src tree that is not a git checkout).

Needs torch and torchvision (the released resnet.py imports torchvision). The released model is
built exactly as train.py / train_kd.py build it (``DeepLab(num_classes=21, backbone=...,
output_stride=16, sync_bn=False)``; sync_bn only swaps the BatchNorm class, not the keys), with two
stubs for things unrelated to the model definition: ``cv2`` (imported by modeling/deeplab.py, unused)
and the ImageNet download in ``ResNet._load_pretrained_model`` (switched off: random init).

``--check`` also compares kdbench's variant with the released model numerically: the released
model's random weights go through ``from_released`` into ``create(...)``, and the outputs of
``DeepLab.forward`` and the CBAM maps of ``DeepLab.extract_feature`` (what distiller.py distils) are
compared with the variant's, in eval mode, for both backbones at output strides 16 and 8.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FILES = [
    "modeling/deeplab.py",
    "modeling/aspp.py",
    "modeling/decoder.py",
    "modeling/backbone/__init__.py",
    "modeling/backbone/resnet.py",
    "cbam.py",
]
BACKBONES = ("resnet18", "resnet101")


def released_model(src: Path, backbone: str, output_stride: int = 16, classes: int = 21) -> torch.nn.Module:
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # imported by modeling/deeplab.py, unused
    from modeling.backbone import resnet
    from modeling.deeplab import DeepLab

    resnet.ResNet._load_pretrained_model = lambda self: None  # no ImageNet download: random init
    return DeepLab(backbone=backbone, output_stride=output_stride, num_classes=classes, sync_bn=False, freeze_bn=False)


def manifest(src: Path, commit: str, backbone: str) -> dict:
    model = released_model(src, backbone)
    return {
        "source": "github.com/AmirMansurian/AttnFD",
        "commit": commit,
        "files": FILES,
        "backbone": backbone,
        "classes": 21,
        "output_stride": 16,
        "parameters": sum(p.numel() for p in model.parameters()),
        "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
    }


def check(src: Path, backbone: str, output_stride: int) -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    from kdbench.models.attnfd_deeplab import create, from_released

    torch.manual_seed(0)
    ref = released_model(src, backbone, output_stride).eval()
    for m in ref.modules():  # non-trivial BatchNorm statistics, so that eval mode tests them too
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(1.0, 3.0)
    ours = create(backbone, 21, output_stride=output_stride).eval()
    ours.load_state_dict(from_released(ref.state_dict()), strict=True)
    x = torch.randn(2, 3, 97, 81)
    with torch.no_grad():
        out_ref = ref(x)
        _, attens, out_kd = ref.extract_feature(x)
        got = ours(x)
    worst = {}
    pairs = {
        "out": (got["out"], out_ref),
        "out (extract_feature)": (got["out"], out_kd),
        "backbone": (got["backbone"], attens[0]),
        "encoder": (got["encoder"], attens[1]),
        "decoder": (got["decoder"], attens[2]),
    }
    for name, (a, b) in pairs.items():  # relative to the map's largest value: random-init ResNet-101 maps reach 1e5
        assert a.shape == b.shape, f"{backbone} OS{output_stride} {name}: shapes {a.shape} vs {b.shape}"
        worst[name] = f"{float((a - b).abs().max() / b.abs().max()):.1e}"
        assert float(worst[name]) < 1e-5, f"{backbone} OS{output_stride} {name}: max |diff| / max |ref| = {worst[name]}"
    print(f"check {backbone} OS{output_stride}, {tuple(x.shape)}: max |diff| / max |released| {worst}")
    # train mode (batch statistics, running-statistics updates, CBAM BN momentum) with the dropouts off
    for m in [*ref.modules(), *ours.modules()]:
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ref.train(), ours.train()
    with torch.no_grad():
        _, attens, out_kd = ref.extract_feature(x)
        got = ours(x)
    for name, (a, b) in {"out": (got["out"], out_kd), "decoder": (got["decoder"], attens[2])}.items():
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5, f"train mode {name}"
    after = from_released(ref.state_dict())
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, after[key], rtol=1e-5, atol=1e-6, msg=f"running statistics {key}")
    print(f"check {backbone} OS{output_stride}: train mode outputs and running statistics match")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--src", type=Path, help="a work tree (or extracted archive) of AmirMansurian/AttnFD")
    where.add_argument("--git-dir", type=Path, help="a (bare) git directory of AmirMansurian/AttnFD")
    parser.add_argument("--rev", default="HEAD", help="with --git-dir: the commit to read (default HEAD)")
    parser.add_argument("--commit", help="with --src: its commit (default: git -C SRC rev-parse HEAD)")
    parser.add_argument("--check", action="store_true", help="also compare kdbench's variant with the released model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.git_dir:
            git = ["git", f"--git-dir={args.git_dir}"]
            commit = subprocess.check_output([*git, "rev-parse", f"{args.rev}^{{commit}}"], text=True).strip()
            archive = subprocess.run([*git, "archive", commit], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            src = Path(tmp)
        else:
            src = args.src.resolve()
            commit = args.commit or subprocess.check_output(["git", "-C", str(src), "rev-parse", "HEAD"], text=True).strip()
        for backbone in BACKBONES:
            data = manifest(src, commit, backbone)
            path = HERE / f"attnfd_deeplabv3plus_{backbone}.json"
            path.write_text(json.dumps(data, indent=1) + "\n")
            print(f"{path.name}: {data['parameters']:,} parameters, {len(data['state_dict'])} keys")
        if args.check:
            for backbone in BACKBONES:
                for os_ in (16, 8):
                    check(src, backbone, os_)


if __name__ == "__main__":
    main()
