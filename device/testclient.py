"""In-process vfio-user client and a minimal driver, for tests and benchmarks.

:class:`VfioUserClient` speaks to the server like QEMU does (VERSION, DMA_MAP with a memfd,
GET_INFO, REGION_INFO, SET_IRQS with eventfds, REGION_READ/WRITE, posted writes).
:class:`GuestRam` is a memfd standing in for guest RAM, readable directly by the test.
:class:`Driver` programs the engine's rings and submits commands like the kernel driver.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from pinlab.common import jsonlines
from pinlab.common import uapi as U
from pinlab.common.uapi import CQE, CQE_SIZE, EQE, EQE_SIZE, SQE, SQE_SIZE

from . import protocol as P
from .control import ControlServer
from .device import Device
from .pci import MSI_CAP, MSIX_CAP
from .server import VfioUserServer
from .sockets import readable

QEMU_VERSION_JSON = (
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}\0')


class VfioUserError(Exception):
    def __init__(self, err: int, command: int) -> None:
        super().__init__(f"command {command}: {os.strerror(err)} ({err})")
        self.errno = err


class GuestRam:
    """A memfd of ``size`` bytes mapped into this process, like QEMU's memfd backend: with
    ``seal`` (QEMU's default, seal=on) sealed against shrinking and growing, without it a
    plain memfd the test may shrink under the device."""

    def __init__(self, size: int, seal: bool = True) -> None:
        self.size = size
        self.fd = os.memfd_create("pinlab-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        if seal:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED)

    def read(self, addr: int, n: int) -> bytes:
        return self.mm[addr:addr + n]

    def write(self, addr: int, data: bytes) -> None:
        self.mm[addr:addr + len(data)] = data

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.mm[addr:addr + 8], "little")

    def dup_fd(self) -> int:
        return os.dup(self.fd)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class VfioUserClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- framing --------------------------------------------------------------------
    def send(self, command: int, payload: bytes = b"", fds: list[int] | None = None,
             flags: int = 0, msg_id: int | None = None) -> int:
        if msg_id is None:
            msg_id = self._id
            self._id = (self._id + 1) & 0xFFFF
        P.send_message(self.sock, P.pack(msg_id, command, flags, payload), fds)
        return msg_id

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        P.send_message(self.sock, data, fds)

    def recv(self) -> P.Message:
        msg = P.recv_message(self.sock, max_size=1 << 30)
        if msg is None:
            raise ConnectionError("server closed the connection")
        return msg

    def request(self, command: int, payload: bytes = b"", fds: list[int] | None = None,
                reply_fds: list[int] | None = None) -> bytes:
        """Send a command, return the reply's payload. The reply's fds go to
        ``reply_fds`` when given, else they are closed."""
        msg_id = self.send(command, payload, fds)
        rep = self.recv()
        got = rep.take_fds()
        if reply_fds is not None:
            reply_fds.extend(got)
        else:
            for fd in got:
                os.close(fd)
        if rep.msg_id != msg_id or rep.command != command or rep.msg_type != P.TYPE_REPLY:
            raise AssertionError(f"unexpected reply {rep}")
        if rep.flags & P.FLAG_ERROR:
            if rep.payload:
                raise AssertionError("error reply with a payload")
            raise VfioUserError(rep.error_no, command)
        return rep.payload

    def readable(self, timeout: float = 0.0) -> bool:
        return bool(readable([self.sock.fileno()], timeout))

    # --- commands -------------------------------------------------------------------
    def version(self, body: bytes = QEMU_VERSION_JSON) -> dict[str, object]:
        payload = self.request(P.VERSION, struct.pack("<HH", 0, 0) + body)
        if P.HDR_SIZE + len(payload) > P.HDR_SIZE + 4 + len(body):
            raise AssertionError("VERSION reply larger than the request")
        if not payload.endswith(b"\0"):
            raise AssertionError("VERSION reply not NUL-terminated")
        return json.loads(payload[4:-1])

    def dma_map(self, iova: int, size: int, flags: int = 3, offset: int = 0,
                fd: int | None = None) -> None:
        """DMA_MAP; takes ownership of ``fd`` (closed once sent: pass a dup)."""
        try:
            self.request(P.DMA_MAP, P.DMA_MAP_S.pack(32, flags, offset, iova, size),
                         [fd] if fd is not None else None)
        finally:
            if fd is not None:
                os.close(fd)

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> bytes:
        return self.request(P.DMA_UNMAP, P.DMA_UNMAP_S.pack(24, flags, iova, size))

    def get_info(self) -> tuple[int, int, int, int]:
        return P.DEVICE_INFO_S.unpack(self.request(P.DEVICE_GET_INFO,
                                                   P.DEVICE_INFO_S.pack(16, 0, 0, 0)))

    def region_info(self, index: int, argsz: int = 32) -> tuple[int, int, int, int, int, int]:
        rep = self.request(P.DEVICE_GET_REGION_INFO, P.REGION_INFO_S.pack(argsz, 0, index, 0, 0,
                                                                          0))
        return P.REGION_INFO_S.unpack_from(rep)

    def region_info_caps(self, index: int, argsz: int = 64
                         ) -> tuple[tuple[int, ...], list[tuple[int, int]], list[int]]:
        """REGION_INFO as QEMU asks it: (info, sparse mmap areas (offset, size), fds). The
        caller owns the fds."""
        fds: list[int] = []
        rep = self.request(P.DEVICE_GET_REGION_INFO,
                           P.REGION_INFO_S.pack(argsz, 0, index, 0, 0, 0), reply_fds=fds)
        info = P.REGION_INFO_S.unpack_from(rep)
        areas: list[tuple[int, int]] = []
        cap = info[3]
        while cap:
            cid, _ver, nxt = P.CAP_HEADER_S.unpack_from(rep, cap)
            if cid == P.REGION_INFO_CAP_SPARSE_MMAP:
                n, _ = P.SPARSE_MMAP_S.unpack_from(rep, cap + P.CAP_HEADER_S.size)
                at = cap + P.CAP_HEADER_S.size + P.SPARSE_MMAP_S.size
                areas += [P.SPARSE_AREA_S.unpack_from(rep, at + 16 * i) for i in range(n)]
            cap = nxt
        return info, areas, fds

    def irq_info(self, index: int) -> tuple[int, int, int, int]:
        return P.IRQ_INFO_S.unpack(self.request(P.DEVICE_GET_IRQ_INFO,
                                                P.IRQ_INFO_S.pack(16, 0, index, 0)))

    def set_irqs(self, index: int, start: int, count: int, flags: int,
                 fds: list[int] | None = None, data: bytes = b"") -> None:
        self.request(P.DEVICE_SET_IRQS,
                     P.IRQ_SET_S.pack(20 + len(data), flags, index, start, count) + data, fds)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        rep = self.request(P.REGION_READ, P.REGION_RW_S.pack(offset, index, count))
        off, idx, n = P.REGION_RW_S.unpack_from(rep)
        if (off, idx, n) != (offset, index, count) or len(rep) != 16 + count:
            raise AssertionError("bad REGION_READ reply")
        return rep[16:]

    def region_write(self, index: int, offset: int, data: bytes, posted: bool = False) -> None:
        payload = P.REGION_RW_S.pack(offset, index, len(data)) + data
        if posted:
            self.send(P.REGION_WRITE, payload, flags=P.FLAG_NO_REPLY)
        else:
            self.request(P.REGION_WRITE, payload)

    def reset(self) -> None:
        self.request(P.DEVICE_RESET)

    def cfg_read(self, off: int, n: int) -> int:
        return int.from_bytes(self.region_read(P.PCI_CONFIG, off, n), "little")

    def cfg_write(self, off: int, n: int, value: int) -> None:
        self.region_write(P.PCI_CONFIG, off, value.to_bytes(n, "little"))

    def reg_read(self, off: int, n: int = 4) -> int:
        return int.from_bytes(self.region_read(P.PCI_BAR0, off, n), "little")

    def reg_write(self, off: int, value: int, n: int = 4, posted: bool = True) -> None:
        self.region_write(P.PCI_BAR0, off, value.to_bytes(n, "little"), posted)

    def bring_up(self, ram: GuestRam, iova: int = 0) -> None:
        """The sequence QEMU's vfio-user-pci performs at realize (hw/vfio-user/pci.c, then
        hw/vfio/pci.c), minus firmware. (With an MSI capability QEMU skips the MSI-X steps;
        they are harmless with 0 vectors.)"""
        self.version()
        self.dma_map(iova, ram.size, 3, 0, ram.dup_fd())
        info = self.get_info()
        if not info[1] & P.DEVICE_FLAGS_PCI:
            raise AssertionError("not a PCI device")
        for i in (0, 1, 2, 3, 4, 5, 7):
            self.region_info(i)
        self.irq_info(P.IRQ_ERR)
        self.region_read(P.PCI_CONFIG, 0, 256)
        self.cfg_read(0x30, 4)
        self.cfg_write(0x30, 4, 0xFFFFF800)
        if self.cfg_read(0x30, 4) != 0:
            raise AssertionError("ROM BAR must read 0")
        self.cfg_write(0x30, 4, 0)
        self.irq_info(P.IRQ_MSIX)
        self.set_irqs(P.IRQ_MSIX, 0, 0, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_TRIGGER)
        self.reset()
        self.cfg_write(0x04, 2, 0x0006)  # MEM | MASTER


@dataclass
class Completion:
    cid: int
    status: int
    flags: int
    result0: int
    result1: int
    sq_head: int


@dataclass
class Event:
    type: int
    region: int
    info0: int
    info1: int


class Driver:
    """What the kernel driver does: rings in guest RAM, MSI-X eventfds, submit, complete."""

    def __init__(self, client: VfioUserClient, ram: GuestRam, base: int = 0x10000,
                 entries: int = 64, eq: bool = True) -> None:
        self.c, self.ram = client, ram
        self.entries = entries
        self.sq = base
        self.cq = base + entries * SQE_SIZE
        self.eq = self.cq + entries * CQE_SIZE if eq else 0
        self.scratch = (self.cq + 2 * entries * CQE_SIZE + 0xFFF) & ~0xFFF  # free RAM from here
        self.sq_tail = self.cq_head = self.eq_head = 0
        self.cq_phase = self.eq_phase = 1
        self.cid = 0
        self.vectors = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]

    def close(self) -> None:
        for fd in self.vectors:
            os.close(fd)

    def setup_msix(self) -> None:
        self.c.cfg_write(MSIX_CAP + 2, 2, 0x8000 | 3)
        flags = P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER
        self.c.set_irqs(P.IRQ_MSIX, 0, 1, flags)  # "MSI-X on, no vectors"
        self.c.set_irqs(P.IRQ_MSIX, 0, 4, flags, [os.dup(fd) for fd in self.vectors])

    def setup_msi(self, nvec: int = 4) -> None:
        """What QEMU does when the guest enables MSI with ``nvec`` vectors (1, 2 or 4):
        the config write (forwarded to the device as well), then one SET_IRQS with an
        eventfd per enabled vector."""
        self.c.cfg_write(MSI_CAP + 4, 4, 0xFEE00000)
        self.c.cfg_write(MSI_CAP + 8, 4, 0)
        self.c.cfg_write(MSI_CAP + 12, 2, 0x4020)
        qsize = (nvec.bit_length() - 1) << 4
        self.c.cfg_write(MSI_CAP + 2, 2, 0x0080 | 0x0004 | qsize | 1)
        flags = P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER
        self.c.set_irqs(P.IRQ_MSI, 0, nvec, flags, [os.dup(fd) for fd in self.vectors[:nvec]])

    def setup_irqs(self, irq: str = "msix") -> None:
        if irq == "msi":
            self.setup_msi()
        else:
            self.setup_msix()

    def enable(self) -> None:
        self.ram.write(self.sq, bytes(self.entries * (SQE_SIZE + 2 * CQE_SIZE)))
        c = self.c
        c.reg_write(U.REG_SQ_BASE, self.sq, 8)
        c.reg_write(U.REG_SQ_ENTRIES, self.entries)
        c.reg_write(U.REG_CQ_BASE, self.cq, 8)
        c.reg_write(U.REG_CQ_ENTRIES, self.entries)
        c.reg_write(U.REG_EQ_BASE, self.eq, 8)
        c.reg_write(U.REG_EQ_ENTRIES, self.entries if self.eq else 0)
        c.reg_write(U.REG_CTRL, U.CTRL_ENABLE)
        if c.reg_read(U.REG_STATUS) != U.STATUS_ENABLED:
            raise AssertionError(f"enable failed: STATUS={c.reg_read(U.REG_STATUS):#x}")

    def submit(self, opcode: int, region: int = 0, *args: int, flags: int = 0) -> int:
        cid = self.cid
        self.cid = (self.cid + 1) & 0xFFFF
        a = [*args, *[0] * (7 - len(args))]
        self.ram.write(self.sq + self.sq_tail * SQE_SIZE,
                       SQE.pack(opcode, flags, cid, region, *a))
        self.sq_tail = (self.sq_tail + 1) % self.entries
        self.c.reg_write(U.REG_SQ_TAIL, self.sq_tail)
        return cid

    def poll(self, timeout: float = 10.0) -> Completion:
        deadline = time.monotonic() + timeout
        addr = self.cq + self.cq_head * CQE_SIZE
        while True:
            raw = self.ram.read(addr, CQE_SIZE)
            cid, status, flags, r0, r1, sq_head, _ = CQE.unpack(raw)
            if flags & U.PHASE == self.cq_phase:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("no completion")
            time.sleep(0.0005)
        self.cq_head = (self.cq_head + 1) % self.entries
        if self.cq_head == 0:
            self.cq_phase ^= 1
        self.c.reg_write(U.REG_CQ_HEAD, self.cq_head)
        return Completion(cid, status, flags, r0, r1, sq_head)

    def cmd(self, opcode: int, region: int = 0, *args: int, timeout: float = 30.0) -> Completion:
        cid = self.submit(opcode, region, *args)
        comp = self.poll(timeout)
        if comp.cid != cid:
            raise AssertionError(f"completion for cid {comp.cid}, expected {cid}")
        return comp

    def events(self) -> list[Event]:
        out = []
        while True:
            raw = self.ram.read(self.eq + self.eq_head * EQE_SIZE, EQE_SIZE)
            etype, _, flags, region, _, i0, i1 = EQE.unpack(raw)
            if flags & U.PHASE != self.eq_phase:
                break
            out.append(Event(etype, region, i0, i1))
            self.eq_head = (self.eq_head + 1) % self.entries
            if self.eq_head == 0:
                self.eq_phase ^= 1
        if out:
            self.c.reg_write(U.REG_EQ_HEAD, self.eq_head)
        return out

    def irq_count(self, vector: int) -> int:
        with contextlib.suppress(BlockingIOError):
            return os.eventfd_read(self.vectors[vector])
        return 0

    def write_page_list(self, addr: int, pages: list[int]) -> None:
        self.ram.write(addr, struct.pack(f"<{len(pages)}Q", *pages))


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


class LocalServer:
    """A device with its vfio-user and control servers running in this process."""

    def __init__(self, audit: bool = False, irq: str = "msix", mirror: bool = False) -> None:
        self.tmp = tempfile.mkdtemp(prefix="pinlab-dev-")
        self.path = os.path.join(self.tmp, "vfio.sock")
        self.control_path = os.path.join(self.tmp, "control.sock")
        self.audit_path = os.path.join(self.tmp, "audit.jsonl") if audit else None
        self.device = Device(self.audit_path, irq=irq, mirror=mirror)
        self.server = VfioUserServer(self.device, self.path)
        self.control = ControlServer(self.device, self.control_path)
        self.server.start()
        self.control.start()

    def client(self, timeout: float = 10.0) -> VfioUserClient:
        return VfioUserClient(self.path, timeout)

    def close(self) -> None:
        self.server.stop()
        self.control.stop()
        self.device.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Rig:
    """A running server, guest RAM, a connected client after bring-up and a driver."""

    def __init__(self, ram_size: int = 64 << 20, audit: bool = False, enable: bool = True,
                 entries: int = 64, irq: str = "msix", seal: bool = True,
                 mirror: bool = False) -> None:
        self.server = LocalServer(audit, irq, mirror)
        self.device = self.server.device
        self.ram = GuestRam(ram_size, seal)
        self.client = self.server.client()
        self.client.bring_up(self.ram)
        self.driver = Driver(self.client, self.ram, entries=entries)
        self.driver.setup_irqs(irq)
        if enable:
            self.driver.enable()
        self._next_page = 0x800000  # data pages are handed out from 8 MiB up

    def pages(self, n: int) -> list[int]:
        out = [self._next_page + i * 4096 for i in range(n)]
        self._next_page += n * 4096
        if self._next_page > self.ram.size:
            raise ValueError("guest RAM exhausted")
        return out

    def map_pages(self, region: int, first: int, pages: list[int]) -> Completion:
        comp = None
        for i in range(0, len(pages), 512):
            part = pages[i:i + 512]
            self.driver.write_page_list(self.driver.scratch, part)
            comp = self.driver.cmd(2, region, first + i, len(part), self.driver.scratch)
            if comp.status:
                return comp
        assert comp is not None
        return comp

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.client.close()
        self.driver.close()
        self.server.close()
        self.ram.close()


class QmpLine:
    """A blocking QMP client on a raw socket, every wait bounded by ``timeout`` seconds
    (a device that does not answer in time raises TimeoutError): for tests that must tell
    a hang from an answer."""

    def __init__(self, path: str, timeout: float = 1.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._lines = jsonlines.Reader(self.sock.recv)
        greeting = self.read()
        if "QMP" not in greeting:
            raise AssertionError(f"no QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self) -> dict[str, object]:
        """The next object the device sent. Raises ConnectionError when it hung up,
        TimeoutError, and jsonlines.FramingError for a line that is not an object."""
        try:
            return self._lines.read_object()
        except EOFError as exc:
            raise ConnectionError("control socket closed") from exc

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, object]:
        """The next reply (a "return" or an "error"), skipping events."""
        while True:
            obj = self.read()
            if "return" in obj or "error" in obj:
                return obj

    def execute(self, cmd: str, args: dict[str, object] | None = None) -> object:
        """Run ``cmd``; returns its "return" value, raises AssertionError on an error."""
        msg: dict[str, object] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.send_raw(jsonlines.encode(msg))
        rep = self.reply()
        if "error" in rep:
            raise AssertionError(f"{cmd}: {rep['error']}")
        return rep["return"]


class DeviceProcess:
    """``python -m pinlab.device`` in a child process with its sockets in a private
    directory: a test client cannot take the test runner down with it (a SIGBUS, a hang),
    and :meth:`alive` tells whether it still answers. ``extra``: more command-line args."""

    def __init__(self, extra: list[str] | None = None, audit: bool = True,
                 umask: int | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="pinlab-devp-")
        self.path = os.path.join(self.tmp, "vfio.sock")
        self.control_path = os.path.join(self.tmp, "control.sock")
        self.audit_path = os.path.join(self.tmp, "audit.jsonl") if audit else None
        self.log_path = os.path.join(self.tmp, "device.log")
        argv = [sys.executable, "-m", "pinlab.device", "--socket", self.path,
                "--control", self.control_path, "--log-level", "INFO", *(extra or [])]
        if self.audit_path:
            argv += ["--audit", self.audit_path]
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            preexec_fn=None if umask is None else (lambda: os.umask(umask)))  # noqa: PLW1509
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"device did not start: {self.log()[-2000:]}")
            time.sleep(0.02)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def client(self, timeout: float = 10.0) -> VfioUserClient:
        return VfioUserClient(self.path, timeout)

    def qmp(self, timeout: float = 1.0) -> QmpLine:
        return QmpLine(self.control_path, timeout)

    def status(self) -> dict[str, object]:
        with self.qmp(5.0) as q:
            out = q.execute("query-status")
        assert isinstance(out, dict)
        return out

    def alive(self, within: float = 1.0) -> None:
        """Raise unless the device answers a new client's VERSION and a QMP query-status,
        each within ``within`` seconds (the previous vfio-user client must be gone)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"device exited {self.proc.returncode}")
        with self.client(within) as c:
            c.version()
        with self.qmp(within) as q:
            q.execute("query-status")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
