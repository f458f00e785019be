"""Checkpoints written atomically and read back safely (``weights_only=True``)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdbench.errors import UserError


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temp file in the same folder, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: no file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled code, wrong format
        raise load_error(what, path, err) from None


def load_error(what: str, path: str | Path, err: Exception, noun: str = "") -> UserError:
    """One line for a file ``torch.load(weights_only=True)`` refused: pickled code, or not a checkpoint."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch's message has terminal colour codes
    code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if code:
        return UserError(
            f"{what}: {path} holds pickled code ({code.group(1)}), which kdbench never runs (weights_only loading); "
            "save only tensors, e.g. torch.save({'model': model.state_dict()}, path)"
        )
    first = text.splitlines()[0][:160] if text else ""
    return UserError(f"{what}: cannot read {noun}{path} ({type(err).__name__}: {first}); expected a whole checkpoint file: is it truncated, or of another format?")
