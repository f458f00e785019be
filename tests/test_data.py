"""Data: VOC / Cityscapes loaders on tiny fixture trees, the synthetic benchmark, transforms, splits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from kdbench.data import Splits, build_splits
from kdbench.data.cityscapes import Cityscapes
from kdbench.data.synthetic import CLASS_NAMES, CONFUSED_AS, ensure_synthetic, generate
from kdbench.data.transforms import CIRKD_BGR_MEAN, IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize, train_transform
from kdbench.data.voc import VOC_CLASSES, VOCSegmentation
from kdbench.errors import UserError

PALETTE = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]


def _write_image(path: Path, h: int, w: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _write_label(path: Path, label: np.ndarray, palette: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8))
    if palette:
        image.putpalette(PALETTE)
    image.save(path)


def _voc_label(value: int, h: int = 20, w: int = 30) -> np.ndarray:
    label = np.zeros((h, w), dtype=np.uint8)
    label[5:15, 5:20] = value
    label[:, 0] = 255
    return label


def make_voc(base: Path, train: list[str], val: list[str], aug: list[str] | None = None) -> Path:
    """A VOCdevkit tree under ``base``; ``aug`` ids get SBD labels (value 20) and train_aug.txt."""
    root = base / "VOCdevkit" / "VOC2012"
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for n, i in enumerate(train + val):
        _write_image(root / "JPEGImages" / f"{i}.jpg", 20, 30, n)
        _write_label(root / "SegmentationClass" / f"{i}.png", _voc_label(1 + n))
    (sets / "train.txt").write_text("\n".join(train) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    if aug is not None:
        for n, i in enumerate(aug):
            _write_image(root / "JPEGImages" / f"{i}.jpg", 20, 30, 100 + n)
            _write_label(root / "SegmentationClassAug" / f"{i}.png", _voc_label(20), palette=False)
        (sets / "train_aug.txt").write_text("".join(f"{i}\n" for i in aug + train[:1]))
    return root


# ------------------------------------------------------------------------------------------------ VOC


def test_voc_reads_palette_indices_from_any_root_level(tmp_path: Path) -> None:
    root = make_voc(tmp_path, ["a", "b", "c"], ["d", "e"])
    for given in (tmp_path, tmp_path / "VOCdevkit", root):
        ds = VOCSegmentation(given, "train", None)
        assert ds.root == root and len(ds) == 3 and ds.ids == ["a", "b", "c"]
    assert ds.num_classes == 21 and ds.class_names == VOC_CLASSES
    image, mask = ds[1]
    assert image.size == (30, 20) and mask.shape == (20, 30)
    assert set(np.unique(mask).tolist()) == {0, 2, 255}  # indices, not palette colours

    val = VOCSegmentation(root, "val", eval_transform())
    x, y = val[0]
    assert x.shape == (3, 20, 30) and x.dtype == torch.uint8  # normalised once a batch is on the device
    assert y.shape == (20, 30) and y.dtype == torch.uint8
    assert set(y.unique().tolist()) == {0, 4, 255}


def test_voc_sbd_train_aug(tmp_path: Path) -> None:
    root = make_voc(tmp_path, ["a", "b"], ["v"], aug=["s1", "s2", "s3"])
    sbd = VOCSegmentation(root, "train", None)
    assert sbd.ids == ["s1", "s2", "s3", "a"]
    assert [p.parent.name for p in sbd.labels] == ["SegmentationClassAug"] * 3 + ["SegmentationClass"]
    assert set(np.unique(sbd[0][1]).tolist()) == {0, 20, 255}
    assert len(VOCSegmentation(root, "train", None, use_sbd=False)) == 2
    assert len(VOCSegmentation(root, "val", None)) == 1  # val never uses the SBD list


def test_voc_accepts_png_images_and_pair_lines(tmp_path: Path) -> None:
    root = make_voc(tmp_path, ["a"], ["v"])
    (root / "JPEGImages" / "a.jpg").rename(root / "JPEGImages" / "a.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("/JPEGImages/a.jpg /SegmentationClass/a.png\n")
    ds = VOCSegmentation(root, "train", None)
    assert ds.ids == ["a"] and ds.images[0].name == "a.png"


def test_size_batches_group_images_of_one_size_in_order_of_appearance() -> None:
    from kdbench.engine import SizeBatches

    sizes = [(2, 3), (4, 5), (2, 3), (2, 3), (4, 5), (6, 6), (2, 3)]
    assert list(SizeBatches(sizes, 2)) == [[0, 2], [3, 6], [1, 4], [5]]
    assert list(SizeBatches(sizes, 3)) == [[0, 2, 3], [6], [1, 4], [5]] and len(SizeBatches(sizes, 3)) == 4


def test_voc_val_of_many_sizes_evaluates_in_batches_with_the_metric_of_one_at_a_time(tmp_path: Path) -> None:
    """VOC's val images differ in size: a batch holds images of one size (read from the file
    headers), the confusion matrix is the one of a batch of one, and each prediction is written
    under its own image's id."""
    from kdbench.engine import eval_loader, evaluate
    from kdbench.evaluate import PaletteWriter
    from kdbench.models import build_model
    from kdbench.recipe import EvalConfig, load_recipe

    root = make_voc(tmp_path, ["a"], ["v0", "v1", "v2", "v3", "v4"])
    sizes = {"v0": (20, 30), "v1": (24, 16), "v2": (20, 30), "v3": (24, 16), "v4": (24, 16)}
    for n, (i, (h, w)) in enumerate(sizes.items()):
        _write_image(root / "JPEGImages" / f"{i}.jpg", h, w, 50 + n)
        _write_label(root / "SegmentationClass" / f"{i}.png", _voc_label(1 + n, h, w))
    val = VOCSegmentation(root, "val", eval_transform())
    torch.manual_seed(0)
    model = build_model(load_recipe("tiny").student, 21).eval()

    loader = eval_loader(val, EvalConfig(batch_size=2))
    batches = [(images.shape[-2:], target.shape[0]) for images, target in loader]
    assert batches == [((20, 30), 2), ((24, 16), 2), ((24, 16), 1)]
    part = [(images.shape[-2:], target.shape[0]) for images, target in eval_loader(Subset(val, [1, 3, 0]), EvalConfig(batch_size=2))]
    assert part == [((24, 16), 2), ((20, 30), 1)]  # a part of a split (the held-out one, a process's share)
    writer = PaletteWriter(tmp_path / "pred", val, [0] * 768)
    (tmp_path / "pred").mkdir()
    _, cm = evaluate(model, loader, 21, EvalConfig(batch_size=2), on_batch=writer, normalize="imagenet")
    _, one = evaluate(model, val, 21, EvalConfig(batch_size=1), normalize="imagenet")
    assert torch.equal(cm, one) and int(cm.sum()) == sum(h * (w - 1) for h, w in sizes.values())  # column 0: ignore
    for path in writer.written:
        with Image.open(path) as png:
            assert (png.height, png.width) == sizes[path.stem], path.name
    assert sorted(p.stem for p in writer.written) == sorted(sizes)


def test_voc_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no folder .*KDBENCH_VOC_ROOT"):
        VOCSegmentation(tmp_path / "nowhere", "train", None)
    with pytest.raises(UserError, match="no ImageSets/Segmentation under .*VOCdevkit layout"):
        VOCSegmentation(tmp_path, "train", None)
    root = make_voc(tmp_path, ["a", "b", "c"], ["v"])
    with pytest.raises(UserError, match="no ImageSets/Segmentation/test.txt under"):
        VOCSegmentation(root, "test", None)
    (root / "JPEGImages" / "b.jpg").unlink()
    (root / "JPEGImages" / "c.jpg").unlink()
    with pytest.raises(UserError, match=r"2 of 3 files listed in .*train.txt are missing, first: .*JPEGImages/b.jpg"):
        VOCSegmentation(root, "train", None)
    (root / "SegmentationClass" / "v.png").unlink()
    with pytest.raises(UserError, match=r"1 of 1 .* first: .*SegmentationClass/v.png"):
        VOCSegmentation(root, "val", None)


# ----------------------------------------------------------------------------------------- Cityscapes


def make_cityscapes(root: Path) -> None:
    label = np.zeros((32, 64), dtype=np.uint8)
    label[:, 16:32], label[:, 32:48], label[:, 48:56], label[:, 56:] = 7, 26, 33, 24
    for split, city, names in (("train", "aachen", ["aachen_000000_000019", "aachen_000001_000019"]),
                               ("train", "bremen", ["bremen_000000_000019"]),
                               ("val", "lindau", ["lindau_000000_000019"])):  # fmt: skip
        for n, name in enumerate(names):
            _write_image(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", 32, 64, n)
            _write_label(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", label, palette=False)


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    train = Cityscapes(tmp_path, "train", None)
    assert len(train) == 3 and train.num_classes == 19 and len(train.class_names) == 19
    assert train.ids[0] == "aachen_000000_000019"
    image, mask = train[0]
    assert image.size == (64, 32) and mask.shape == (32, 64)
    assert (mask[:, :16] == 255).all()  # labelId 0 (unlabeled)
    assert (mask[:, 16:32] == 0).all()  # road
    assert (mask[:, 32:48] == 13).all()  # car
    assert (mask[:, 48:56] == 18).all()  # bicycle
    assert (mask[:, 56:] == 11).all()  # person
    x, y = Cityscapes(tmp_path, "val", eval_transform())[0]
    assert x.shape == (3, 32, 64) and y.shape == (32, 64) and y.dtype == torch.uint8


def test_cityscapes_val_evaluates_in_batches_of_one_size_with_the_metric_of_one_at_a_time(tmp_path: Path) -> None:
    """Cityscapes images share one size, but a file of another size must not break a batch."""
    from kdbench.engine import eval_loader, evaluate
    from kdbench.models import build_model
    from kdbench.recipe import EvalConfig, load_recipe

    make_cityscapes(tmp_path)
    label = np.full((32, 64), 7, dtype=np.uint8)  # road
    for n, (name, h, w) in enumerate([("lindau_000001_000019", 32, 64), ("lindau_000002_000019", 24, 40), ("lindau_000003_000019", 32, 64)]):
        _write_image(tmp_path / "leftImg8bit" / "val" / "lindau" / f"{name}_leftImg8bit.png", h, w, 10 + n)
        _write_label(tmp_path / "gtFine" / "val" / "lindau" / f"{name}_gtFine_labelIds.png", label[:h, :w], palette=False)
    val = Cityscapes(tmp_path, "val", eval_transform())
    loader = eval_loader(val, EvalConfig(batch_size=2))
    assert [(tuple(images.shape[-2:]), images.shape[0]) for images, _ in loader] == [((32, 64), 2), ((32, 64), 1), ((24, 40), 1)]
    torch.manual_seed(0)
    model = build_model(load_recipe("tiny").student, 19).eval()
    _, cm = evaluate(model, loader, 19, EvalConfig(batch_size=2), normalize="cirkd_bgr")
    _, one = evaluate(model, val, 19, EvalConfig(batch_size=1), normalize="cirkd_bgr")
    assert torch.equal(cm, one) and int(cm.sum()) == 32 * 48 + 2 * 32 * 64 + 24 * 40  # the fixture's image: 16 of 64 columns unlabelled


def test_cityscapes_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no folder .*leftImg8bit/train.*KDBENCH_CITYSCAPES_ROOT"):
        Cityscapes(tmp_path, "train", None)
    make_cityscapes(tmp_path)
    (tmp_path / "gtFine" / "train" / "bremen" / "bremen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(UserError, match=r"1 of 3 images .* no label file, first: .*bremen_000000_000019_gtFine"):
        Cityscapes(tmp_path, "train", None)
    bad = tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"^Cityscapes: .*lindau_000000_000019_leftImg8bit.png is not an image PIL can read"):
        Cityscapes(tmp_path, "val", None).image_size(0)  # read when evaluation batches by size


# ---------------------------------------------------------------------------------------------- synthetic


def _tree_hashes(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = _tree_hashes(generate(tmp_path / "a", 6, 2, 48, seed=3, progress=False))
    b = _tree_hashes(generate(tmp_path / "b", 6, 2, 48, seed=3, progress=False))
    c = _tree_hashes(generate(tmp_path / "c", 6, 2, 48, seed=4, progress=False))
    assert len(a) == 2 * 8 + 3  # images, labels, train.txt, val.txt, info.json
    assert a == b
    pictures = [k for k in a if k.startswith("JPEGImages")]
    assert all(a[k] != c[k] for k in pictures)


def test_synthetic_reads_as_voc_with_every_class(tmp_path: Path) -> None:
    root = generate(tmp_path / "syn", 40, 4, 64, seed=0, progress=False)
    ds = VOCSegmentation(root, "train", None, class_names=CLASS_NAMES)
    assert len(ds) == 40 and len(VOCSegmentation(root, "val", None)) == 4
    assert ds.num_classes == len(CLASS_NAMES) and CLASS_NAMES[0] == "background"
    seen: set[int] = set()
    for image, mask in (ds[i] for i in range(len(ds))):
        assert image.size == (64, 64) and mask.shape == (64, 64)
        seen |= set(np.unique(mask).tolist())
    assert seen <= set(range(len(CLASS_NAMES))) | {255}
    assert seen >= set(range(len(CLASS_NAMES)))


def test_label_noise_relabels_training_objects_of_confused_classes_only(tmp_path: Path) -> None:
    clean = generate(tmp_path / "clean", 60, 4, 64, seed=0, progress=False)
    noisy = generate(tmp_path / "noisy", 60, 4, 64, seed=0, label_noise=0.7, progress=False)
    names = [f"{split}_{i:06d}.png" for split in ("train", "val") for i in range(4)]
    for name in names:  # the same images whatever the noise
        assert (clean / "JPEGImages" / name).read_bytes() == (noisy / "JPEGImages" / name).read_bytes()
    for name in names[4:]:  # validation labels stay clean
        assert (clean / "SegmentationClass" / name).read_bytes() == (noisy / "SegmentationClass" / name).read_bytes()
    relabelled: dict[tuple[int, int], int] = {}
    confusable = 0
    for i in range(60):
        a = np.asarray(Image.open(clean / "SegmentationClass" / f"train_{i:06d}.png"))
        b = np.asarray(Image.open(noisy / "SegmentationClass" / f"train_{i:06d}.png"))
        assert ((a == 0) == (b == 0)).all()  # the same objects, only some classes differ
        confusable += sum(int(c) in CONFUSED_AS for c in np.unique(a))
        for pair in set(zip(a[a != b].tolist(), b[a != b].tolist())):
            relabelled[pair] = relabelled.get(pair, 0) + 1
    assert relabelled and all(CONFUSED_AS[x] == y for x, y in relabelled)  # only as their look-alike
    assert 0.5 < sum(relabelled.values()) / confusable < 0.9  # about 70% of the hexagons and stars
    with pytest.raises(UserError, match=r"label_noise: expected a probability in \[0, 1\]"):
        generate(tmp_path / "bad", 2, 2, 32, seed=0, label_noise=1.5, progress=False)


def test_ensure_synthetic_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_synthetic(tmp_path, 3, 2, 32, seed=1, progress=False)
    assert (first / "ImageSets" / "Segmentation" / "train.txt").is_file()
    # no temporary folder left behind; the lock file stays (removing it would race with a waiter)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, f".{first.name}.lock"])

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated again")

    monkeypatch.setattr("kdbench.data.synthetic.generate", fail)
    assert ensure_synthetic(tmp_path, 3, 2, 32, seed=1, progress=False) == first
    with pytest.raises(AssertionError):
        ensure_synthetic(tmp_path, 3, 2, 32, seed=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [first.name]  # the failed generation left nothing
    with pytest.raises(UserError, match="data.synthetic.image_size"):
        ensure_synthetic(tmp_path, 3, 2, 0, seed=1)


# ------------------------------------------------------------------------------------------------- splits


def _synthetic_splits(tmp_path: Path, holdout_fraction: float, seed: int = 0, label_noise: float = 0.0) -> Splits:
    return build_splits(
        "synthetic",
        None,
        crop_size=(24, 24),
        holdout_fraction=holdout_fraction,
        seed=seed,
        synthetic={"num_train": 10, "num_val": 3, "image_size": 32, "seed": 0, **({"label_noise": label_noise} if label_noise else {})},
        cache_dir=tmp_path,
        progress=False,
    )


def _ids(subset: Subset) -> set[str]:
    return {subset.dataset.ids[i] for i in subset.indices}


def test_build_splits_holdout_is_disjoint_from_train(tmp_path: Path) -> None:
    splits = _synthetic_splits(tmp_path, 0.3)
    assert splits.num_classes == len(CLASS_NAMES) and splits.class_names == list(CLASS_NAMES)
    train_ids, holdout_ids = _ids(splits.train), _ids(splits.holdout)
    assert len(holdout_ids) == 3 and len(train_ids) == 7
    assert not train_ids & holdout_ids and len(train_ids | holdout_ids) == 10
    assert holdout_ids == _ids(_synthetic_splits(tmp_path, 0.3).holdout)  # seeded
    assert holdout_ids != _ids(_synthetic_splits(tmp_path, 0.3, seed=1).holdout)
    assert splits.train[0][0].shape == (3, 24, 24)  # augmented crops
    assert splits.holdout[0][0].shape == (3, 32, 32)  # full images, evaluated like val
    assert splits.val[0][0].shape == (3, 32, 32) and len(splits.val) == 3
    no_holdout = _synthetic_splits(tmp_path, 0.0)
    assert no_holdout.holdout is None and len(no_holdout.train) == 10


def test_the_held_out_part_of_a_noisy_synthetic_set_is_scored_on_clean_labels(tmp_path: Path) -> None:
    # it stands in for val, whose labels are clean: the same images as the noisy training split at
    # the same indices, with the labels the generator draws without noise
    noisy = _synthetic_splits(tmp_path, 0.5, label_noise=1.0)
    clean = _synthetic_splits(tmp_path, 0.5)
    assert _ids(noisy.holdout) == _ids(clean.holdout) and _ids(noisy.train) == _ids(clean.train)
    train_folder = noisy.train.dataset  # the noisy labels the student learns from
    relabelled = 0
    for k, i in enumerate(noisy.holdout.indices):
        image, label = noisy.holdout[k]
        clean_image, clean_label = clean.holdout[k]
        assert torch.equal(image, clean_image) and torch.equal(label, clean_label)
        noisy_label = torch.as_tensor(np.array(train_folder.read(i)[1]))
        relabelled += int(not torch.equal(noisy_label.long(), label.long()))
    assert relabelled > 0  # label_noise 1: every hexagon and star of the training labels is relabelled


def test_build_splits_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDBENCH_VOC_ROOT", raising=False)
    monkeypatch.delenv("KDBENCH_CITYSCAPES_ROOT", raising=False)
    with pytest.raises(UserError, match="data.dataset"):
        build_splits("coco", None, crop_size=(8, 8))
    with pytest.raises(UserError, match="data.root .*KDBENCH_VOC_ROOT"):
        build_splits("voc", None, crop_size=(8, 8))
    with pytest.raises(UserError, match="data.root .*KDBENCH_CITYSCAPES_ROOT"):
        build_splits("cityscapes", None, crop_size=(8, 8))
    with pytest.raises(UserError, match="data.holdout_fraction"):
        build_splits("voc", str(tmp_path), crop_size=(8, 8), holdout_fraction=1.0)
    with pytest.raises(UserError, match="data.synthetic"):
        build_splits("synthetic", None, crop_size=(8, 8), synthetic={"num_train": 2}, cache_dir=tmp_path)


def test_build_splits_reads_voc_and_cityscapes_roots_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_voc(tmp_path / "voc", ["a", "b", "c", "d"], ["v"], aug=["s"])
    make_cityscapes(tmp_path / "cs")
    monkeypatch.setenv("KDBENCH_VOC_ROOT", str(tmp_path / "voc"))
    monkeypatch.setenv("KDBENCH_CITYSCAPES_ROOT", str(tmp_path / "cs"))
    voc = build_splits("voc", None, crop_size=(16, 16), use_sbd=False, holdout_fraction=0.4)
    assert (len(voc.train), len(voc.holdout), len(voc.val), voc.num_classes) == (2, 2, 1, 21)
    assert len(build_splits("voc", None, crop_size=(16, 16)).train) == 2  # train_aug.txt: s, a
    cs = build_splits("cityscapes", None, crop_size=(16, 32), normalize="cirkd_bgr")
    assert (len(cs.train), len(cs.val), cs.num_classes, cs.normalize) == (3, 1, 19, "cirkd_bgr")
    x, y = cs.train[0]
    assert x.shape == (3, 16, 32) and y.shape == (16, 32)


# --------------------------------------------------------------------------------------------- transforms


def test_train_transform_keeps_image_and_mask_aligned() -> None:
    """The red channel encodes the label, so any misalignment shows as a pixel whose colour disagrees."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 10, (3, 4))
    label = np.kron(blocks, np.ones((16, 16), dtype=np.int64)).astype(np.uint8)  # 48x64, 16x16 blocks
    red = 20 + 20 * label.astype(np.uint8)
    image = Image.fromarray(np.stack([red, np.full_like(red, 90), np.full_like(red, 160)], axis=-1))
    transform = train_transform((48, 48), scale_range=(0.5, 2.0))
    torch.manual_seed(0)
    padded = flipped_seen = 0
    for _ in range(30):
        x, y = transform(image, Image.fromarray(label))
        assert x.shape == (3, 48, 48) and x.dtype == y.dtype == torch.uint8 and y.shape == (48, 48)
        r = x[0].float()
        ignore = y == 255
        padded += int(ignore.any())
        assert torch.allclose(r[ignore], torch.zeros(()), atol=1.0)  # padding: image 0, mask ignore
        # Compare away from block edges, where bilinear resizing blends neighbouring colours.
        windows = torch.nn.functional.pad(y[None, None].float(), (2, 2, 2, 2), value=-1).unfold(2, 5, 1).unfold(3, 5, 1)
        interior = (windows == y[None, None, :, :, None, None].float()).flatten(-2).all(-1)[0, 0] & ~ignore
        assert interior.sum() > 50
        assert torch.allclose(r[interior], 20 + 20 * y[interior].float(), atol=3.0)
        flipped_seen += int((y[:, :8] == 255).all())  # padding sits bottom/right; after a flip it is on the left
    assert padded > 0 and flipped_seen > 0


def test_normalize_turns_a_batch_of_pixels_into_model_input() -> None:
    """Datasets give uint8 images; ``normalize`` makes a batch of them what the models take, with each
    recipe's convention, and leaves float images (already model input) alone."""
    image = Image.fromarray(np.tile(np.array([10, 20, 30], dtype=np.uint8), (4, 5, 1)))
    mask = np.arange(20, dtype=np.uint8).reshape(4, 5)
    x, y = eval_transform()(image, mask)
    assert x.shape == (3, 4, 5) and x.dtype == torch.uint8 and torch.equal(y, torch.from_numpy(mask))
    batch = torch.stack([x, x.flip(-1)])
    bgr = normalize(batch, "cirkd_bgr")
    expected = torch.tensor([30.0, 20.0, 10.0]) - torch.tensor(CIRKD_BGR_MEAN)  # BGR, 0-255, no std
    assert bgr.shape == (2, 3, 4, 5) and torch.allclose(bgr[1, :, 0, 0], expected)
    rgb = normalize(batch, "imagenet")
    expected = (torch.tensor([10.0, 20.0, 30.0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert rgb.dtype == torch.float32 and torch.allclose(rgb[0, :, 3, 4], expected, atol=1e-6)
    assert normalize(rgb, "cirkd_bgr") is rgb  # float: model input already
    with pytest.raises(UserError, match="data.normalize"):
        normalize(batch, "caffe")
    with pytest.raises(UserError, match="data.normalize"):
        build_splits("synthetic", None, crop_size=(16, 16), normalize="caffe")


def test_released_augmentation_options() -> None:
    from torchvision import tv_tensors

    from kdbench.data.transforms import RandomBlur, RandomScale

    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8))
    shorts = set()
    for _ in range(300):  # the shorter side is a whole number of pixels in the range, both ends included
        out = RandomScale((50, 54), "short_side")(image)
        h, w = out.shape[-2:]
        shorts.add(h)
        assert w == int(60 * h / 40)
    assert shorts == {50, 51, 52, 53, 54}
    factors = {round(RandomScale((0.5, 2.0), step=0.1).make_params([])["factor"], 6) for _ in range(600)}
    assert factors == {round(0.5 + k / 10, 6) for k in range(16)}  # CIRKD's 16 factors, ends included
    portrait = RandomScale((50, 50), "short_side")(tv_tensors.Image(torch.zeros(3, 60, 40, dtype=torch.uint8)))
    assert tuple(portrait.shape[-2:]) == (75, 50)
    # padding to the crop labels the mask with pad_label: 255 (ignored) by default, 0 as AttnFD's VOC loader
    picture, mask = Image.fromarray(image.permute(1, 2, 0).numpy()), np.ones((40, 60), dtype=np.uint8)
    for pad_label in (255, 0):
        _, y = train_transform((80, 80), (40, 40), flip=False, ignore_index=pad_label, scale_mode="short_side")(picture, mask)
        assert set(y.unique().tolist()) == {1, pad_label}
    # the blur touches the image, never the mask; p=0 is the identity
    lbl = tv_tensors.Mask(torch.randint(0, 5, (40, 60), dtype=torch.uint8))
    blurred = [RandomBlur(1.0)(image, lbl) for _ in range(5)]
    assert any(not torch.equal(b[0], image) for b in blurred) and all(torch.equal(b[1], lbl) for b in blurred)
    assert torch.equal(RandomBlur(0.0)(image), image)
    # evaluation at a resized shorter side: image and mask alike, aspect kept
    x, y = eval_transform(resize_short=20)(picture, mask)
    assert x.shape == (3, 20, 30) and y.shape == (20, 30) and set(y.unique().tolist()) == {1}
