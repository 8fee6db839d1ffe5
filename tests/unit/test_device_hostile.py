"""A hostile vfio-user / QMP client cannot wedge, kill or misuse the device (issue 14).

Every test drives a real device process (``python -m pinlab.device``) with one input
that used to wedge it, kill it or make it misbehave, asserts the outcome (errno, closed
connection, counter), and then that the device still answers a new client's VERSION and
a QMP query-status, each within 1 s (:meth:`DeviceProcess.alive`).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import unittest

from pinlab.device import protocol as P
from pinlab.device.engine import OP_CREATE_REGION, OP_MAP_PAGES, OP_NOP, OP_STREAM_START, SQE
from pinlab.device.limits import (
    MAX_CONTROL_CLIENTS,
    MAX_DMA_MAPS,
    MAX_FD_DMA_MAPS,
    MAX_JSON_DEPTH,
    MESSAGE_TIMEOUT,
)
from pinlab.device.pci import MSIX_CAP
from pinlab.device.testclient import (
    DeviceProcess,
    Driver,
    GuestRam,
    LocalServer,
    QmpLine,
    VfioUserClient,
    VfioUserError,
)

EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE
TRIGGER_NONE = P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_TRIGGER
TRIGGER_EVENTFD = P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER


def full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full; both ends blocking, as a careless client has them."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"\0" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w


class HostileTestBase(unittest.TestCase):
    extra: list[str] = []

    def setUp(self) -> None:
        self.dev = DeviceProcess(self.extra)
        self.addCleanup(self.dev.close)  # also when setUp fails below: no process left
        self.ram = GuestRam(4 << 20)
        self.addCleanup(self.ram.close)
        self.c = self.dev.client(5.0)
        self.addCleanup(lambda: self.c.close())

    def assertErrno(self, err: int, fn, *args, **kw) -> None:  # noqa: N802
        with self.assertRaises(VfioUserError) as cm:
            fn(*args, **kw)
        self.assertEqual(cm.exception.errno, err, os.strerror(cm.exception.errno))

    def assert_alive(self) -> None:
        """Close our client; a new one gets VERSION, QMP answers, each within 1 s."""
        self.c.close()
        self.dev.alive(1.0)
        self.assertNotIn("Traceback", self.dev.log())


class IrqFdTest(HostileTestBase):
    """Input 1: a full eventfd or pipe as an interrupt fd."""

    def test_full_eventfd_is_coalesced_not_a_hang(self) -> None:
        self.c.bring_up(self.ram)
        efd = os.eventfd(0)  # blocking
        os.eventfd_write(efd, EVENTFD_MAX)  # counter at its maximum
        try:
            self.c.set_irqs(P.IRQ_MSIX, 0, 1, TRIGGER_EVENTFD, [efd])
            self.c.set_irqs(P.IRQ_MSIX, 0, 1, TRIGGER_NONE)  # loopback: must be answered
            self.c.set_irqs(P.IRQ_MSIX, 0, 1, TRIGGER_NONE)
            msix = self.dev.status()["msix"]
            self.assertEqual(msix["coalesced"], 2)
            self.assertEqual(os.eventfd_read(efd), EVENTFD_MAX)  # nothing lost or wrapped
        finally:
            os.close(efd)
        self.assert_alive()

    def test_full_pipe_is_coalesced_on_completion(self) -> None:
        self.c.bring_up(self.ram)
        r, w = full_pipe()
        drv = Driver(self.c, self.ram)
        try:
            self.c.cfg_write(MSIX_CAP + 2, 2, 0x8000 | 3)
            self.c.set_irqs(P.IRQ_MSIX, 0, 1, TRIGGER_EVENTFD, [w])
            drv.enable()
            for _ in range(3):  # each completion raises vector 0 into the full pipe
                self.assertEqual(drv.cmd(OP_NOP, timeout=5).status, 0)
            self.assertEqual(self.c.reg_read(0x060), 3)  # the device still answers
            deadline = time.monotonic() + 5
            while self.dev.status()["msix"]["coalesced"] < 3:
                self.assertLess(time.monotonic(), deadline, "coalesced interrupts not counted")
                time.sleep(0.05)
        finally:
            drv.close()
            os.close(r)
            os.close(w)
        self.assert_alive()

    def test_irq_fd_of_another_type_is_refused(self) -> None:
        self.c.bring_up(self.ram)
        with tempfile.TemporaryFile() as f:
            self.assertErrno(errno.EINVAL, self.c.set_irqs, P.IRQ_MSIX, 0, 1, TRIGGER_EVENTFD,
                             [f.fileno()])
        self.assert_alive()


class ShrunkRamTest(HostileTestBase):
    """Input 2: the guest RAM memfd shrinks to 0 under a 2-entry ring."""

    def test_shrunk_guest_ram_fails_the_connection(self) -> None:
        ram = GuestRam(1 << 20, seal=False)
        drv = Driver(self.c, ram, base=0x10000, entries=2, eq=False)
        try:
            self.c.bring_up(ram)
            drv.setup_msix()
            drv.enable()
            ram.write(drv.sq, SQE.pack(OP_NOP, 0, 7, 0, *[0] * 7))
            os.ftruncate(ram.fd, 0)  # from here on ram.mm must not be touched
            self.c.reg_write(0x01C, 1)  # SQ doorbell: the device fetches from a 0-byte file
            with self.assertRaises((ConnectionError, OSError)):
                self.c.recv()  # the server closes the connection
            st = self.dev.status()
            self.assertGreaterEqual(st["mappings_lost"], 1)
            self.assertTrue(st["engine"]["fatal"])
            self.assertIn("shrank", st["engine"]["fatal_reason"])
            self.assert_alive()
        finally:
            drv.close()
            ram.close()


class PermissionTest(HostileTestBase):
    """Input 3: DMA_MAP without the read flag (flags=0, write-only)."""

    def map_split(self, flags: int) -> None:
        """[0, 1M) read-write; [1M, 2M) with ``flags`` (iova = file offset)."""
        self.c.version()
        self.c.dma_map(0, 1 << 20, 3, 0, self.ram.dup_fd())
        self.c.dma_map(1 << 20, 1 << 20, flags, 1 << 20, self.ram.dup_fd())

    def test_ring_in_unreadable_map_is_not_fetched(self) -> None:
        for flags in (0, P.DMA_FLAG_WRITE):
            with self.subTest(flags=flags):
                if flags:
                    self.c.dma_unmap(0, 0, P.DMA_UNMAP_FLAG_ALL)
                self.map_split(flags)
                self.c.reset()
                sq, cq = 1 << 20, 0x10000  # the SQ in the restricted map, the CQ not
                self.ram.write(cq, bytes(2 * 32))
                self.ram.write(sq, SQE.pack(OP_NOP, 0, 1, 0, *[0] * 7) + bytes(64))
                for off, val in ((0x010, sq), (0x018, 2), (0x028, cq), (0x030, 2),
                                 (0x040, 0), (0x048, 0)):
                    self.c.reg_write(off, val, 8 if off in (0x010, 0x028) else 4)
                self.c.reg_write(0x00C, 1)
                self.c.reg_write(0x01C, 1)
                self.assertEqual(self.c.reg_read(0x008), 2)  # FATAL, never enabled
                time.sleep(0.2)
                self.assertEqual(self.c.reg_read(0x060), 0)  # nothing executed
                self.assertEqual(self.ram.read(cq, 32), bytes(32))  # nothing completed
                reason = self.dev.status()["engine"]["fatal_reason"]
                self.assertIn("not readable", reason)
        self.assert_alive()

    def test_page_list_in_write_only_map_is_not_read(self) -> None:
        self.map_split(P.DMA_FLAG_WRITE)
        drv = Driver(self.c, self.ram, base=0x10000)
        try:
            drv.setup_msix()
            drv.enable()
            self.assertEqual(drv.cmd(OP_CREATE_REGION, 1, 4, 1).status, 0)
            drv.write_page_list(1 << 20, [0x80000])
            comp = drv.cmd(OP_MAP_PAGES, 1, 0, 1, 1 << 20)
            self.assertEqual((comp.status, comp.result0), (5, 1 << 20))  # DMA_ERROR at list
        finally:
            drv.close()
        self.assert_alive()


class DmaMapLimitTest(HostileTestBase):
    """Input 4: more DMA maps than the max_dma_maps the VERSION reply advertises."""

    def test_max_dma_maps_is_enforced(self) -> None:
        caps = self.c.version()["capabilities"]
        self.assertEqual(caps["max_dma_maps"], MAX_DMA_MAPS)  # type: ignore[index]
        batch = 128  # replies a client leaves unread are bounded by the socket buffer
        for first in range(0, MAX_DMA_MAPS, batch):  # pipelined, fd-less 4 KiB maps
            n = min(batch, MAX_DMA_MAPS - first)
            for i in range(first, first + n):
                self.c.send(P.DMA_MAP, P.DMA_MAP_S.pack(32, 3, 0, i << 12, 4096))
            for _ in range(n):
                rep = self.c.recv()
                self.assertFalse(rep.flags & P.FLAG_ERROR, rep)
        self.assertErrno(errno.ENOSPC, self.c.dma_map, MAX_DMA_MAPS << 12, 4096, 3)
        with self.dev.qmp(1.0) as q:
            st = q.execute("query-status")
        self.assertEqual(st["dma_map_count"], MAX_DMA_MAPS)  # type: ignore[index]
        self.assertLessEqual(len(st["dma_maps"]), 64)  # type: ignore[index]
        self.c.dma_unmap(0, 0, P.DMA_UNMAP_FLAG_ALL)
        self.c.dma_map(0, 4096, 3)  # room again
        self.assert_alive()

    def test_maps_with_an_fd_are_bounded(self) -> None:
        self.c.version()
        for i in range(MAX_FD_DMA_MAPS):  # each is an mmap: VMAs are a process resource
            self.c.dma_map(i << 16, 4096, 3, 0, self.ram.dup_fd())
        self.assertErrno(errno.ENOSPC, self.c.dma_map, MAX_FD_DMA_MAPS << 16, 4096, 3, 0,
                         self.ram.dup_fd())
        self.c.dma_map(1 << 40, 4096, 3)  # fd-less maps still fit
        self.c.dma_unmap(0, 1 << 16)
        self.c.dma_map(0, 4096, 3, 0, self.ram.dup_fd())  # room again after an unmap
        self.assert_alive()


class NestingTest(HostileTestBase):
    """Input 5: deeply nested JSON in VERSION and in a QMP command."""

    def test_deep_version_json_is_einval(self) -> None:
        for depth in (MAX_JSON_DEPTH + 1, 1000, 100000):
            body = b'{"x":' + b"[" * depth + b"]" * depth + b"}\0"
            with self.subTest(depth=depth):
                self.assertErrno(errno.EINVAL, self.c.request, P.VERSION,
                                 struct.pack("<HH", 0, 0) + body)
        self.c.version()  # the same connection negotiates afterwards
        self.assert_alive()

    def test_deep_qmp_command_gets_an_error_reply(self) -> None:
        with self.dev.qmp(1.0) as q:
            for depth in (MAX_JSON_DEPTH + 1, 5000, 200000):
                with self.subTest(depth=depth):
                    deep = b"[" * depth + b"]" * depth
                    q.send_raw(b'{"execute":"query-status","arguments":{"x":' + deep + b"}}\n")
                    rep = q.reply()
                    self.assertIn("error", rep)
                    self.assertIn("nested", rep["error"]["desc"])  # type: ignore[index]
            q.execute("query-status")  # the reader thread still serves this client
        self.assert_alive()


class UnreadRepliesTest(HostileTestBase):
    """Bound: a client that never reads its replies is disconnected (MESSAGE_TIMEOUT)."""

    def test_client_that_reads_nothing_is_disconnected(self) -> None:
        self.c.version()
        req = P.pack(1, P.REGION_READ, 0, P.REGION_RW_S.pack(0, P.PCI_CONFIG, 4096))
        self.c.sock.setblocking(False)
        sent = 0
        try:
            while True:  # until both socket buffers are full of replies and requests
                self.c.sock.send(req)
                sent += 1
        except BlockingIOError:
            pass
        self.assertGreater(sent, 10)
        deadline = time.monotonic() + MESSAGE_TIMEOUT + 30
        while self.dev.status()["connected"]:
            self.assertLess(time.monotonic(), deadline, "stalled client never disconnected")
            time.sleep(0.5)
        self.assertIn("closing connection", self.dev.log())
        self.assert_alive()


class ControlClientsTest(HostileTestBase):
    """Bound: control clients at once (each costs two threads)."""

    def test_control_clients_are_bounded(self) -> None:
        clients = [self.dev.qmp(5.0) for _ in range(MAX_CONTROL_CLIENTS)]
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5.0)
            s.connect(self.dev.control_path)
            with s:
                data = s.recv(4096)
                self.assertIn(b"too many control clients", data)
                self.assertEqual(s.recv(4096), b"")  # and hung up
            clients.pop().close()
            self.wait_for_room()  # the server notices the hang-up, then has room again
        finally:
            for q in clients:
                q.close()
        self.wait_for_room()
        self.assert_alive()

    def wait_for_room(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.dev.qmp(1.0) as q:
                    q.execute("query-status")
                return
            except (AssertionError, OSError):
                self.assertLess(time.monotonic(), deadline, "no room for a control client")
                time.sleep(0.05)


class HighFdTest(unittest.TestCase):
    """The device holds up to 1024 map fds: its own fds then pass 1023 (select's limit)."""

    def test_fds_past_1023_are_served(self) -> None:
        null = os.open("/dev/null", os.O_RDONLY)
        filler = [os.dup(null) for _ in range(1100)]
        srv = LocalServer()  # its sockets and pipes get fd numbers past 1023
        try:
            self.assertGreater(srv.server.sock.fileno(), 1023)
            with srv.client(5.0) as c:
                c.version()
                self.assertEqual(c.get_info()[2], 9)
            with QmpLine(srv.control_path, 5.0) as q:
                q.execute("query-status")
        finally:
            srv.close()
            for fd in [*filler, null]:
                os.close(fd)


class SpecTest(HostileTestBase):
    """Input 6: vfio-user error codes where the specification is strict."""

    def test_overlapping_dma_map_is_eexist(self) -> None:
        self.c.version()
        self.c.dma_map(0x100000, 0x100000, 3, 0, self.ram.dup_fd())
        for iova, size in ((0x100000, 0x100000), (0x80000, 0x100000), (0x1FF000, 0x2000),
                           (0x140000, 0x1000), (0, 0x1000000)):
            with self.subTest(iova=iova, size=size):
                self.assertErrno(errno.EEXIST, self.c.dma_map, iova, size, 3, 0,
                                 self.ram.dup_fd())
                self.assertErrno(errno.EEXIST, self.c.dma_map, iova, size, 1)
        self.c.dma_map(0x200000, 0x1000, 3)  # adjacent is fine
        self.c.dma_map(0xFF000, 0x1000, 3)
        self.assert_alive()

    def test_unmappable_fds_are_refused(self) -> None:
        self.c.version()
        r, w = os.pipe()
        s1, s2 = socket.socketpair()
        tmp = tempfile.NamedTemporaryFile()  # noqa: SIM115
        tmp.write(bytes(0x4000))
        tmp.flush()
        ro = os.open(tmp.name, os.O_RDONLY)
        rw = os.open(tmp.name, os.O_RDWR)
        null = os.open("/dev/null", os.O_RDONLY)
        try:
            cases = [
                ("pipe", errno.EINVAL, 3, 0, 0x1000, r),
                ("socket", errno.EINVAL, 3, 0, 0x1000, s1.fileno()),
                ("/dev/null", errno.EINVAL, 1, 0, 0x1000, null),
                ("read-only file, write flag", errno.EACCES, 3, 0, 0x1000, ro),
                ("offset past EOF", errno.EINVAL, 3, 0x8000, 0x1000, rw),
                ("range past EOF", errno.EINVAL, 3, 0, 0x8000, rw),
            ]
            for i, (name, err, flags, offset, size, fd) in enumerate(cases):
                with self.subTest(name):
                    self.assertErrno(err, self.c.dma_map, (i + 1) << 24, size, flags, offset,
                                     os.dup(fd))
            self.assertEqual(self.dev.status()["dma_map_count"], 0)
            self.c.dma_map(1 << 30, 0x1000, 1, 0, os.dup(ro))  # what the fd allows: accepted
        finally:
            for fd in (r, w, ro, rw, null):
                os.close(fd)
            s1.close()
            s2.close()
            tmp.close()
        self.assert_alive()

    def test_unmap_of_a_range_never_mapped_is_an_error(self) -> None:
        self.c.version()
        self.assertErrno(errno.ENOENT, self.c.dma_unmap, 0x100000, 0x1000)
        self.c.dma_map(0x100000, 0x1000, 3)
        self.assertErrno(errno.ENOENT, self.c.dma_unmap, 0x101000, 0x1000)
        self.c.dma_unmap(0x100000, 0x1000)
        self.assertErrno(errno.ENOENT, self.c.dma_unmap, 0x100000, 0x1000)  # twice
        self.assert_alive()

    def test_minimal_version_payload_is_accepted(self) -> None:
        rep = self.c.request(P.VERSION, struct.pack("<HH", 0, 0) + b"{}\0")
        self.assertEqual(rep, struct.pack("<HH", 0, 0) + b"{}\0")
        self.assertEqual(self.c.get_info()[2], 9)  # negotiated
        self.assert_alive()

    def test_capabilities_of_the_wrong_type_are_refused(self) -> None:
        for caps in ([], "x", 1, {"max_msg_fds": "8"}, {"pgsizes": True},
                     {"max_data_xfer_size": -1}, {"max_dma_maps": 1.5}, {"migration": 1},
                     {"write_multiple": 1}, {"twin_socket": []}):
            body = json.dumps({"capabilities": caps}).encode() + b"\0"
            with self.subTest(caps=caps):
                self.assertErrno(errno.EINVAL, self.c.request, P.VERSION,
                                 struct.pack("<HH", 0, 0) + body)
        self.c.version(b'{"capabilities":{"max_msg_fds":8,"unknown":[1]}}\0')  # ignored
        self.assert_alive()


def run_device(tmp: str, sock: str, ctl: str, *extra: str, umask: int = 0o022
               ) -> subprocess.Popen[bytes]:
    log = open(os.path.join(tmp, "device.log"), "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "pinlab.device", "--socket", sock, "--control", ctl, *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            preexec_fn=lambda: os.umask(umask))  # noqa: PLW1509
    finally:
        log.close()


def wait_for(cond, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: device exited {proc.poll()}")
        time.sleep(0.02)


class ExposureTest(unittest.TestCase):
    """Input 7: socket and audit file modes, symlinks, what gets unlinked."""

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="pinlab-exp-")
        self.procs: list[subprocess.Popen[bytes]] = []

    def tearDown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        subprocess.run(["rm", "-rf", self.tmp], check=False)

    def start(self, sock: str, ctl: str, *extra: str, umask: int = 0o022
              ) -> subprocess.Popen[bytes]:
        p = run_device(self.tmp, sock, ctl, *extra, umask=umask)
        self.procs.append(p)
        return p

    def log(self) -> str:
        with open(os.path.join(self.tmp, "device.log"), errors="replace") as f:
            return f.read()

    def test_private_modes_under_umask_0(self) -> None:
        run = os.path.join(self.tmp, "run")  # does not exist: the device creates it
        sock, ctl = os.path.join(run, "vfio.sock"), os.path.join(run, "control.sock")
        audit = os.path.join(self.tmp, "audit.jsonl")
        p = self.start(sock, ctl, "--audit", audit, umask=0)
        wait_for(lambda: os.path.exists(sock), p, "socket")
        self.assertEqual(stat.S_IMODE(os.stat(run).st_mode), 0o700)
        for path in (sock, ctl, audit):
            with self.subTest(path=path):
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with VfioUserClient(sock, 1.0) as c:
            c.version()
        p.terminate()
        self.assertEqual(p.wait(10), 0)
        self.assertFalse(os.path.exists(sock))

    def test_directory_others_can_write_is_refused(self) -> None:
        run = os.path.join(self.tmp, "shared")
        os.mkdir(run)
        os.chmod(run, 0o777)
        p = self.start(os.path.join(run, "vfio.sock"), os.path.join(run, "control.sock"))
        self.assertEqual(p.wait(30), 1)
        self.assertIn("writable only by us", self.log())
        self.assertEqual(os.listdir(run), [])

    def test_audit_symlink_is_not_followed(self) -> None:
        target = os.path.join(self.tmp, "elsewhere.jsonl")
        link = os.path.join(self.tmp, "audit.jsonl")
        os.symlink(target, link)  # dangling
        p = self.start(os.path.join(self.tmp, "v.sock"), os.path.join(self.tmp, "c.sock"),
                       "--audit", link)
        self.assertEqual(p.wait(30), 1)
        self.assertFalse(os.path.exists(target))
        self.assertIn("--audit", self.log())

    def test_existing_regular_file_is_never_unlinked(self) -> None:
        sock = os.path.join(self.tmp, "precious")
        with open(sock, "w") as f:
            f.write("keep me")
        p = self.start(sock, os.path.join(self.tmp, "c.sock"))
        self.assertEqual(p.wait(30), 1)
        with open(sock) as f:
            self.assertEqual(f.read(), "keep me")
        # a stale socket, though, is replaced
        stale = os.path.join(self.tmp, "stale.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(stale)
        s.close()
        p2 = self.start(stale, os.path.join(self.tmp, "c2.sock"))
        wait_for(lambda: VfioUserClient(stale, 1.0).close() is None, p2, "stale socket")


class AuditBoundTest(HostileTestBase):
    """Input 8: a stream of 8-byte writes against a bounded audit file."""

    extra = ["--audit-max-bytes", str(1 << 20)]

    def test_audit_file_stops_at_its_bound_with_a_marker(self) -> None:
        self.c.bring_up(self.ram)
        drv = Driver(self.c, self.ram)
        try:
            drv.setup_msix()
            drv.enable()
            self.assertEqual(drv.cmd(OP_CREATE_REGION, 1, 16, 1).status, 0)
            drv.write_page_list(drv.scratch, [0x200000 + i * 4096 for i in range(16)])
            self.assertEqual(drv.cmd(OP_MAP_PAGES, 1, 0, 16, drv.scratch).status, 0)
            self.assertEqual(drv.cmd(OP_STREAM_START, 1, 0, 16 * 4096, 1, 8, 0).status, 0)
            deadline = time.monotonic() + 120
            while not self.dev.status()["audit"]["file_truncated_at"]:  # type: ignore[index]
                self.assertLess(time.monotonic(), deadline, "audit file never reached its bound")
                time.sleep(0.2)
            writes = self.dev.status()["audit"]["writes"]  # type: ignore[index]
            time.sleep(0.5)
            self.assertGreater(self.dev.status()["audit"]["writes"], writes)  # still auditing
        finally:
            drv.close()
        assert self.dev.audit_path is not None
        size = os.path.getsize(self.dev.audit_path)
        self.assertLessEqual(size, 1 << 20)
        with open(self.dev.audit_path, "rb") as f:
            f.seek(max(0, size - 4096))
            last = json.loads(f.read().splitlines()[-1])
        self.assertEqual(last["kind"], "truncated")
        self.assertGreater(last["seq"], 1000)
        self.assert_alive()


if __name__ == "__main__":
    unittest.main()
