"""A warm guest per kernel that runs matrix cells on request (the "cell server").

Booting a TCG guest costs seconds; a matrix has hundreds of cells. The pool keeps one guest
per kernel alive and runs cells in it one at a time, resetting state in between (pinlab.ko
reloaded, the audit marked, the scenario's own files and cgroups removed by the workload).
It reboots the guest after a cell that broke the kernel (BUG/Oops/WARN/hung task: a WARN_ON_ONCE
fires once per boot, so a later cell could not see it) or made the guest unreachable.

Clients (Avocado cell tests, ``pinlab matrix``) send one JSON request per connection on
``<pool dir>/pool.sock``; the first client starts the server, which exits by itself after
``idle`` seconds without a request, or on ``{"op": "stop"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pinlab.images.cache import cache_root

from .dmesg import SEVERE, classify
from .expectations import Cell
from .procs import process_alive
from .scenario import SCENARIOS, Observation
from .session import GuestSession
from .vm import GuestConfig

IDLE_SECONDS = 180.0
BOOT_DEADLINE = 300.0
REQUEST_TIMEOUT = 900.0


def pool_dir(kernel: str) -> Path:
    base = Path(os.environ.get("PINLAB_POOL_DIR") or cache_root() / "pools")
    d = base / kernel
    d.mkdir(parents=True, exist_ok=True)
    return d


def guest_config() -> GuestConfig:
    """What a matrix guest looks like: scratch disks for the filesystems, page poisoning,
    and the device with MSI instead of MSI-X: QEMU 11.1's vfio-user-pci aborts on
    device_del of an MSI-X device, and the hot-unplug cells need device_del to work."""
    return GuestConfig(scratch_disks={"pinlab-ext4": 512, "pinlab-xfs": 512},
                       cmdline="page_poison=1", device_args=["--irq", "msi"])


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

    def boot(self) -> GuestSession:
        self.shutdown_guest()
        self.boots += 1
        art = self.dir / f"boot-{self.boots}"
        stack = contextlib.ExitStack()
        try:
            self.session = stack.enter_context(
                GuestSession.boot(self.kernel, art, config=guest_config()))
        except BaseException:
            stack.close()
            raise
        self._cm = stack
        self.taint = ""
        self.log(f"guest booted in {self.session.guest.boot_seconds:.1f}s ({art})")
        return self.session

    def shutdown_guest(self) -> None:
        if self._cm:
            with contextlib.suppress(Exception):
                self._cm.close()
        self._cm, self.session = None, None

    def ready_session(self) -> GuestSession:
        if self.session is None or self.taint or self.session.guest.dead():
            if self.taint:
                self.log(f"rebooting: {self.taint}")
            return self.boot()
        s = self.session
        # reset: a fresh driver instance for every cell
        r = s.guest.ssh.run("rmmod pinlab && insmod /tmp/pinlab.ko && "
                            "for i in $(seq 100); do [ -c /dev/pinlab0 ] && exit 0; sleep 0.1;"
                            " done; exit 1", timeout=60)
        if r.rc != 0:
            self.taint = f"module reload failed: {r.err.strip() or r.out.strip()}"
            self.log(self.taint)
            return self.boot()
        return s

    def run_cell(self, cell: Cell, art: Path) -> dict[str, Any]:
        art.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        s = self.ready_session()
        s.mark()
        try:
            obs = SCENARIOS[cell.event](s, cell, art)
        except Exception as exc:  # noqa: BLE001 - an experiment error is a result
            obs = Observation("ERROR", {"exception": repr(exc),
                                        "trace": traceback.format_exc()})
        # Did the cell break the guest? Then the next cell gets a fresh one. A scenario
        # reports the dmesg classes its cell added; otherwise look at the whole log (any
        # severe line since boot means the kernel is no longer fresh).
        if obs.evidence.get("needs_reboot"):
            self.taint = f"cell {cell.name} removed the device"
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
            if cell.event not in SCENARIOS:
                return {"error": f"no scenario for event {cell.event!r}"}
            return self.run_cell(cell, Path(req["artifacts"]))
        if op == "stop":
            return {"ok": True, "stopping": True}
        return {"error": f"unknown op {op!r}"}

    def serve(self) -> int:
        sock_path = self.dir / "pool.sock"
        sock_path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(sock_path))
        srv.listen(8)
        srv.settimeout(1.0)
        stop = {"now": False}

        def on_term(signum: int, frame: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        last = time.monotonic()
        self.log(f"serving on {sock_path} (idle exit after {self.idle:.0f}s)")
        try:
            while not stop["now"] and time.monotonic() - last < self.idle:
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(30)
                    try:
                        req = _recv_json(conn)
                    except (OSError, ValueError) as exc:
                        self.log(f"bad request: {exc!r}")
                        continue
                    try:
                        resp = self.handle(req)
                    except Exception as exc:  # noqa: BLE001 - answer, keep serving
                        resp = {"error": f"{exc!r}", "trace": traceback.format_exc()}
                        self.taint = self.taint or f"pool error: {exc!r}"
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps(resp, default=str).encode() + b"\n")
                    if req.get("op") == "stop":
                        break
                last = time.monotonic()
        finally:
            self.log("shutting down")
            srv.close()
            sock_path.unlink(missing_ok=True)
            self.shutdown_guest()
        return 0


def _recv_json(conn: socket.socket) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    obj = json.loads(buf.decode())
    if not isinstance(obj, dict):
        raise ValueError("request is not a JSON object")
    return obj


# -- client ------------------------------------------------------------------------------
class PoolError(RuntimeError):
    pass


def request(kernel: str, req: dict[str, Any], timeout: float = REQUEST_TIMEOUT,
            start: bool = True) -> dict[str, Any]:
    """Send one request to the kernel's pool, starting the pool if needed."""
    d = pool_dir(kernel)
    path = d / "pool.sock"
    deadline = time.monotonic() + BOOT_DEADLINE
    started: subprocess.Popen[bytes] | None = None
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(10)
            s.connect(str(path))
            break
        except OSError as exc:
            s.close()
            if not start:
                raise PoolError(f"no pool for kernel {kernel} at {path}") from exc
            if started is None:
                started = _spawn(kernel, d)
            elif started.poll() is not None:
                tail = (d / "pool.log").read_text(errors="replace")[-3000:]
                raise PoolError(f"pool for {kernel} exited ({started.returncode}):\n{tail}") \
                    from exc
            if time.monotonic() > deadline:
                raise PoolError(f"pool for {kernel} did not start within "
                                f"{BOOT_DEADLINE:.0f}s; see {d / 'pool.log'}") from exc
            time.sleep(0.2)
    with s:
        s.settimeout(timeout)
        s.sendall(json.dumps(req).encode() + b"\n")
        try:
            resp = _recv_json(s)
        except (OSError, ValueError) as exc:
            raise PoolError(f"pool for {kernel} gave no answer to {req.get('op')}: "
                            f"{exc!r}; see {d / 'pool.log'}") from exc
    if "error" in resp:
        raise PoolError(f"pool for {kernel}: {resp['error']}\n{resp.get('trace', '')}")
    return resp


def _spawn(kernel: str, d: Path) -> subprocess.Popen[bytes]:
    log = open(d / "pool.log", "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen([sys.executable, "-m", "pinlab.orchestrator.pool", "--kernel",
                             kernel, "--dir", str(d)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def run_cell(cell: Cell, artifacts: Path) -> dict[str, Any]:
    return request(cell.kernel, {"op": "run", "cell": asdict(cell),
                                 "artifacts": str(artifacts)})


def stop_all(kernels: list[str], wait: float = 60.0) -> None:
    """Stop the kernels' pools and wait until each has torn its guest down and exited."""
    for k in kernels:
        try:
            pid = int(request(k, {"op": "ping"}, timeout=30, start=False)["pid"])
            request(k, {"op": "stop"}, timeout=60, start=False)
        except (PoolError, OSError, KeyError, ValueError):
            continue  # no pool for this kernel
        deadline = time.monotonic() + wait
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if process_alive(pid):  # its guest's processes die with it (PR_SET_PDEATHSIG)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


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
