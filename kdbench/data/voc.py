"""Pascal VOC 2012 segmentation, optionally with the SBD-augmented training list.

Layout (VOCdevkit/VOC2012)::

    JPEGImages/<id>.jpg                 (.png accepted: the synthetic benchmark writes PNG)
    SegmentationClass/<id>.png          palette PNG: the palette index is the class id, 255 = ignore
    SegmentationClassAug/<id>.png       optional, SBD labels as DeepLabV3Plus-Pytorch expects them
    ImageSets/Segmentation/{train,val,train_aug}.txt
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdbench.data.image_files import open_image, stored_size
from kdbench.errors import UserError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".png")
LAYOUT_HINT = (
    "expected the VOCdevkit layout (VOC2012/JPEGImages, VOC2012/SegmentationClass, "
    "VOC2012/ImageSets/Segmentation/<split>.txt); set data.root or KDBENCH_VOC_ROOT"
)

Transform = Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def find_voc_root(root: str | Path) -> Path:
    """The VOC2012 folder, given it, a VOCdevkit folder holding it, or the parent of VOCdevkit."""
    root = Path(root).expanduser()
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    if not root.is_dir():
        raise UserError(f"VOC: no folder {root}; {LAYOUT_HINT}")
    raise UserError(f"VOC: no ImageSets/Segmentation under {root} (nor VOC2012/, VOCdevkit/VOC2012/); {LAYOUT_HINT}")


def _read_ids(path: Path) -> list[str]:
    """Ids from a split list; lines may also be 'JPEGImages/x.jpg SegmentationClassAug/x.png' pairs."""
    ids = []
    for line in path.read_text().splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    if not ids:
        raise UserError(f"VOC: {path} lists no images")
    return ids


#: what to do about an image file PIL cannot read
UNREADABLE_FIX = "replace it or drop its id from the split list"


def _open(path: Path) -> Image.Image:
    return open_image(path, "VOC", UNREADABLE_FIX)


def _names(folder: Path) -> set[str]:
    """One directory listing instead of one stat per id: 10,582 SBD ids scan in milliseconds."""
    return set(os.listdir(folder)) if folder.is_dir() else set()


class VOCSegmentation(Dataset):
    """VOC-layout segmentation set; every listed file is checked to exist when it is built."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None,
        use_sbd: bool = True,
        *,
        class_names: Sequence[str] = VOC_CLASSES,
    ) -> None:
        self.root = find_voc_root(root)
        self.split = split
        self.transform = transform
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)

        sets = self.root / "ImageSets" / "Segmentation"
        aug_list, aug_dir = sets / "train_aug.txt", self.root / "SegmentationClassAug"
        self.sbd = use_sbd and split == "train" and aug_list.is_file() and aug_dir.is_dir()
        list_file = aug_list if self.sbd else sets / f"{split}.txt"
        if not list_file.is_file():
            raise UserError(f"VOC: no ImageSets/Segmentation/{list_file.name} under {self.root}; {LAYOUT_HINT}")
        self.ids = _read_ids(list_file)

        image_dir, label_dir = self.root / "JPEGImages", self.root / "SegmentationClass"
        images, labels = _names(image_dir), _names(label_dir)
        aug_labels = _names(aug_dir) if self.sbd else set()
        self.images: list[Path] = []
        self.labels: list[Path] = []
        missing: list[str] = []
        for i in self.ids:
            image = next((f"{i}{ext}" for ext in IMAGE_EXTENSIONS if f"{i}{ext}" in images), None)
            label = f"{i}.png"
            if image is None:
                missing.append(str(image_dir / f"{i}.jpg"))
            elif label in aug_labels:
                self.images.append(image_dir / image)
                self.labels.append(aug_dir / label)
            elif label in labels:
                self.images.append(image_dir / image)
                self.labels.append(label_dir / label)
            else:
                missing.append(str((aug_dir if self.sbd else label_dir) / label))
        if missing:
            raise UserError(
                f"VOC: {len(missing)} of {len(self.ids)} files listed in {list_file} are missing, "
                f"first: {missing[0]}; {LAYOUT_HINT}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[Image.Image, np.ndarray]:
        image, mask = self.read(index)
        if self.transform is None:
            return image, mask
        return self.transform(image, mask)

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of image ``index`` as stored, from its file header (nothing decoded)."""
        return stored_size(self.images[index], "VOC", UNREADABLE_FIX)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Image and mask ``index``, checked: a file that is no image, a mask of another size or with
        label ids past the classes (other than 255) is a UserError naming the file."""
        image = _open(self.images[index]).convert("RGB")
        with _open(self.labels[index]) as label:
            if label.mode not in ("P", "L"):
                raise UserError(
                    f"VOC: {self.labels[index]} is a {label.mode} image; labels must be palette or grayscale "
                    "PNGs whose pixel values are class ids"
                )
            mask = np.array(label)  # palette indices, not colours
        if mask.shape != (image.height, image.width):
            raise UserError(
                f"VOC: image {self.images[index]} {(image.height, image.width)} and its mask {self.labels[index]} "
                f"{mask.shape} differ in size (H, W); a mask must label every pixel of its image"
            )
        if mask.max() >= self.num_classes:  # 255 = ignore; any other id past the classes breaks the loss
            bad = np.unique(mask[(mask >= self.num_classes) & (mask != 255)])
            if bad.size:
                raise UserError(
                    f"VOC: {self.labels[index]} holds label ids {bad[:5].tolist()}, but the dataset has {self.num_classes} "
                    f"classes (ids 0-{self.num_classes - 1}, 255 = ignore); fix the mask or drop its id from the split list"
                )
        return image, mask
