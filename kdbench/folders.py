"""Folders kdbench writes in: checked writable before any work, and locked while one process fills
a cache entry or first opens a store. No torch here, so the MLflow side (tracking, schema) stays
light to import."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdbench.errors import UserError


@contextmanager
def exclusive(lock_file: Path, waiting: str | None = None, what: str = "cache_dir") -> Iterator[None]:
    """An exclusive file lock for making a cache entry: processes that need the same entry at once
    (a sweep's workers, two terminals) make it once; the others print ``waiting`` (if given) and
    wait, then find it made. The kernel drops the lock of a killed holder."""
    import fcntl

    writable_folder(lock_file.parent, what)
    with open(lock_file, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def writable_folder(folder: str | Path, what: str) -> Path:
    """The folder, created if needed; one line (naming the recipe key ``what``) if it cannot be
    written, before any work rather than at the first checkpoint."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise UserError(f"{what}: cannot write in {folder} ({err.strerror or err}); choose another with --set {what}=DIR") from None
    return folder
