"""Property tests: well-framed messages with arbitrary payloads never break the server;
nor do client-supplied fds of any type, files that shrink under a mapping, any DMA_MAP
flags or any JSON nesting depth."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import tempfile
import unittest
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pinlab.device import protocol as P
from pinlab.device.limits import MAX_JSON_DEPTH
from pinlab.device.memory import DmaError, GuestMemory, MappingLost
from pinlab.device.testclient import GuestRam, LocalServer, QmpLine, VfioUserError

TRIGGER_NONE = P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_TRIGGER
TRIGGER_EVENTFD = P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER


class FuzzTest(unittest.TestCase):
    def setUp(self) -> None:
        self.srv = LocalServer()
        self.ram = GuestRam(1 << 20)
        self.c = self.srv.client()
        self.c.bring_up(self.ram)

    def tearDown(self) -> None:
        self.c.close()
        self.srv.close()
        self.ram.close()

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(command=st.integers(0, 20), payload=st.binary(max_size=80),
           no_reply=st.booleans())
    def test_random_payloads_keep_the_stream_in_sync(self, command: int, payload: bytes,
                                                     no_reply: bool) -> None:
        flags = P.FLAG_NO_REPLY if no_reply else 0
        msg_id = self.c.send(command, payload, flags=flags)
        if not no_reply:
            rep = self.c.recv()
            self.assertEqual((rep.msg_id, rep.command, rep.msg_type), (msg_id, command, 1))
            if rep.flags & P.FLAG_ERROR:
                self.assertEqual(rep.size, 16)
                self.assertNotEqual(rep.error_no, 0)
            else:
                self.assertLessEqual(rep.size, max(16 + len(payload), 32 + 4096))
        # the connection is still in sync and the device still answers
        self.assertEqual(self.c.get_info()[2], 9)
        self.assertEqual(self.c.reg_read(0x000), 0x50494E4C)


# --- hostile inputs by kind (issue 14): every fd type, shrinking files, flags, nesting ---

FD_KINDS = ["eventfd", "eventfd-full", "pipe-read", "pipe-write", "pipe-write-full",
            "socket", "socket-full", "file-ro", "file-rw", "memfd-sealed", "memfd",
            "memfd-empty", "dev-null", "dev-zero", "directory"]


def make_fd(kind: str, stack: contextlib.ExitStack) -> int:
    """A fresh fd of ``kind`` (closed by ``stack``); the caller sends a dup of it."""
    def keep(fd: int) -> int:
        stack.callback(os.close, fd)
        return fd

    if kind.startswith("eventfd"):
        fd = keep(os.eventfd(0))
        if kind.endswith("full"):
            os.eventfd_write(fd, 0xFFFFFFFFFFFFFFFE)
        return fd
    if kind.startswith("pipe") or kind.startswith("socket"):
        if kind.startswith("pipe"):
            r, w = os.pipe()
        else:
            a, b = socket.socketpair()
            r, w = a.detach(), b.detach()
        keep(r)
        keep(w)
        if kind.endswith("full"):
            os.set_blocking(w, False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(w, bytes(4096))
            os.set_blocking(w, True)
        return r if kind == "pipe-read" else w
    if kind.startswith("file"):
        f = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
        f.write(bytes(1 << 16))
        f.flush()
        path = f"/proc/self/fd/{f.fileno()}"
        return keep(os.open(path, os.O_RDONLY if kind == "file-ro" else os.O_RDWR))
    if kind.startswith("memfd"):
        ram = GuestRam(1 << 16, seal=kind == "memfd-sealed")
        stack.callback(ram.close)
        if kind == "memfd-empty":
            os.ftruncate(ram.fd, 0)
        return ram.fd
    if kind == "directory":
        return keep(os.open("/", os.O_RDONLY | os.O_DIRECTORY))
    return keep(os.open("/dev/null" if kind == "dev-null" else "/dev/zero", os.O_RDWR))


SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


class HostileFuzzTest(unittest.TestCase):
    """Properties that would have found the kinds of issue 14: whatever fd, flags or
    nesting a client sends, every request is answered (no hang: the client times out
    after 5 s), errors are errnos, and the device keeps answering."""

    def setUp(self) -> None:
        self.srv = LocalServer()
        self.ram = GuestRam(1 << 20)
        self.c = self.srv.client()
        self.c.sock.settimeout(5.0)
        self.c.bring_up(self.ram)

    def tearDown(self) -> None:
        self.c.close()
        self.srv.close()
        self.ram.close()

    def still_answers(self) -> None:
        self.assertEqual(self.c.reg_read(0x000), 0x50494E4C)
        with QmpLine(self.srv.control_path, 5.0) as q:
            q.execute("query-status")

    @SETTINGS
    @given(kind=st.sampled_from(FD_KINDS), vector=st.integers(0, 3),
           triggers=st.integers(1, 3))
    def test_any_fd_as_an_interrupt(self, kind: str, vector: int, triggers: int) -> None:
        with contextlib.ExitStack() as stack:
            fd = make_fd(kind, stack)
            try:
                self.c.set_irqs(P.IRQ_MSIX, vector, 1, TRIGGER_EVENTFD, [os.dup(fd)])
            except VfioUserError as exc:
                self.assertEqual(exc.errno, errno.EINVAL)
                self.assertNotIn(kind.split("-")[0], ("eventfd", "pipe", "socket"))
            else:
                self.assertIn(kind.split("-")[0], ("eventfd", "pipe", "socket"))
                for _ in range(triggers):  # loopback: answered even into a full fd
                    self.c.set_irqs(P.IRQ_MSIX, vector, 1, TRIGGER_NONE)
                self.c.set_irqs(P.IRQ_MSIX, vector, 1, TRIGGER_EVENTFD)  # de-assign
        self.still_answers()

    @SETTINGS
    @given(kind=st.sampled_from(FD_KINDS), flags=st.integers(0, 7),
           offset=st.sampled_from([0, 0x1000, 0x10000, 0x11000, 0x123]),
           size=st.sampled_from([0x1000, 0x10000, 0x20000]), shrink=st.booleans())
    def test_any_fd_and_flags_as_dma_map(self, kind: str, flags: int, offset: int, size: int,
                                         shrink: bool) -> None:
        iova = 1 << 32
        mem = self.srv.device.memory
        with contextlib.ExitStack() as stack:
            fd = make_fd(kind, stack)
            try:
                self.c.dma_map(iova, size, flags, offset, os.dup(fd))
            except VfioUserError as exc:
                self.assertIn(exc.errno, (errno.EINVAL, errno.EACCES, errno.ENODEV))
                self.assertFalse(any(m["iova"] == iova for m in mem.mappings()))
            else:
                self.assertLessEqual(flags, 3)
                self.assertIn(kind, ("file-ro", "file-rw", "memfd-sealed", "memfd"))
                if shrink and kind in ("file-rw", "memfd"):
                    os.ftruncate(fd, offset + size // 2)  # shrinks under the device
                for write in (False, True):  # permissions hold for every access
                    try:
                        if write:
                            mem.write(iova + size - 8, bytes(8))
                        else:
                            mem.read(iova + size - 8, 8)
                    except DmaError:
                        allowed = flags & (2 if write else 1)
                        self.assertTrue(not allowed or shrink, (kind, flags, write))
                    else:
                        self.assertTrue(flags & (2 if write else 1), (kind, flags, write))
                if self.srv.device.mappings_lost:  # the device failed the connection
                    with self.assertRaises((ConnectionError, OSError)):
                        self.c.recv()
                    self.c.close()
                    self.srv.device.mappings_lost = 0
                    self.c = self.srv.client()
                    self.c.bring_up(self.ram)
                else:
                    self.c.dma_unmap(iova, size)
        self.still_answers()

    @SETTINGS
    @given(depth=st.integers(0, 3000), brackets=st.sampled_from(["[]", "{}"]),
           where=st.sampled_from(["version", "qmp"]))
    def test_any_nesting_depth(self, depth: int, brackets: str, where: str) -> None:
        o, c = brackets
        inner = '{"a":' * depth + "1" + "}" * depth if o == "{" else "[" * depth + "]" * depth
        inner = inner or "1"
        levels = depth + 1  # {"x": inner}: the outer object is one more level
        if where == "version":
            body = ('{"x":' + inner + "}").encode() + b"\0"
            try:
                self.c.request(P.VERSION, struct.pack("<HH", 0, 0) + body)
            except VfioUserError as exc:
                self.assertEqual(exc.errno, errno.EINVAL)
                self.assertGreater(levels, MAX_JSON_DEPTH)
            else:
                self.assertLessEqual(levels, MAX_JSON_DEPTH)
        else:
            with QmpLine(self.srv.control_path, 5.0) as q:
                q.send_raw(('{"execute":"query-version","arguments":{"x":' + inner
                            + "}}\n").encode())
                rep = q.reply()
                self.assertEqual("error" in rep, levels + 1 > MAX_JSON_DEPTH, rep)
                q.execute("query-status")
        self.still_answers()


class ShrinkingMemoryFuzzTest(unittest.TestCase):
    """GuestMemory over an unsealed memfd that shrinks (or grows) under it: every access
    either works on bytes still in the file or raises MappingLost, never SIGBUS."""

    @settings(max_examples=300, deadline=None)
    @given(pages=st.integers(1, 16), new_size=st.integers(0, 20 << 12),
           op=st.sampled_from(["read", "write", "ramp", "crc", "check"]),
           addr=st.integers(0, 16 << 12), length=st.integers(1, 3 << 12), flags=st.integers(0, 3))
    def test_access_after_resize(self, pages: int, new_size: int, op: str, addr: int,
                                 length: int, flags: int) -> None:
        lost: list[str] = []
        mem = GuestMemory(on_lost=lost.append)
        ram = GuestRam(pages << 12, seal=False)
        try:
            mem.map(0, pages << 12, flags, 0, ram.dup_fd())
            os.ftruncate(ram.fd, new_size)
            addr &= ~7
            length = (length + 7) & ~7
            inside = addr + length <= pages << 12
            need = 2 if op in ("write", "ramp") else 1
            try:
                if op == "read":
                    data = mem.read(addr, length)
                    self.assertEqual(data, bytes(length))
                elif op == "write":
                    mem.write(addr, b"\xab" * length)
                elif op == "ramp":
                    mem.write_ramp(addr, length >> 3, 5)
                elif op == "crc":
                    mem.crc32(addr, length, 0, zlib.crc32)
                else:
                    mem.check(addr, length, False)
            except MappingLost:
                self.assertTrue(inside and flags & need)
                self.assertGreater(addr + length, new_size)  # only past the new end
                self.assertTrue(lost)
            except DmaError:
                self.assertTrue(not inside or not flags & (need if op != "check" else 1))
            else:
                self.assertTrue(inside)
                self.assertTrue(flags & (need if op != "check" else 1))
                if op != "check":
                    self.assertLessEqual(addr + length, new_size)
        finally:
            mem.unmap_all()
            ram.close()


if __name__ == "__main__":
    unittest.main()
