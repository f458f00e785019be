"""The embedded benchmark: a synthetic segmentation set, written in the Pascal VOC layout.

It must be a task where distillation can matter, so a bigger or longer-trained model has to beat a
small one clearly. Colour never tells the classes apart: every object's colour comes from the same
distribution, sometimes close to the background under it. What does:

- shape: disc, square, triangle, star, cross; thin shapes (ring, line) one or two pixels wide;
- context: a "window" is a small square lying inside a large filled object. A small square
  elsewhere is a "square", and small squares are never placed on top of other objects, so only
  the surroundings separate the two classes;
- clutter: textured backgrounds (smooth noise, gradients, stripes that look like lines), shaded
  and noisy objects, occlusion (later objects hide earlier ones; labels follow what is visible),
  objects from a few pixels to most of the image, and an occasional slight blur.

Every image comes from its own generator seeded with (seed, split, index): the same arguments give
byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from kdbench.checkpoint import exclusive
from kdbench.errors import UserError
from kdbench.progress import make_progress

#: Bump when the images change for the same arguments: it is part of the cache folder's name.
GENERATOR_VERSION = 4

CLASS_NAMES: tuple[str, ...] = (
    "background", "disc", "square", "triangle", "star", "ring", "cross", "line", "window",
)  # fmt: skip
BACKGROUND, DISC, SQUARE, TRIANGLE, STAR, RING, CROSS, LINE, WINDOW = range(len(CLASS_NAMES))
#: Classes drawn on their own; windows only appear inside a large DISC/SQUARE/TRIANGLE/STAR.
FREE_CLASSES = (DISC, SQUARE, TRIANGLE, STAR, RING, CROSS, LINE)
HOST_CLASSES = (DISC, SQUARE, TRIANGLE, STAR)

# Sizes are radii in pixels at 64x64 and scale with the image; thin widths do not.
SMALL_RADIUS = (5.0, 14.0)
LARGE_RADIUS = (12.0, 22.0)
LARGE_PROBABILITY = 0.4
WINDOW_RADIUS = (2.0, 4.0)
WINDOW_PROBABILITY = 0.7
LOW_CONTRAST_PROBABILITY = 0.05
MIN_CONTRAST = 70.0
BACKGROUND_CONTRAST = 0.5
SPLIT_CODES = {"train": 0, "val": 1}


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
    """Float HxWx3 background: smooth noise, a gradient or stripes, plus fine pixel noise."""
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
    bg = 128 + BACKGROUND_CONTRAST * (bg - 128)  # textured, but quieter than the objects on it
    return bg + rng.normal(0, rng.uniform(2, 12), (size, size, 3)).astype(np.float32)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Points at the given radii, evenly spaced in angle starting at ``angle``."""
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step)) for k, r in enumerate(radii)]


def _shape(rng: np.random.Generator, cls: int, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of one object of class ``cls`` centred at (cx, cy) with radius ``r``."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    angle = rng.uniform(0, 2 * math.pi)
    thin = int(rng.integers(1, 3))
    if cls == DISC:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif cls in (SQUARE, WINDOW):
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), fill=1)
    elif cls == TRIANGLE:
        angles = angle + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.3, 0.3, 3)  # not always equilateral
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles], fill=1)
    elif cls == STAR:
        draw.polygon(_polygon(cx, cy, [r, 0.42 * r] * 5, angle), fill=1)
    elif cls == RING:
        r = max(r, 3.0)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, width=thin)
    elif cls == CROSS:
        width = max(2, round(0.35 * r))
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=1, width=width)
    elif cls == LINE:
        dx, dy = 1.6 * r * math.cos(angle), 1.6 * r * math.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=1, width=thin)
    return np.asarray(canvas, dtype=bool)


def _paint(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, mask: np.ndarray, cls: int, grid: np.ndarray
) -> None:
    """Paint a shaded, noisy object over whatever is there; the label follows what is visible."""
    ys, xs = np.nonzero(mask)
    if rng.random() < LOW_CONTRAST_PROBABILITY:
        under = image[ys, xs].mean(axis=0)
        colour = np.clip(under + rng.normal(0, 25, 3), 0, 255)
    else:
        colour = rng.uniform(0, 255, 3)
        under = image[ys, xs].mean(axis=0)
        if np.abs(colour - under).max() < MIN_CONTRAST:  # visible, whatever its colour
            colour = np.where(under > 128, under - MIN_CONTRAST, under + MIN_CONTRAST)
    gx, gy = rng.normal(0, 30, 2) / image.shape[0]
    shade = gx * (grid[1][ys, xs] - xs.mean()) + gy * (grid[0][ys, xs] - ys.mean())
    noise = rng.normal(0, rng.uniform(2, 10), (len(ys), 3))
    image[ys, xs] = colour + shade[:, None] + noise
    label[ys, xs] = cls


def _window_place(
    rng: np.random.Generator, host: np.ndarray, r: float, size: int
) -> tuple[float, float] | None:
    """A centre where a square of radius r, plus a margin, lies wholly inside ``host``; None if none."""
    side = int(math.ceil(2 * r)) + 3  # the rotated square's bounding box plus a pixel on each side
    if side >= size:
        return None
    table = np.pad(host.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    boxes = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
    ys, xs = np.nonzero(boxes == side * side)
    if len(ys) == 0:
        return None
    k = rng.integers(len(ys))
    return xs[k] + side / 2, ys[k] + side / 2


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (uint8 HxWx3 image, uint8 HxW label) pair."""
    scale = size / 64
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 7))):
        cls = int(rng.choice(FREE_CLASSES))
        large = rng.random() < LARGE_PROBABILITY
        low, high = LARGE_RADIUS if large else SMALL_RADIUS
        r = max(2.0, math.exp(rng.uniform(math.log(low), math.log(high))) * scale)
        for _attempt in range(8):
            cx, cy = rng.uniform(-0.1, 1.1, 2) * size
            mask = _shape(rng, cls, size, cx, cy, r)
            if not mask.any():
                continue
            # A small square (up to twice the largest window) on another object would look exactly
            # like a window: keep them apart, so that context alone tells window from square.
            if cls == SQUARE and r < WINDOW_RADIUS[1] * 2 * scale and label[mask].any():
                continue
            break
        else:
            continue
        _paint(rng, image, label, mask, cls, grid)
        if large and cls in HOST_CLASSES and rng.random() < WINDOW_PROBABILITY:
            wr = max(1.5, rng.uniform(*WINDOW_RADIUS) * scale)
            centre = _window_place(rng, mask, wr, size)
            if centre is not None:
                _paint(rng, image, label, _shape(rng, WINDOW, size, *centre, wr), WINDOW, grid)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if rng.random() < 0.4:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return np.asarray(picture), label


# ---------------------------------------------------------------------------------------------- writing


def _image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def generate(
    root: Path, num_train: int, num_val: int, image_size: int, seed: int, progress: bool = True
) -> Path:
    """Write the dataset into ``root`` in the VOC layout the VOC loader reads; returns ``root``."""
    params = _params(num_train, num_val, image_size, seed)
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
                rgb, label = render(rng, image_size)
                Image.fromarray(rgb).save(images / f"{image_id}.png")
                mask = Image.fromarray(label)
                mask.putpalette(_PALETTE)
                mask.save(labels / f"{image_id}.png")
                bar.advance(task)
            (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    info = {"generator_version": GENERATOR_VERSION, "class_names": list(CLASS_NAMES), **params}
    (root / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return root


def _params(num_train: int, num_val: int, image_size: int, seed: int) -> dict[str, int]:
    """The generation arguments, checked: they come straight from a recipe."""
    values = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    minimum = {"num_train": 1, "num_val": 1, "image_size": 16, "seed": 0}
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum[key]:
            raise UserError(f"data.synthetic.{key}: expected an integer >= {minimum[key]}, got {value!r}")
    return values


def synthetic_folder(cache_dir: Path, num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    """Where the dataset of these arguments is cached (named by their hash and the generator's version)."""
    params = _params(num_train, num_val, image_size, seed)
    digest = hashlib.sha256(json.dumps({**params, "v": GENERATOR_VERSION}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir).expanduser() / f"synthetic-{image_size}px-{digest[:12]}"


def ensure_synthetic(
    cache_dir: Path, num_train: int, num_val: int, image_size: int, seed: int, progress: bool = True
) -> Path:
    """The dataset folder for these arguments under ``cache_dir``, generated on first use.

    Generation writes into a temporary folder renamed into place at the end, so a killed
    generation never leaves a half dataset under the final name; a file lock makes processes that
    start together generate it once.
    """
    final = synthetic_folder(cache_dir, num_train, num_val, image_size, seed)
    if final.is_dir():
        return final
    with exclusive(final.parent / f".{final.name}.lock", f"Another process is generating this dataset ({final}); waiting for it to finish"):
        if final.is_dir():  # made while this process waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            generate(tmp, num_train, num_val, image_size, seed, progress=progress)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
