"""Rich progress bars that show what a researcher watches: step, loss, lr, throughput, ETA."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Silent:
    """Stands in for a Progress when ``--quiet``: same calls, no output."""

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def advance(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def make_console(stderr: bool = False) -> Console:
    """A console that does not cut lines at 80 columns where the output is a file or a pipe."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=200, soft_wrap=True)


def per_class_table(title: str, class_names: Sequence[str], iou: Sequence[float]) -> Table:
    """One row of per-class IoU (%) under the class names; "-" for a class absent from the split."""
    table = Table(title=title, title_justify="left")
    for name in class_names:
        table.add_column(name, justify="right")
    table.add_row(*[f"{100 * v:.1f}" if v == v else "-" for v in iou])
    return table


class LineLog:
    """The training bar where the output is not a terminal (a log file, nohup, a cluster job, CI):
    one plain timestamped line per update that carries the loss (every ``train.log_interval``),
    with step/total, loss, lr, img/s and the time left. Same calls as a Progress."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.tasks: dict[int, dict[str, Any]] = {}

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        key = len(self.tasks)
        self.tasks[key] = {"description": description, "total": total, "completed": completed, "first": completed, "start": time.monotonic(), **fields}
        return key

    def update(self, task: int, completed: float | None = None, **fields: Any) -> None:
        t = self.tasks[task]
        if completed is not None:
            t["completed"] = completed
        t.update(fields)
        if "loss" in fields:
            self._line(t)

    def advance(self, task: int, advance: float = 1) -> None:
        self.tasks[task]["completed"] += advance

    def _line(self, t: dict[str, Any]) -> None:
        done, total, elapsed = t["completed"], t["total"], time.monotonic() - t["start"]
        rate = (done - t["first"]) / elapsed if elapsed > 0 else 0.0
        left = f"{(total - done) / rate:.0f} s" if rate > 0 and total else "?"
        self.console.print(
            f"{time.strftime('%H:%M:%S')} {t['description']} step {done:.0f}/{total:.0f} loss {t['loss']:.4f} "
            f"lr {t['lr']:.2e} {t['ips']:.0f} img/s, {left} left",
            markup=False,
            highlight=False,
        )

    def __enter__(self) -> "LineLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def make_progress(enabled: bool = True, transient: bool = False) -> Progress | LineLog | _Silent:
    """A rich progress bar on a terminal. Elsewhere, a training bar becomes plain log lines and a
    transient bar (evaluation, set-up) nothing: frames of a bar are noise in a log file."""
    if not enabled:
        return _Silent()
    console = make_console()
    if not console.is_terminal:
        return _Silent() if transient else LineLog(console)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s", markup=False)
        if not transient
        else TextColumn(""),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        transient=transient,
        console=console,
    )

