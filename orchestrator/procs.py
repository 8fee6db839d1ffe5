"""Child processes that never outlive the orchestrator.

Each child runs in its own process group (so a kill reaches its helpers too) with
PR_SET_PDEATHSIG, so it is killed if the orchestrator dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup() -> None:
    os.setpgid(0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Child:
    """A started process whose stdout and stderr go to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self._out.write(f"$ {' '.join(self.argv)}\n".encode())
        self._out.flush()
        self.proc = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                     preexec_fn=_child_setup, close_fds=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 20) -> str:
        try:
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the group, then SIGKILL after ``grace`` seconds. Idempotent."""
        if self.alive():
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.alive():
            self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._signal(signal.SIGKILL)  # stragglers left in the group
        self._out.close()
        return self.proc.returncode

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def wait_for(predicate, timeout: float, step: float = 0.05, what: str = "condition",
             abort=None) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until true; raise TimeoutError after ``timeout`` seconds.

    ``abort`` is polled too: when it returns a string, waiting stops with that as the error.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if abort is not None:
            reason = abort()
            if reason:
                raise RuntimeError(f"while waiting for {what}: {reason}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def process_alive(pid: int) -> bool:
    """Alive and not a zombie (an orphan reaped late by init counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status
