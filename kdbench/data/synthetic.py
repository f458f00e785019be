"""The embedded benchmark: a synthetic segmentation set, written in the Pascal VOC layout.

It is built so that distillation has room to show on a CPU, as a positive control
(docs/benchmark.md has the measurements behind every choice):

- eight object classes in four look-alike pairs. Each class has its own colour family and shape;
  the two classes of a pair have neighbouring hues (1/8 of the colour wheel apart) and similar
  shapes (disc/hexagon, square/bar, triangle/star, cross/diamond). Colour is learnt in a few
  hundred steps, so both models converge within the CPU budget, and what a student misses is what
  its labels do not tell it;
- noisy training labels, of the kind annotators make between look-alikes: with probability
  ``label_noise`` a training object of the second class of a confused pair (hexagon, star) is
  labelled as the first (disc, triangle). Above one half the labels name the wrong class for most
  such objects, so a student trained on them alone learns the confusion. The teacher is trained on
  the clean labels (``teacher_label_noise``, 0 by default: the curated set a teacher was made
  from), so its soft targets carry what the noisy labels lose. Validation labels are always clean;
- clutter: textured greyish backgrounds, shaded and noisy objects, occlusion (later objects hide
  earlier ones; labels follow what is visible), objects partly outside the image, slight blur.

Every image comes from its own generator seeded with (seed, split, index), and the label noise from
a second one, so the images do not depend on ``label_noise`` and the same arguments give
byte-identical files.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from kdbench.folders import exclusive
from kdbench.errors import UserError
from kdbench.progress import make_progress

#: Bump when the images change for the same arguments: it is part of the cache folder's name.
GENERATOR_VERSION = 6

CLASS_NAMES: tuple[str, ...] = (
    "background", "disc", "hexagon", "square", "bar", "triangle", "star", "cross", "diamond",
)  # fmt: skip
BACKGROUND, DISC, HEXAGON, SQUARE, BAR, TRIANGLE, STAR, CROSS, DIAMOND = range(len(CLASS_NAMES))
OBJECT_CLASSES = (DISC, HEXAGON, SQUARE, BAR, TRIANGLE, STAR, CROSS, DIAMOND)
#: the confused pairs: an object of the key class is labelled as the value class with probability
#: ``label_noise`` in the training split
CONFUSED_AS = {HEXAGON: DISC, STAR: TRIANGLE}
#: hue (0-1) at the centre of each class's colour family: neighbours on the colour wheel, 1/8 apart
HUE = {DISC: 0.0, HEXAGON: 0.125, SQUARE: 0.25, BAR: 0.375, TRIANGLE: 0.5, STAR: 0.625, CROSS: 0.75, DIAMOND: 0.875}
HUE_SPREAD = 0.015
RADIUS = (6.0, 20.0)  # pixels at 64x64; they scale with the image
OBJECTS = (2, 5)
BACKGROUND_SATURATION = 0.25
SPLIT_CODES = {"train": 0, "val": 1}
NOISE_STREAM = 1  # the label noise's own random stream: images stay the same whatever the noise


def voc_palette() -> list[int]:
    """The standard VOC colour map (bit-interleaved), so label PNGs look like VOC's."""
    ids = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return palette.flatten().tolist()


_PALETTE = voc_palette()


# ---------------------------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float HxWx3 background: smooth noise, a gradient or stripes, greyish, plus fine pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        cells = int(rng.integers(2, 8))
        coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        bg = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    else:
        c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        angle = rng.uniform(0, math.pi)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / size
        if kind == 1:
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        else:
            period = rng.uniform(4, 16) * size / 64
            t = 0.5 + 0.5 * np.sin(2 * math.pi * t * size / period + rng.uniform(0, 2 * math.pi))
        bg = c0 + (c1 - c0) * t[..., None]
    grey = bg.mean(axis=2, keepdims=True)
    bg = grey + BACKGROUND_SATURATION * (bg - grey)  # textured but greyish: objects stand out by colour
    return bg + rng.normal(0, rng.uniform(2, 8), (size, size, 3)).astype(np.float32)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Points at the given radii, evenly spaced in angle starting at ``angle``."""
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step)) for k, r in enumerate(radii)]


def _shape(rng: np.random.Generator, cls: int, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of one object of class ``cls`` centred at (cx, cy) with radius ``r``."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    angle = rng.uniform(0, 2 * math.pi)
    if cls == DISC:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif cls == HEXAGON:
        draw.polygon(_polygon(cx, cy, [r] * 6, angle), fill=1)
    elif cls == SQUARE:
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), fill=1)
    elif cls == BAR:
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=1, width=max(2, round(0.6 * r)))
    elif cls == TRIANGLE:
        angles = angle + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.3, 0.3, 3)  # not always equilateral
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles], fill=1)
    elif cls == STAR:
        draw.polygon(_polygon(cx, cy, [r, 0.5 * r] * 5, angle), fill=1)
    elif cls == CROSS:
        width = max(3, round(0.6 * r))
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=1, width=width)
    elif cls == DIAMOND:
        draw.polygon(_polygon(cx, cy, [r, 0.6 * r] * 2, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def _colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    """RGB in [0, 255] from the class's colour family."""
    hue = HUE[cls] + rng.normal(0, HUE_SPREAD)
    return 255 * np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)), dtype=np.float32)


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, cls: int, grid: np.ndarray) -> None:
    """Paint a shaded, noisy object of class ``cls`` over whatever is there."""
    ys, xs = np.nonzero(mask)
    gx, gy = rng.normal(0, 30, 2) / image.shape[0]
    shade = gx * (grid[1][ys, xs] - xs.mean()) + gy * (grid[0][ys, xs] - ys.mean())
    noise = rng.normal(0, rng.uniform(2, 8), (len(ys), 3))
    image[ys, xs] = _colour(rng, cls) + shade[:, None] + noise


def render(
    rng: np.random.Generator, size: int, noise: np.random.Generator | None = None, label_noise: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """One (uint8 HxWx3 image, uint8 HxW label) pair. With ``noise``, an object of a confused class
    is labelled as its look-alike with probability ``label_noise`` (one draw per object, so a
    larger noise relabels a superset of the objects a smaller one does)."""
    scale = size / 64
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))):
        cls = int(rng.choice(OBJECT_CLASSES))
        r = math.exp(rng.uniform(*np.log(RADIUS))) * scale
        cx, cy = rng.uniform(0.05, 0.95, 2) * size
        mask = _shape(rng, cls, size, cx, cy, r)
        relabel = noise is not None and noise.random() < label_noise and cls in CONFUSED_AS
        if not mask.any():
            continue
        _paint(rng, image, mask, cls, grid)
        label[mask] = CONFUSED_AS[cls] if relabel else cls  # the label follows what is visible
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    return np.asarray(picture), label


# ---------------------------------------------------------------------------------------------- writing


def _image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def generate(
    root: Path, num_train: int, num_val: int, image_size: int, seed: int, label_noise: float = 0.0, progress: bool = True
) -> Path:
    """Write the dataset into ``root`` in the VOC layout the VOC loader reads; returns ``root``.
    ``label_noise`` applies to the training split only."""
    params = _params(num_train, num_val, image_size, seed, label_noise)
    root = Path(root)
    images, labels = root / "JPEGImages", root / "SegmentationClass"
    sets = root / "ImageSets" / "Segmentation"
    for folder in (images, labels, sets):
        folder.mkdir(parents=True, exist_ok=True)
    with make_progress(enabled=progress, transient=True) as bar:  # no bar frames in a log file
        task = bar.add_task(f"generating synthetic data ({image_size}px)", total=num_train + num_val)
        for split, count in (("train", num_train), ("val", num_val)):
            ids = [_image_id(split, i) for i in range(count)]
            for index, image_id in enumerate(ids):
                rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
                noise = np.random.default_rng([seed, SPLIT_CODES[split], index, NOISE_STREAM]) if split == "train" else None
                rgb, label = render(rng, image_size, noise, label_noise)
                Image.fromarray(rgb).save(images / f"{image_id}.png")
                mask = Image.fromarray(label)
                mask.putpalette(_PALETTE)
                mask.save(labels / f"{image_id}.png")
                bar.advance(task)
            (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    info = {"generator_version": GENERATOR_VERSION, "class_names": list(CLASS_NAMES), **params}
    (root / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return root


def _params(num_train: int, num_val: int, image_size: int, seed: int, label_noise: float = 0.0) -> dict[str, float]:
    """The generation arguments, checked: they come straight from a recipe. A noise-free set keeps
    the arguments (and so the folder) it had before label noise existed."""
    values = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    minimum = {"num_train": 1, "num_val": 1, "image_size": 16, "seed": 0}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum[key]:
            raise UserError(f"data.synthetic.{key}: expected an integer >= {minimum[key]}, got {value!r}")
    if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) or not 0.0 <= label_noise <= 1.0:
        raise UserError(f"data.synthetic.label_noise: expected a probability in [0, 1], got {label_noise!r}")
    return {**values, "label_noise": float(label_noise)} if label_noise else values


def synthetic_folder(
    cache_dir: Path, num_train: int, num_val: int, image_size: int, seed: int, label_noise: float = 0.0
) -> Path:
    """Where the dataset of these arguments is cached (named by their hash and the generator's version)."""
    params = _params(num_train, num_val, image_size, seed, label_noise)
    digest = hashlib.sha256(json.dumps({**params, "v": GENERATOR_VERSION}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir).expanduser() / f"synthetic-{image_size}px-{digest[:12]}"


def ensure_synthetic(
    cache_dir: Path,
    num_train: int,
    num_val: int,
    image_size: int,
    seed: int,
    label_noise: float = 0.0,
    progress: bool = True,
) -> Path:
    """The dataset folder for these arguments under ``cache_dir``, generated on first use.

    Generation writes into a temporary folder renamed into place at the end, so a killed
    generation never leaves a half dataset under the final name; a file lock makes processes that
    start together generate it once.
    """
    final = synthetic_folder(cache_dir, num_train, num_val, image_size, seed, label_noise)
    if final.is_dir():
        return final
    with exclusive(final.parent / f".{final.name}.lock", f"Another process is generating this dataset ({final}); waiting for it to finish"):
        if final.is_dir():  # made while this process waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            generate(tmp, num_train, num_val, image_size, seed, label_noise, progress=progress)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
