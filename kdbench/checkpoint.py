"""Checkpoints written atomically and read back safely (``weights_only=True``)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdbench.errors import UserError
from kdbench.faults import fault_point


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temp file in the same folder, then rename: a kill never leaves half a file, and a
    failed write (disk full, no permission) leaves the previous file as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            fault_point("checkpoint")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        kept = "; the previous one is intact" if path.is_file() else ""
        raise UserError(f"cannot write {path} ({err.strerror or err}){kept}: free some space or choose another output_dir, then continue with --resume") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)


def write_checksum(path: str | Path) -> None:
    """A ``PATH.sha256`` beside a file that is reused across runs (a cached teacher), so a file
    damaged later is found before it is used."""
    path = Path(path)
    Path(f"{path}.sha256").write_text(_sha256(path) + "\n")


def verify_checksum(path: str | Path) -> str | None:
    """What is wrong with a file against its ``.sha256`` (None: it matches, or has none yet)."""
    path, sidecar = Path(path), Path(f"{path}.sha256")
    if not sidecar.is_file():
        return None
    if sidecar.read_text().strip() != _sha256(path):
        return "its content does not match the checksum written when it was cached"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _numpy_scalars() -> list[Any]:
    """numpy scalars and dtypes: data, not code. Released checkpoints hold some (AttnFD's
    ``best_pred`` is a numpy float64), which plain weights_only loading refuses."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray.scalar, np.dtype, *(type(np.dtype(t)) for t in ("float64", "float32", "int64"))]


_DATA_GLOBALS = _numpy_scalars()


def load(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: no file {path}")
    try:
        with torch.serialization.safe_globals(_DATA_GLOBALS):
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
