"""``pinlab up``: a guest for debugging by hand, set up like a matrix guest, and the
request socket that ``pinlab replug`` and ``pinlab down`` talk to.

The guest is a matrix guest (guestenv.py: the same scratch disks, kernel command line,
device IRQ mode, guest-side setup by pinlab_env.py), optionally the guest of one cell
(``--cell``: its kernel, its environment, its device faults). While it runs, the ``up``
process keeps the orchestrator's QMP connection and the guest agent, registers the guest
under its name (registry.py) and serves one JSON request per connection on
``<rundir>/up.sock``:

    {"op": "ping"}                                 -> {"ok": true, "name", "pid"}
    {"op": "replug", "rounds": N, "ready_file": P, "ready_timeout": S, "force": false}
        -> {"rounds": [{"round", "unplug_s", "plug_s", "dmesg": [...]}, ...]}
           or {"error": ...}
    {"op": "down"}                                 -> {"ok": true}; the guest is torn down
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pinlab.common import jsonlines
from pinlab.common.vocab import GUEST_HOME, READY_FILE, guest_python
from pinlab.images.cache import cache_root
from pinlab.images.kernel import DEFAULT_KERNEL, KERNELS

from . import events, registry
from .expectations import Cell
from .guestenv import MEMORY_MB, guest_config, setup_guest
from .procs import process_alive, wait_for
from .registry import GuestEntry, RegistryError
from .scenario import DIMM_ID, HOTPLUG_MB, hot_add_dimm
from .session import GuestSession
from .vm import DEVICE_ID, GuestConfig

REQUEST_TIMEOUT = 1800.0
# events whose cell needs a device fault from the start (scenario.py sets it per cell)
class WorkbenchError(RuntimeError):
    """A request the guest cannot serve (no device, MSI-X replug, bad input)."""


@dataclass
class UpOptions:
    kernel: str | None = None
    name: str | None = None
    device: bool = True
    module: bool = True
    irq: str = "msi"
    faults: dict[str, Any] = field(default_factory=dict)
    append: str = ""
    gdb_port: int = 0
    cell: Cell | None = None
    swap: bool = False
    hugepages: int = 0
    memory_mb: int = 0
    extra_packages: list[str] | None = None


def find_vmlinux(release: str) -> Path | None:
    """The debug vmlinux of ``release`` (from linux-image-<release>-dbg), looked for where
    the README says to unpack it: $PINLAB_CACHE/debug/usr/lib/debug/boot/, then the
    host's /usr/lib/debug/boot/."""
    for d in (cache_root() / "debug" / "usr/lib/debug/boot", Path("/usr/lib/debug/boot")):
        p = d / f"vmlinux-{release}"
        if p.is_file():
            return p
    return None


def known_hosts_line(port: int, host_key_pub: Path) -> str:
    kind, b64 = host_key_pub.read_text().split()[:2]
    base64.b64decode(b64)   # a corrupt key fails here, not in ssh
    return f"[127.0.0.1]:{port} {kind} {b64}\n"


# --------------------------------------------------------------------------- replug
def _wait_deleted(s: GuestSession, timeout: float) -> None:
    g = s.guest
    assert g.qmp
    seen: list[dict[str, Any]] = []

    def deleted() -> bool:
        seen.extend(g.qmp.events() if g.qmp else [])
        return any(e.get("event") == "DEVICE_DELETED"
                   and (e.get("data") or {}).get("device") == DEVICE_ID for e in seen)
    wait_for(deleted, timeout, step=0.1, what=f"DEVICE_DELETED for {DEVICE_ID}",
             abort=g.dead)


def replug(s: GuestSession, rounds: int = 1, ready_file: str = "",
           ready_timeout: float = 120, force: bool = False,
           progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """``rounds`` times: (wait until the guest file ``ready_file`` exists, remove it),
    QMP device_del of the device, wait for DEVICE_DELETED, device_add with the same
    arguments (Guest.device_spec), wait for a /dev/pinlabN in the guest. Each round's
    record: round, node (the new /dev/pinlabN), unplug_s and plug_s (seconds), dmesg
    (the kernel log lines of the round). Raises WorkbenchError without a device or with
    MSI-X (QEMU 11.1's vfio-user-pci aborts on device_del of an MSI-X device; ``force``
    tries anyway),
    TimeoutError/RuntimeError when a wait fails (RuntimeError names QEMU's exit)."""
    g = s.guest
    if not g.cfg.device or g.qmp is None:
        raise WorkbenchError("this guest has no device (booted with --no-device)")
    irq = _irq(g.cfg.device_args)
    if irq == "msix" and not force:
        raise WorkbenchError("the device uses MSI-X: QEMU 11.1's vfio-user-pci aborts on "
                             "device_del of an MSI-X device (README, The matrix); boot with "
                             "`pinlab up --irq msi` (the default), or pass --force to see it")
    if rounds < 1:
        raise WorkbenchError("rounds must be at least 1")
    out = []
    for i in range(1, rounds + 1):
        rec: dict[str, Any] = {"round": i}
        if ready_file:
            q = shlex.quote(ready_file)
            t_wait = time.monotonic()
            wait_for(lambda q=q: g.ssh.run(f"test -e {q}", timeout=30).rc == 0,
                     ready_timeout, step=0.2, what=f"the guest file {ready_file}",
                     abort=g.dead)
            g.ssh.run(f"rm -f {q}", timeout=30, check=True)
            rec["ready_wait_s"] = round(time.monotonic() - t_wait, 2)
        mark = s.dmesg_mark()
        g.qmp.events()                       # drop older events
        t0 = time.monotonic()
        g.qmp.cmd("device_del", id=DEVICE_ID)
        _wait_deleted(s, 60)
        t1 = time.monotonic()
        rec["node"] = g.replug_device(node="/dev/pinlab*")
        rec["unplug_s"] = round(t1 - t0, 2)
        rec["plug_s"] = round(time.monotonic() - t1, 2)
        rec["dmesg"] = s.dmesg_since(mark).splitlines()
        out.append(rec)
        if progress:
            progress(rec)
    return out


def _irq(device_args: list[str]) -> str:
    if "--irq" in device_args:
        return device_args[device_args.index("--irq") + 1]
    return "msix"   # pinlab device serve's default


# --------------------------------------------------------------------------- up
class Workbench:
    """One ``pinlab up``: boot, set up, register, serve requests, tear down."""

    def __init__(self, opts: UpOptions, artifacts: Path,
                 say: Callable[[str], None] = print) -> None:
        self.o = opts
        self.artifacts = artifacts
        self.say = say
        self.stop = False
        kernel = opts.cell.kernel if opts.cell else opts.kernel or DEFAULT_KERNEL
        if kernel not in KERNELS:
            raise WorkbenchError(f"unknown kernel {kernel!r}; choose one of "
                                 f"{', '.join(KERNELS)}")
        if opts.cell and opts.kernel and opts.kernel != opts.cell.kernel:
            raise WorkbenchError(f"--cell {opts.cell.name} runs on kernel "
                                 f"{opts.cell.kernel}, not {opts.kernel}")
        self.kernel = kernel
        self.name = registry.check_name(opts.name) if opts.name else \
            registry.free_name(f"lab-{kernel}")
        try:
            old: GuestEntry | None = registry.load(self.name)
        except RegistryError:
            old = None
        if old is not None and old.alive():
            raise RegistryError(f"a guest named {self.name!r} is already up "
                                f"(pid {old.pid}); pick another --name")
        if opts.cell and not opts.device:
            raise WorkbenchError("--cell needs the device")

    def config(self) -> GuestConfig:
        """The matrix guest (guestenv.guest_config) with this up's IRQ mode, extra kernel
        arguments, gdbstub and memory."""
        cfg = guest_config(self.o.irq)
        if self.o.append:
            cfg.cmdline = f"{cfg.cmdline} {self.o.append}".strip()
        cfg.gdb_port = self.o.gdb_port
        if self.o.memory_mb:
            cfg.memory_mb = self.o.memory_mb
            if cfg.memory_mb < MEMORY_MB:
                # the fsdax pmem ranges (guestenv.PMEM) would lie outside the guest's RAM
                cfg.cmdline = " ".join(a for a in cfg.cmdline.split()
                                       if not a.startswith("memmap="))
        return cfg

    def faults(self) -> dict[str, Any]:
        ev = events.event(self.o.cell.event) if self.o.cell else None
        f = dict(ev.faults) if ev else {}
        f.update(self.o.faults)
        return f

    def run(self) -> int:
        o = self.o
        cell = o.cell.short if o.cell else None
        with GuestSession.boot(self.kernel, self.artifacts, device=o.device,
                               module=o.module and o.device, config=self.config(),
                               faults=self.faults() if o.device else None,
                               extra_packages=o.extra_packages) as s:
            env = setup_guest(s, swap=o.swap, hugepages=o.hugepages, cell=cell)
            if o.cell and o.cell.event == "mem-offline":
                # as scenario.mem_offline: a movable DIMM for the cell's pages (kept)
                env["dimm"] = {"id": DIMM_ID, "mib": HOTPLUG_MB,
                               "auto_online_was": hot_add_dimm(s)}
            (self.artifacts / "guest-env.json").write_text(json.dumps(env, indent=2) + "\n")
            g = s.guest
            kh = g.rundir / "known_hosts"
            kh.write_text(known_hosts_line(g.ssh_port, g.images.rootfs.host_key_pub))
            control = g.rundir / "up.sock"
            vmlinux = find_vmlinux(g.images.kernel.release) if o.gdb_port else None
            entry = GuestEntry(
                name=self.name, pid=os.getpid(), kernel=self.kernel,
                release=g.images.kernel.release, ssh_port=g.ssh_port,
                client_key=str(g.images.rootfs.client_key), known_hosts=str(kh),
                host_key_pub=str(g.images.rootfs.host_key_pub), control=str(control),
                qmp_human=str(g.human_qmp_sock),
                device_control=str(g.control_sock) if o.device else "",
                device_socket=str(g.device_sock) if o.device else "",
                console=str(g.console.path), artifacts=str(self.artifacts),
                irq=_irq(g.cfg.device_args) if o.device else "",
                gdb=f"127.0.0.1:{o.gdb_port}" if o.gdb_port else "",
                vmlinux=str(vmlinux or ""), cell=cell or "", started=time.time(),
                extra={"env": env.get("state"), "faults": self.faults() if o.device else {},
                       "append": o.append})
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(str(control))
            srv.listen(4)
            try:
                registry.register(entry)
                self.say(self.banner(s, entry, env))
                return self.serve(s, srv)
            finally:
                srv.close()
                control.unlink(missing_ok=True)
                registry.unregister(self.name, os.getpid())

    def banner(self, s: GuestSession, e: GuestEntry, env: dict[str, Any]) -> str:
        g = s.guest
        n = e.name
        mounts = ", ".join(f"{m} ({v['fstype']})"
                           for m, v in (env.get("state") or {}).get("mounts", {}).items())
        lines = [
            f"pinlab guest {n!r} is up ({e.release}, {g.cfg.accel}, booted in "
            f"{g.boot_seconds:.1f}s)",
            f"  ssh:            pinlab ssh {n}    ({g.ssh_command()})",
            f"  run a script:   pinlab run {n} SCRIPT [ARGS]   "
            f"(guest API: pinlab.guest, in {GUEST_HOME})",
            f"  QMP (humans):   pinlab qmp {n}    (qmp-shell {g.human_qmp_sock})",
            f"  device:         {'irq ' + e.irq + ', ' + e.device_socket if e.irq else '-'}",
            f"  device control: {'qmp-shell ' + e.device_control if e.irq else '-'}",
            f"  replug:         {'pinlab replug ' + n if e.irq else '-'}",
            f"  mounts:         {mounts or '-'}",
            f"  console log:    {g.console.path}",
            f"  artifacts:      {self.artifacts}",
        ]
        if e.gdb:
            lines.append(f"  gdb:            target remote {e.gdb}   (kernel booted nokaslr; "
                         f"vmlinux: {e.vmlinux or 'not found, see README'})")
        if e.cell:
            m, b, variant = e.cell.split("/")
            ev = variant.partition("+")[0]
            lines.append(f"  cell {self.kernel}/{e.cell} is set up; its mapping, registered "
                         f"and written once, before the event:\n"
                         f"    pinlab ssh {n} "
                         + guest_python("pinlab_cell", "ready", m, b, variant,
                                        interactive=True))
            if ev in ("hot-unplug",):
                lines.append(f"    its event waits for the device to go: in another terminal "
                             f"`pinlab replug {n} --ready-file {READY_FILE}`")
            if ev == "mem-offline":
                lines.append(f"    a {HOTPLUG_MB} MiB DIMM ({DIMM_ID}) is hot-added and online "
                             "movable, as in the cell")
        lines.append(f"`pinlab down {n}` or Ctrl-C tears everything down.")
        return "\n".join(lines)

    def serve(self, s: GuestSession, srv: socket.socket) -> int:
        def on_signal(signum: int, frame: object) -> None:
            self.stop = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        ended: list[str] = []

        def running() -> bool:
            dead = s.guest.dead()
            if dead:
                ended.append(dead)
            return not self.stop and not dead

        jsonlines.serve(srv, lambda req: self.handle(s, req), running=running,
                        on_bad=lambda exc: self.say(f"pinlab: bad request: {exc!r}"),
                        poll=0.5)
        if ended:
            self.say(f"pinlab: guest {self.name} ended: {ended[0]}")
            return 1
        return 0

    def handle(self, s: GuestSession, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "name": self.name, "pid": os.getpid()}
        if op == "down":
            self.stop = True
            return {"ok": True}
        if op == "replug":
            try:
                rounds = replug(s, int(req.get("rounds", 1)), str(req.get("ready_file") or ""),
                                float(req.get("ready_timeout", 120)), bool(req.get("force")),
                                progress=lambda r: self.say(
                                    f"pinlab: replug round {r['round']}: unplug "
                                    f"{r['unplug_s']}s, plug {r['plug_s']}s"))
                return {"rounds": rounds}
            except (WorkbenchError, TimeoutError, RuntimeError, OSError) as exc:
                out: dict[str, Any] = {"error": str(exc)}
                dead = s.guest.dead()
                if dead:
                    out["dead"] = dead
                return out
        return {"error": f"unknown op {op!r}"}


# --------------------------------------------------------------------------- clients
def request(entry: GuestEntry, req: dict[str, Any],
            timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """Send one request to a guest's ``up`` process. Raises WorkbenchError when it does
    not answer."""
    try:
        return jsonlines.request(entry.control, req, timeout)
    except (OSError, EOFError, ValueError) as exc:
        raise WorkbenchError(f"guest {entry.name!r} (pid {entry.pid}) did not answer "
                             f"{req.get('op')}: {exc!r}") from exc


def down(entry: GuestEntry, timeout: float = 120) -> None:
    """Ask the ``up`` process to tear its guest down and wait until it exited; SIGTERM
    it when it does not answer. Raises WorkbenchError when it outlives ``timeout``."""
    try:
        request(entry, {"op": "down"}, timeout=30)
    except WorkbenchError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry.pid, signal.SIGTERM)
    try:
        wait_for(lambda: not process_alive(entry.pid), timeout, step=0.2,
                 what=f"guest {entry.name} to go down")
    except TimeoutError as exc:
        raise WorkbenchError(str(exc)) from exc
    registry.unregister(entry.name, entry.pid)
