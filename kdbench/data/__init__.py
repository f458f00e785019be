"""Datasets and the train / held-out / val splits a run uses.

The held-out split is a seeded part of the training ids, removed from training and evaluated like
val: hyper-parameter tuning optimises it, never the val split that tables report.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset, Subset

from kdbench.data.cityscapes import CITYSCAPES_CLASSES, Cityscapes
from kdbench.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from kdbench.data.synthetic import ensure_synthetic
from kdbench.data.transforms import check_normalization, eval_transform, train_transform
from kdbench.data.voc import VOC_CLASSES, VOCSegmentation
from kdbench.errors import UserError

if TYPE_CHECKING:
    from kdbench.recipe import Recipe

__all__ = ["Splits", "build_splits", "load_splits", "class_names", "Cityscapes", "VOCSegmentation", "ensure_synthetic"]

DATASETS = ("synthetic", "voc", "cityscapes")
CLASS_NAMES = {"synthetic": SYNTHETIC_CLASSES, "voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES}
ROOT_ENV = {"voc": "KDBENCH_VOC_ROOT", "cityscapes": "KDBENCH_CITYSCAPES_ROOT"}


@dataclass
class Splits:
    train: Dataset
    #: None when holdout_fraction is 0
    holdout: Dataset | None
    val: Dataset
    num_classes: int
    class_names: list[str]
    #: what the models take: the datasets give uint8 images, ``transforms.normalize(images, this)``
    #: makes them model input once a batch is on the device
    normalize: str


def resolve_cache_dir(configured: str | Path | None = None) -> Path:
    """Where generated data and trained teachers go: the configured folder, else $KDBENCH_CACHE,
    else ~/.cache/kdbench."""
    return Path(configured or os.environ.get("KDBENCH_CACHE") or Path.home() / ".cache" / "kdbench").expanduser()


def _resolve_root(dataset: str, root: str | None) -> str:
    root = root or os.environ.get(ROOT_ENV[dataset])
    if not root:
        raise UserError(
            f"data.root is not set for dataset {dataset!r}: set data.root in the recipe "
            f"or the environment variable {ROOT_ENV[dataset]}"
        )
    return root


def _synthetic_root(synthetic: dict[str, Any] | None, cache_dir: str | Path | None, progress: bool) -> Path:
    expected, optional = {"num_train", "num_val", "image_size", "seed"}, {"label_noise"}
    params = dict(synthetic or {})
    if not expected <= set(params) <= expected | optional:
        raise UserError(f"data.synthetic: expected the keys {sorted(expected)} (optionally {sorted(optional)}), got {sorted(params)}")
    return ensure_synthetic(resolve_cache_dir(cache_dir), **params, progress=progress)


def build_splits(
    dataset: str,
    root: str | None,
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    normalize: str = "imagenet",
    scale_mode: str = "relative",
    scale_step: float = 0.0,
    pad_label: int = 255,
    blur: float = 0.0,
    resize_short: int | None = None,
    use_sbd: bool = True,
    holdout_fraction: float = 0.0,
    seed: int = 0,
    synthetic: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Splits:
    """Train (augmented crops), held-out and val (full images) splits of ``dataset``."""
    if dataset not in DATASETS:
        raise UserError(f"data.dataset: expected one of {list(DATASETS)}, got {dataset!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise UserError(f"data.holdout_fraction: must be in [0, 1), got {holdout_fraction}")
    check_normalization(normalize)
    train_tf = train_transform(crop_size, scale_range, flip, pad_label, scale_mode, blur, scale_step)
    eval_tf = eval_transform(resize_short)

    if dataset == "cityscapes":
        path = _resolve_root(dataset, root)
        train_set: VOCSegmentation | Cityscapes = Cityscapes(path, "train", train_tf)
        val: Dataset = Cityscapes(path, "val", eval_tf)
    else:
        if dataset == "synthetic":
            path = root or str(_synthetic_root(synthetic, cache_dir, progress))
            kwargs: dict[str, Any] = {"use_sbd": False, "class_names": SYNTHETIC_CLASSES}
        else:
            path = _resolve_root(dataset, root)
            kwargs = {"use_sbd": use_sbd}
        train_set = VOCSegmentation(path, "train", train_tf, **kwargs)
        val = VOCSegmentation(path, "val", eval_tf, **kwargs)
        for split in (train_set, val):  # a set in another format (RGB or other-id masks) fails now, not mid-run
            split.read(0)

    holdout: Dataset | None = None
    train: Dataset = train_set
    if holdout_fraction > 0:
        n = len(train_set)
        count = max(1, round(n * holdout_fraction))
        if count >= n:
            raise UserError(f"data.holdout_fraction: {holdout_fraction} of {n} training images leaves none to train on")
        order = np.random.default_rng(seed).permutation(n)
        held_out_set = copy.copy(train_set)  # same file lists, scanned once; only the transform differs
        held_out_set.transform = eval_tf
        if dataset == "synthetic" and root is None and (synthetic or {}).get("label_noise"):
            # the held-out part stands in for val, whose labels are clean: the same images with the
            # labels drawn without noise (scored on the noisy ones, tuning would reward learning the noise)
            clean = _synthetic_root({**(synthetic or {}), "label_noise": 0.0}, cache_dir, progress)
            held_out_set = VOCSegmentation(str(clean), "train", eval_tf, **kwargs)
        holdout = Subset(held_out_set, sorted(order[:count].tolist()))
        train = Subset(train_set, sorted(order[count:].tolist()))
    return Splits(train, holdout, val, train_set.num_classes, list(train_set.class_names), normalize)


def class_names(dataset: str) -> list[str]:
    """The classes of a dataset without reading it (what a benchmark on random tensors needs)."""
    return list(CLASS_NAMES[dataset])


def load_splits(recipe: Recipe, progress: bool = True) -> Splits:
    """The splits a recipe's run trains and evaluates on."""
    d = recipe.data
    return build_splits(
        d.dataset,
        d.root,
        crop_size=recipe.train.crop_size,
        scale_range=d.scale_range,
        flip=d.flip,
        normalize=d.normalize,
        scale_mode=d.scale_mode,
        scale_step=d.scale_step,
        pad_label=d.pad_label,
        blur=d.blur,
        resize_short=recipe.eval.resize_short,
        use_sbd=d.use_sbd,
        holdout_fraction=d.holdout_fraction,
        seed=recipe.seed,
        synthetic=d.synthetic.generator_args(),
        cache_dir=resolve_cache_dir(recipe.cache_dir),
        progress=progress,
    )
