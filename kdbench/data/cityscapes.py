"""Cityscapes fine annotations, mapped from the 34 label ids to the 19 train ids.

Layout::

    leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    gtFine/<split>/<city>/<name>_gtFine_labelIds.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdbench.data.image_files import stored_size
from kdbench.errors import UserError

#: Cityscapes' own colours of its 19 train ids (cityscapesScripts' labels.py)
COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
#: labelId -> trainId for the 19 evaluated classes (cityscapesScripts' labels.py); all others -> 255.
LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
IGNORE_INDEX = 255
LAYOUT_HINT = (
    "expected leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png; "
    "set data.root or KDBENCH_CITYSCAPES_ROOT"
)

Transform = Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def _lookup_table() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


LUT = _lookup_table()


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a labelIds array to train ids in one indexing operation."""
    return LUT[label_ids]


class Cityscapes(Dataset):
    """Cityscapes split; images and their label files are paired and checked when it is built."""

    num_classes = len(CITYSCAPES_CLASSES)
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str | Path, split: str, transform: Transform | None) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        image_dir, label_dir = self.root / "leftImg8bit" / split, self.root / "gtFine" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise UserError(f"Cityscapes: no folder {folder}; {LAYOUT_HINT}")
        self.images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise UserError(f"Cityscapes: no */*_leftImg8bit.png under {image_dir}; {LAYOUT_HINT}")
        self.labels = [
            label_dir / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png") for p in self.images
        ]
        missing = [p for p in self.labels if not p.is_file()]
        if missing:
            raise UserError(
                f"Cityscapes: {len(missing)} of {len(self.images)} images in {image_dir} have no label file, "
                f"first: {missing[0]}; {LAYOUT_HINT}"
            )
        self.ids = [p.name[: -len("_leftImg8bit.png")] for p in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of image ``index`` as stored, from its PNG header (nothing decoded): evaluation
        batches images of one size, so a file of another size gets batches of its own."""
        return stored_size(self.images[index], "Cityscapes", "replace it")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[Image.Image, np.ndarray]:
        image = Image.open(self.images[index]).convert("RGB")
        with Image.open(self.labels[index]) as label:
            mask = to_train_ids(np.array(label, dtype=np.uint8))
        if self.transform is None:
            return image, mask
        return self.transform(image, mask)
