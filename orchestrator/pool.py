"""A warm guest per kernel that runs matrix cells on request (the "cell server").

Booting a TCG guest costs seconds; a matrix has hundreds of cells. A pool keeps one guest
of its kernel alive and runs cells in it one at a time (a kernel may have several pools,
one per slot: ``guests.py``), resetting state in between (pinlab.ko
reloaded, the audit marked, the scenario's own files and cgroups removed by the workload).
It reboots the guest after a cell that broke the kernel (BUG/Oops/WARN/hung task: a WARN_ON_ONCE
fires once per boot, so a later cell could not see it) or made the guest unreachable.

Clients (Avocado cell tests, ``pinlab matrix``, ``pinlab validate``, through
``poolclient.py``) send one JSON request per connection on ``<pool dir>/pool.sock``
(``{"op": "run", "cell": ..., "artifacts": DIR, "fresh": true}`` reboots the guest before
the cell); the first client starts the server (a lock keeps it to one per pool directory),
which exits by itself after ``idle`` seconds without a request, or on ``{"op": "stop"}``.
In the guest, cells run through the guest agent (``agent.py``): no SSH command and no
Python start-up per cell.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pinlab.common import jsonlines

from . import events
from .dmesg import SEVERE, classify
from .expectations import Cell
from .guestenv import guest_config, irq_of
from .poolclient import ANOTHER_POOL
from .scenario import Observation
from .session import GuestSession

IDLE_SECONDS = 180.0


# -- server ------------------------------------------------------------------------------
class CellServer:
    def __init__(self, kernel: str, d: Path, idle: float) -> None:
        self.kernel, self.dir, self.idle = kernel, d, idle
        self.boots = 0
        self.session: GuestSession | None = None
        self._cm: contextlib.ExitStack | None = None
        self.taint = ""

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} pool[{self.kernel}]: {msg}", flush=True)

    def boot(self, irq: str = "msi") -> GuestSession:
        """Boot a fresh guest (guestenv.guest_config with the device's ``irq``)."""
        self.shutdown_guest()
        self.boots += 1
        art = self.dir / f"boot-{self.boots}"
        stack = contextlib.ExitStack()
        try:
            self.session = stack.enter_context(
                GuestSession.boot(self.kernel, art, config=guest_config(irq)))
        except BaseException:
            stack.close()
            raise
        self._cm = stack
        self.taint = ""
        self.log(f"guest booted in {self.session.guest.boot_seconds:.1f}s, irq {irq} ({art})")
        return self.session

    def shutdown_guest(self) -> None:
        if self._cm:
            with contextlib.suppress(Exception):
                self._cm.close()
        self._cm, self.session = None, None

    def ready_session(self, irq: str = "msi") -> GuestSession:
        """The warm guest, reset for the next cell; a fresh one when there is none, it is
        tainted or dead, or its device's interrupts are not ``irq``."""
        if (self.session is not None and not self.taint
                and irq_of(self.session.guest.cfg.device_args) != irq):
            self.taint = f"the next cell needs a device with {irq}"
        if self.session is None or self.taint or self.session.guest.dead():
            if self.taint:
                self.log(f"rebooting: {self.taint}")
            return self.boot(irq)
        s = self.session
        # reset: a fresh driver instance for every cell
        try:
            s.reload_module()
        except Exception as exc:  # noqa: BLE001 - any failure here means: reboot
            self.taint = f"module reload failed: {exc}"
            self.log(self.taint)
            return self.boot(irq)
        return s

    def run_cell(self, cell: Cell, art: Path) -> dict[str, Any]:
        art.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        ev = events.event(cell.event)
        s = self.ready_session(ev.irq if ev is not None else "msi")
        s.mark()
        try:
            if ev is None:
                raise ValueError(f"no event {cell.event!r} in orchestrator/events/")
            obs = ev.run(s, cell, art)
        except Exception as exc:  # noqa: BLE001 - an experiment error is a result
            obs = Observation("ERROR", {"exception": repr(exc),
                                        "trace": traceback.format_exc()})
        # Did the cell break the guest? Then the next cell gets a fresh one. A scenario
        # reports the dmesg classes its cell added; otherwise look at the whole log (any
        # severe line since boot means the kernel is no longer fresh).
        if obs.evidence.get("needs_reboot"):
            self.taint = (f"cell {cell.name}: "
                          f"{obs.evidence.get('reboot_reason', 'removed the device')}")
        if s.broken:
            self.taint = f"cell {cell.name}: {s.broken}"
        seen = obs.evidence.get("dmesg")
        try:
            if not isinstance(seen, dict):
                text = s.guest.ssh.run("dmesg", timeout=60, check=True).out
                (art / "dmesg-guest.txt").write_text(text)
                seen = classify(text).summary()
            severe = sorted(set(seen) & SEVERE)
            if severe:
                self.taint = f"cell {cell.name} left {severe} in dmesg"
        except Exception as exc:  # noqa: BLE001
            self.taint = f"guest unreachable after {cell.name}: {exc!r}"
        if s.guest.dead():
            self.taint = f"guest died in {cell.name}: {s.guest.dead()}"
        with contextlib.suppress(Exception):
            (art / "console-tail.txt").write_text(s.guest.console.tail(200))
        return {"observed": obs.observed, "evidence": obs.evidence,
                "seconds": round(time.monotonic() - t0, 2), "boot": self.boots,
                "guest": str(s.guest.artifacts), "release": s.guest.images.kernel.release,
                "taint": self.taint}

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "kernel": self.kernel, "boots": self.boots, "pid": os.getpid()}
        if op == "run":
            cell = Cell(**req["cell"])
            if cell.kernel != self.kernel:
                return {"error": f"this pool runs kernel {self.kernel}, not {cell.kernel}"}
            if events.event(cell.event) is None:
                return {"error": f"no scenario for event {cell.event!r}"}
            if req.get("fresh") and self.session is not None:
                # `pinlab validate` re-runs a differing cell on a freshly booted guest
                self.taint = self.taint or "a freshly booted guest was requested"
            return {**self.run_cell(cell, Path(req["artifacts"])),
                    "fresh": bool(req.get("fresh"))}
        if op == "stop":
            return {"ok": True, "stopping": True}
        return {"error": f"unknown op {op!r}"}

    def serve(self) -> int:
        # One pool per kernel: two clients may both find no socket and both start one.
        # The lock is held for the pool's lifetime; the loser exits with ANOTHER_POOL and
        # its client goes on waiting for the winner's socket.
        lock = (self.dir / "pool.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log("another pool already serves this kernel")
            lock.close()
            return ANOTHER_POOL
        sock_path = self.dir / "pool.sock"
        sock_path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(sock_path))
        srv.listen(8)
        stop = {"now": False}

        def on_term(signum: int, frame: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        last = [time.monotonic()]

        def running() -> bool:
            return not stop["now"] and time.monotonic() - last[0] < self.idle

        def answer(req: dict[str, Any]) -> dict[str, Any]:
            try:
                resp = self.handle(req)
            except Exception as exc:  # noqa: BLE001 - answer, keep serving
                resp = {"error": f"{exc!r}", "trace": traceback.format_exc()}
                self.taint = self.taint or f"pool error: {exc!r}"
            if req.get("op") == "stop":
                stop["now"] = True
            last[0] = time.monotonic()
            return resp

        self.log(f"serving on {sock_path} (idle exit after {self.idle:.0f}s)")
        try:
            jsonlines.serve(srv, answer, running=running,
                            on_bad=lambda exc: self.log(f"bad request: {exc!r}"))
        finally:
            self.log("shutting down")
            srv.close()
            sock_path.unlink(missing_ok=True)
            self.shutdown_guest()
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pinlab.orchestrator.pool")
    p.add_argument("--kernel", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--idle", type=float, default=float(os.environ.get("PINLAB_POOL_IDLE",
                                                                        IDLE_SECONDS)))
    a = p.parse_args(argv)
    return CellServer(a.kernel, Path(a.dir), a.idle).serve()


if __name__ == "__main__":
    sys.exit(main())
