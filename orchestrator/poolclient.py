"""Client side of the warm-guest pools (pool.py): send a request to a kernel's pool,
starting the pool if none is running, and stop pools.

Kept apart from the server so that an Avocado cell test, which is a process of its own
per cell, imports only this (no QEMU, SSH or QMP layers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pinlab.common import jsonlines
from pinlab.images.cache import cache_root

from .expectations import Cell
from .procs import process_alive

BOOT_DEADLINE = 300.0
REQUEST_TIMEOUT = 900.0
ANOTHER_POOL = 3   # a pool's exit status when another pool for its kernel was first


SLOT_ENV = "PINLAB_POOL_SLOT"   # which of a kernel's warm guests this process uses


def pools_root() -> Path:
    """``$PINLAB_POOL_DIR``, default ``$PINLAB_CACHE/pools``."""
    return Path(os.environ.get("PINLAB_POOL_DIR") or cache_root() / "pools")


def pool_dir(kernel: str, slot: int | None = None) -> Path:
    """The directory of a kernel's warm guest number ``slot`` (default: ``$PINLAB_POOL_SLOT``,
    else 1): ``<root>/<kernel>`` for slot 1, ``<root>/<kernel>+<slot>`` for the others."""
    if slot is None:
        slot = int(os.environ.get(SLOT_ENV) or 1)
    d = pools_root() / (kernel if slot == 1 else f"{kernel}+{slot}")
    d.mkdir(parents=True, exist_ok=True)
    return d


class PoolError(RuntimeError):
    pass


def request(kernel: str, req: dict[str, Any], timeout: float = REQUEST_TIMEOUT,
            start: bool = True, slot: int | None = None) -> dict[str, Any]:
    """Send one request to the kernel's pool (``slot`` as in ``pool_dir``), starting the
    pool if needed."""
    d = pool_dir(kernel, slot)
    path = d / "pool.sock"
    deadline = time.monotonic() + BOOT_DEADLINE
    started: subprocess.Popen[bytes] | None = None
    spawned_at = 0.0
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
            if started is not None and started.poll() == ANOTHER_POOL:
                started = None   # another pool (starting, or shutting down) holds the lock
            if started is None:
                if time.monotonic() - spawned_at > 2.0:
                    started, spawned_at = _spawn(kernel, d), time.monotonic()
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
        try:
            jsonlines.send(s, req)
            resp = jsonlines.recv_object(s)
        except (OSError, EOFError, ValueError) as exc:
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


def run_cell(cell: Cell, artifacts: Path, fresh: bool = False) -> dict[str, Any]:
    """Run one cell in its kernel's pool; ``fresh`` boots a new guest for it first.
    Returns the pool's answer (observed, evidence, seconds, boot, guest, release, taint,
    fresh). Raises PoolError when the pool cannot start or answer."""
    return request(cell.kernel, {"op": "run", "cell": asdict(cell),
                                 "artifacts": str(artifacts), "fresh": fresh})


def slots(kernel: str) -> list[int]:
    """The slots of the kernel's pools that have a directory (1 always)."""
    root = pools_root()
    found = {1}
    if root.is_dir():
        for d in root.glob(f"{kernel}+*"):
            tail = d.name[len(kernel) + 1:]
            if tail.isdigit():
                found.add(int(tail))
    return sorted(found)


def stop_all(kernels: list[str], wait: float = 60.0) -> None:
    """Stop the kernels' pools (every slot) and wait until each has torn its guest down
    and exited."""
    for kernel, slot in [(k, s) for k in kernels for s in slots(k)]:
        try:
            pid = int(request(kernel, {"op": "ping"}, timeout=30, start=False,
                              slot=slot)["pid"])
            request(kernel, {"op": "stop"}, timeout=60, start=False, slot=slot)
        except (PoolError, OSError, KeyError, ValueError):
            continue  # no pool in this slot
        deadline = time.monotonic() + wait
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if process_alive(pid):  # its guest's processes die with it (PR_SET_PDEATHSIG)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
