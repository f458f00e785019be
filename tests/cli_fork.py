"""A warm `kdbench` command line for tests that run many commands.

Starting Python and importing torch, timm, MLflow and Optuna takes seconds per command, which is
most of a bad-input case. The test session starts one server process that imports them once;
every command of every `ForkedCLI` is then a child forked from it: its own process, working
folder, environment, argv, stdout/stderr files and exit code, running `kdbench.cli.main` as the
`kdbench` script does (an uncaught exception prints its traceback and exits 1, as the interpreter
would). The server never runs a torch op, so the children start with torch's thread pools untouched.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.pristine_store import seed_store

SERVER = r"""
import json, os, select, signal, sys, traceback
import kdbench.cli
# what the commands import lazily: imported here once, so a child starts warm
import kdbench.run, kdbench.tune, kdbench.sweep, kdbench.table, kdbench.plots, kdbench.bench  # noqa: F401
import mlflow, optuna, timm, torchvision  # noqa: F401

def child(req):
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = ["kdbench", *req["args"]]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            kdbench.cli.main()
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

running = {}
out = sys.stdout
pending, closed = b"", False
while not closed:
    ready, _, _ = select.select([0], [], [], 0.05)
    if ready:  # raw reads: a buffered readline would hide a second request from select
        chunk = os.read(0, 1 << 16)
        closed = not chunk
        pending += chunk
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        req = json.loads(line)
        if "kill" in req:
            pid = next((p for p, i in running.items() if i == req["kill"]), None)
            if pid:
                os.kill(pid, signal.SIGKILL)
            continue
        pid = os.fork()
        if pid == 0:
            child(req)
        running[pid] = req["id"]
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        out.write(json.dumps({"id": running.pop(pid), "rc": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()
"""


def store_env(cwd: Path) -> dict[str, str]:
    """This process's environment with a command's own teacher cache and MLflow store under ``cwd``."""
    return {**os.environ, "KDBENCH_CACHE": str(cwd / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{seed_store(cwd / 'mlflow.db')}"}


@dataclass
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class _Server:
    """The warm process and the thread that reads which of its children ended, with what code."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.done: dict[int, int] = {}
        self.cond = threading.Condition()
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                self.done[msg["id"]] = msg["rc"]
                self.cond.notify_all()
        with self.cond:  # the server died: nothing more will finish
            self.done.setdefault(-1, -1)
            self.cond.notify_all()

    def send(self, msg: dict) -> None:
        with self.cond:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_shared: _Server | None = None
_shared_lock = threading.Lock()


def _server() -> _Server:
    """One server for the whole test session (its import costs seconds; it never runs a command
    itself, so commands forked from it share nothing); a new one if it died."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.proc.poll() is not None:
            _shared = _Server()
            atexit.register(_shared.close)
        return _shared


class ForkedCLI:
    """Commands forked from the session's warm server, with their stdout/stderr files in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.server = _server()

    def run(self, args: tuple[str, ...], cwd: Path, env: dict[str, str], timeout: float) -> Result:
        """Run one command to its end (killed after ``timeout`` seconds: return code -9)."""
        srv = self.server
        with srv.cond:
            i = srv.next_id
            srv.next_id += 1
        out, err = self.folder / f"{i}.out", self.folder / f"{i}.err"
        srv.send({"id": i, "args": list(args), "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)})
        with srv.cond:
            if not srv.cond.wait_for(lambda: i in srv.done or -1 in srv.done, timeout):
                srv.send({"kill": i})
                srv.cond.wait_for(lambda: i in srv.done or -1 in srv.done, 30)
            rc = srv.done.get(i, -1)
        text = [p.read_text() if p.exists() else "" for p in (out, err)]
        if rc == -1 and -1 in srv.done:
            text[1] += "\n(the forked CLI server died)"
        return Result(tuple(args), rc, *text)
