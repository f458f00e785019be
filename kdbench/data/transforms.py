"""Joint image/mask transforms.

Image and mask travel together as tv_tensors through one torchvision v2 pipeline, so every random
geometric choice (scale, crop offset, flip) is drawn once and applied to both, and the mask is
always resized with nearest interpolation.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from kdbench.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: CIRKD (and the Caffe DeepLab it descends from) subtracts these from 0-255 pixels in B, G, R order.
CIRKD_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
NORMALIZATIONS = ("imagenet", "cirkd_bgr")

Pair = tuple[torch.Tensor, torch.Tensor]
JointTransform = Callable[[Image.Image, "Image.Image | np.ndarray"], Pair]


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range``, relative to the input's own size;
    or, with ``mode="short_side"``, so that the shorter side is an integer drawn uniformly from
    ``scale_range`` (both ends included) and the longer side keeps the aspect ratio, truncated
    (pytorch-deeplab-xception's RandomScaleCrop, which the released AttnFD code uses).

    v2.RandomResize and v2.ScaleJitter scale to absolute sizes; most segmentation recipes scale
    each image relative to itself, whatever its size.
    """

    def __init__(self, scale_range: tuple[float, float], mode: str = "relative", step: float = 0.0) -> None:
        super().__init__()
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.mode = mode
        self.step = float(step)  # > 0: factors low, low + step, ..., high (CIRKD: 0.5 + randint(0, 15) / 10)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.scale_range
        if self.mode == "short_side":
            return {"short": int(torch.randint(int(low), int(high) + 1, ()).item())}
        if self.step > 0:
            return {"factor": low + self.step * int(torch.randint(0, round((high - low) / self.step) + 1, ()).item())}
        return {"factor": low + (high - low) * torch.rand(()).item()}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        h, w = F.get_size(inpt)
        if self.mode == "short_side":
            short = params["short"]
            size = [short, int(w * short / h)] if h <= w else [int(h * short / w), short]
        else:
            size = [max(1, round(h * params["factor"])), max(1, round(w * params["factor"]))]
        return F.resize(inpt, size, antialias=True)  # masks dispatch to the nearest-neighbour kernel


class RandomBlur(v2.Transform):
    """With probability ``p``, a Gaussian blur of the image (not the mask) with sigma uniform in
    [0, 1): PIL's GaussianBlur(radius=random()) in pytorch-deeplab-xception's RandomGaussianBlur."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"sigma": torch.rand(()).item() if torch.rand(()).item() < self.p else 0.0}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        sigma = params["sigma"]
        if not isinstance(inpt, tv_tensors.Image) or sigma < 0.05:  # below 0.05 the kernel is the identity
            return inpt
        radius = max(1, math.ceil(3 * sigma))
        return F.gaussian_blur(inpt, [2 * radius + 1] * 2, [sigma, sigma])


class PadToSize(v2.Transform):
    """Pad bottom/right up to ``size``: image with 0, mask with the ignore index.

    v2.RandomCrop(pad_if_needed=True) pads both sides by the whole missing amount, which crops
    more padding than needed; the reference segmentation codes pad bottom/right only.
    """

    def __init__(self, size: tuple[int, int], ignore_index: int) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.ignore_index = ignore_index

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        h, w = F.get_size(inpt)
        pad_h, pad_w = max(0, self.size[0] - h), max(0, self.size[1] - w)
        if pad_h == 0 and pad_w == 0:
            return inpt
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
        return F.pad(inpt, [0, 0, pad_w, pad_h], fill=fill)


def check_normalization(mode: str) -> str:
    if mode not in NORMALIZATIONS:
        raise UserError(f"data.normalize: expected one of {list(NORMALIZATIONS)}, got {mode!r}")
    return mode


def normalize(images: torch.Tensor, mode: str | None) -> torch.Tensor:
    """uint8 pixels (... x 3 x H x W, RGB) -> the float images the models take, per ``mode``.

    The datasets give uint8 images and the runs normalise whole batches after the copy to the
    device: a loader worker then does a third less work per image (the float conversion was about
    4.5 of 14.5 ms per VOC crop here), and sends a quarter of the bytes. Float images are taken as
    model input already (the random batches of ``kdbench bench`` and of tests) and pass unchanged.
    The arithmetic is torchvision's (to_dtype with scale, then normalize), so results keep their bits."""
    if images.dtype != torch.uint8:
        return images
    if mode is None:
        raise ValueError("uint8 images need their dataset's normalisation (Splits.normalize)")
    mean, std = _channel_stats(mode, images.device)
    if mode == "imagenet":
        return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
    return images.flip(-3).float().sub_(mean)


@functools.cache
def _channel_stats(mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, std) as 3 x 1 x 1 float32 tensors on ``device``, made once: a tensor made from Python
    numbers for each batch would be a blocking copy to a GPU, which waits for the steps queued before.
    The mode is checked here, once per mode and device rather than for every batch."""
    if check_normalization(mode) == "imagenet":
        return torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1), torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return torch.tensor(CIRKD_BGR_MEAN, device=device).view(3, 1, 1), None


class Joint:
    """Wraps a v2 pipeline: PIL image + PIL/numpy mask in, (uint8 3xHxW, uint8 HxW) out: what loader
    workers send, a fifth of the bytes of float images and int64 labels. A run makes a batch of them
    model input on the device (``engine.model_batch``)."""

    def __init__(self, pipeline: v2.Transform | None) -> None:
        self.pipeline = pipeline

    def __call__(self, image: Image.Image, mask: Image.Image | np.ndarray) -> Pair:
        img = tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))
        lbl = tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.uint8, copy=True)))
        if img.shape[-2:] != lbl.shape[-2:]:
            raise UserError(f"image {tuple(img.shape[-2:])} and mask {tuple(lbl.shape[-2:])} differ in size")
        if self.pipeline is not None:
            img, lbl = self.pipeline(img, lbl)
        return img.as_subclass(torch.Tensor), lbl.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"Joint({self.pipeline})"


def train_transform(
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    ignore_index: int = 255,
    scale_mode: str = "relative",
    blur: float = 0.0,
    scale_step: float = 0.0,
) -> Joint:
    """Random scale, pad (the mask with ``ignore_index``), random crop to ``crop_size`` (H, W),
    horizontal flip, Gaussian blur with probability ``blur``."""
    crop = (int(crop_size[0]), int(crop_size[1]))
    steps: list[v2.Transform] = [
        RandomScale(scale_range, scale_mode, scale_step),
        PadToSize(crop, ignore_index),
        v2.RandomCrop(crop),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if blur > 0:
        steps.append(RandomBlur(blur))
    return Joint(v2.Compose(steps))


def eval_transform(resize_short: int | None = None) -> Joint:
    """The image at its own size: evaluation sees every pixel at its own resolution. With
    ``resize_short``, image and mask are first resized so the shorter side has that length
    (bilinear / nearest), as pytorch-deeplab-xception's FixedResize does for validation."""
    return Joint(None if resize_short is None else v2.Resize(int(resize_short), antialias=True))
