"""Fault points for the kill tests: `KDBENCH_FAULT=POINT:N[:ACTION]` makes a run act the N-th time
it passes POINT, so a test can kill a real process at an exact place (mid checkpoint write, mid
evaluation) and check that `--resume` loses nothing.

Points: `step` (after a training step), `checkpoint` (the temp file written, not yet renamed into
place), `eval` (after the first batch of an evaluation). Actions: `kill` (SIGKILL: nothing runs
after it; the default), `int` (SIGINT, as Ctrl-C), `enospc` (the write fails: disk full).
Unset, a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

ENV = "KDBENCH_FAULT"
_passes: Counter[str] = Counter()


def fault_point(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, n, *action = spec.split(":")
    if name != point:
        return
    _passes[point] += 1
    if _passes[point] != int(n):
        return
    act = action[0] if action else "kill"
    if act == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif act == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif act == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        raise ValueError(f"{ENV}={spec}: unknown action {act!r} (kill, int, enospc)")
