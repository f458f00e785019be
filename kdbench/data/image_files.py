"""Opening a dataset's image files: a file PIL cannot read is one line naming it, and a stored size
is read from the header alone (evaluation batches images by size)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from kdbench.errors import UserError


def open_image(path: Path, dataset: str, fix: str, decode: bool = True) -> Image.Image:
    """The image at ``path``, read now (``decode`` False: its header only). A file PIL cannot read is
    a UserError: "``dataset``: ``path`` is not an image PIL can read (...); ``fix``"."""
    try:
        image = Image.open(path)
        if decode:
            image.load()
        return image
    except (OSError, ValueError, SyntaxError) as err:  # UnidentifiedImageError, truncated or broken files
        raise UserError(f"{dataset}: {path} is not an image PIL can read ({type(err).__name__}); {fix}") from None


def stored_size(path: Path, dataset: str, fix: str) -> tuple[int, int]:
    """(H, W) of the image at ``path`` as stored, from its header (nothing decoded)."""
    with open_image(path, dataset, fix, decode=False) as image:
        return image.height, image.width
