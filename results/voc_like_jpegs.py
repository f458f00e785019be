"""A Pascal-VOC-layout folder of 375 x 500 JPEGs, to time a recipe's loader where VOC is absent.

The GPU machines lent to this project have no Pascal VOC; the H200 loader figure in the README
(475 images/s, 15 workers) read such a folder: kdbench's synthetic renderer at 500 x 500, cut to
VOC's most common size (375 x 500), saved as JPEG quality 90 (about 40 KB each; VOC's own are
larger, with more detail, but decoding cost follows the pixel count), with palette-PNG masks.

    python3 results/voc_like_jpegs.py OUT_DIR [NUM_TRAIN [NUM_VAL]]     (default 300 and 16)
    KDBENCH_VOC_ROOT=OUT_DIR python3 -m kdbench bench --recipe voc_r101_r18 --loader-batches 60 ...
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from kdbench.data.synthetic import render, voc_palette


def write(root: Path, num_train: int = 300, num_val: int = 16) -> None:
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for split, count in (("train", num_train), ("val", num_val)):
        ids = [f"{split}_{i:05d}" for i in range(count)]
        for i, name in enumerate(ids):
            rgb, label = render(np.random.default_rng([7, i, len(split)]), 500)
            Image.fromarray(rgb[:375]).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
            mask = Image.fromarray(label[:375] % 21)  # VOC's 21 classes
            mask.putpalette(palette)
            mask.save(root / "SegmentationClass" / f"{name}.png")
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(f"{x}\n" for x in ids))


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        sys.exit(__doc__)
    write(Path(sys.argv[1]), *(int(a) for a in sys.argv[2:]))
