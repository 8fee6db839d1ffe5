"""vfio-user transport: bring-up, message validation, errors, reconnects."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import unittest

from pinlab.device import protocol as P
from pinlab.device.testclient import (
    QEMU_VERSION_JSON,
    GuestRam,
    LocalServer,
    VfioUserClient,
    VfioUserError,
)


class ProtocolTest(unittest.TestCase):
    def setUp(self) -> None:
        self.srv = LocalServer()
        self.ram = GuestRam(4 << 20)
        self.c = self.srv.client()

    def tearDown(self) -> None:
        self.c.close()
        self.srv.close()
        self.ram.close()

    def assertErrno(self, err: int, fn, *args, **kw) -> None:  # noqa: N802
        with self.assertRaises(VfioUserError) as cm:
            fn(*args, **kw)
        self.assertEqual(cm.exception.errno, err)

    def test_version_reply_fits_and_is_compact(self) -> None:
        caps = self.c.version()["capabilities"]
        self.assertEqual(caps["max_msg_fds"], 8)
        self.assertEqual(caps["max_data_xfer_size"], 1 << 20)
        self.assertEqual(caps["pgsizes"], 4096)
        self.assertNotIn("write_multiple", caps)  # P15
        self.assertNotIn("twin_socket", caps)

    def test_version_reply_never_exceeds_request(self) -> None:
        small = b'{"capabilities":{}}\0'
        payload = self.c.request(P.VERSION, struct.pack("<HH", 0, 0) + small)
        self.assertLessEqual(len(payload), 4 + len(small))
        self.assertTrue(payload.endswith(b"\0"))
        json.loads(payload[4:-1])

    def test_version_errors(self) -> None:
        self.assertErrno(errno.EINVAL, self.c.request, P.VERSION, b"\0\0\0\0{}")  # no NUL
        self.assertErrno(errno.EINVAL, self.c.request, P.VERSION, b"\0\0\0\0{bad\0")
        self.assertErrno(errno.ENOTSUP, self.c.request, P.VERSION, b"\1\0\0\0{}\0")
        self.assertErrno(errno.EINVAL, self.c.request, P.VERSION, b"\0\0")

    def test_commands_before_version_are_refused(self) -> None:
        self.assertErrno(errno.EINVAL, self.c.get_info)
        self.c.version()
        self.assertEqual(self.c.get_info()[1], P.DEVICE_FLAGS_RESET | P.DEVICE_FLAGS_PCI)

    def test_bring_up_like_qemu(self) -> None:
        self.c.bring_up(self.ram)
        argsz, flags, nregions, nirqs = self.c.get_info()
        self.assertEqual((argsz, nregions, nirqs), (16, 9, 5))
        sizes = {i: self.c.region_info(i)[4] for i in range(9)}
        self.assertEqual(sizes, {0: 8192, 1: 0, 2: 4096, 3: 0, 4: 0, 5: 0, 6: 0, 7: 256, 8: 0})
        for i in (2, 7):
            argsz, flags, index, cap, size, off = self.c.region_info(i)
            self.assertEqual((argsz, flags & P.REGION_INFO_FLAG_MMAP, index), (32, 0, i))
            self.assertEqual(flags & 3, 3)
        # BAR0 without --bar0-mirror: trapped whole, no mmap
        argsz, flags, index, cap, size, off = self.c.region_info(0)
        self.assertEqual((argsz, cap, flags & 15), (32, 0, 3))
        self.assertEqual(self.c.irq_info(P.IRQ_MSIX)[3], 4)
        self.assertFalse(self.c.irq_info(P.IRQ_MSIX)[1] & P.IRQ_INFO_NORESIZE)
        self.assertEqual(self.c.irq_info(P.IRQ_ERR)[3], 1)
        self.assertEqual(len(self.srv.device.memory.mappings()), 1)

    def test_region_info_argsz_too_small(self) -> None:
        self.c.version()
        self.assertErrno(errno.EINVAL, self.c.region_info, 0, argsz=16)
        self.assertErrno(errno.EINVAL, self.c.region_info, 99)

    def test_irq_info_bad_index(self) -> None:
        self.c.version()
        self.assertErrno(errno.EINVAL, self.c.irq_info, 5)

    def test_unknown_command_gets_error_reply(self) -> None:
        self.c.version()
        self.assertErrno(errno.ENOSYS, self.c.request, 99, b"")
        self.assertErrno(errno.ENOSYS, self.c.request, P.REGION_WRITE_MULTI, bytes(8))
        self.c.get_info()  # still in sync

    def test_no_reply_means_no_reply_even_for_errors(self) -> None:
        self.c.version()
        self.c.send(P.REGION_WRITE, P.REGION_RW_S.pack(0x10000, 0, 4) + bytes(4),
                    flags=P.FLAG_NO_REPLY)  # out of range, posted: no error reply allowed
        self.c.send(99, b"", flags=P.FLAG_NO_REPLY)
        self.c.reg_write(0x080, 0x1234, posted=True)
        self.assertEqual(self.c.reg_read(0x080), 0x1234)  # next reply is for this read
        self.assertFalse(self.c.readable(0.05))

    def test_error_reply_is_header_only(self) -> None:
        self.c.version()
        msg_id = self.c.send(P.REGION_READ, P.REGION_RW_S.pack(0, 42, 4))
        rep = self.c.recv()
        self.assertEqual((rep.msg_id, rep.flags, rep.size), (msg_id, 0x21, 16))
        self.assertEqual(rep.error_no, errno.EINVAL)

    def test_bad_payload_sizes(self) -> None:
        self.c.version()
        self.assertErrno(errno.EINVAL, self.c.request, P.DMA_MAP, bytes(8))
        self.assertErrno(errno.EINVAL, self.c.request, P.DMA_UNMAP, bytes(8))
        self.assertErrno(errno.EINVAL, self.c.request, P.DEVICE_GET_INFO, bytes(3))
        self.assertErrno(errno.EINVAL, self.c.request, P.REGION_READ, bytes(10))
        self.assertErrno(errno.EINVAL, self.c.request, P.REGION_WRITE,
                         P.REGION_RW_S.pack(0, 0, 8) + bytes(4))
        self.assertErrno(errno.EINVAL, self.c.request, P.DEVICE_SET_IRQS, bytes(4))
        self.assertErrno(errno.EINVAL, self.c.request, P.DEVICE_RESET, bytes(4))
        self.assertErrno(errno.E2BIG, self.c.request, P.REGION_READ,
                         P.REGION_RW_S.pack(0, 7, (1 << 20) + 1))

    def test_region_access_bounds(self) -> None:
        self.c.version()
        self.assertErrno(errno.EINVAL, self.c.region_read, 7, 250, 8)
        self.assertErrno(errno.EINVAL, self.c.region_read, 1, 0, 4)  # unused BAR
        self.assertErrno(errno.EINVAL, self.c.region_read, 0, 8192, 4)  # past page 1 (the mirror)
        self.assertErrno(errno.EINVAL, self.c.region_read, 0, 0, 0)
        self.assertEqual(len(self.c.region_read(7, 0, 256)), 256)

    def test_stray_fds_are_closed_and_refused(self) -> None:
        self.c.version()
        r, w = os.pipe()
        try:
            self.assertErrno(errno.EINVAL, self.c.request, P.DEVICE_GET_INFO,
                             P.DEVICE_INFO_S.pack(16, 0, 0, 0), [r])
        finally:
            os.close(r)
        os.close(w)
        self.c.get_info()

    def test_dma_map_accepts_fdless_and_read_only_and_unmap_echoes(self) -> None:
        self.c.version()
        self.c.dma_map(0, 0xC0000, 3, 0, self.ram.dup_fd())  # RAM below the ROM
        self.c.dma_map(0xC0000, 0x20000, 1)  # ROM: read-only, no fd
        self.c.dma_map(0x100000, self.ram.size - 0x100000, 3, 0x100000, self.ram.dup_fd())
        self.c.dma_map(0xFFFC0000, 0x40000, 1)
        self.c.dma_map(0x1000_0000, 0x1000, 1, 0, self.ram.dup_fd())  # read-only RAM
        self.assertEqual(len(self.srv.device.memory.mappings()), 5)
        echo = self.c.dma_unmap(0xC0000, 0x20000)
        self.assertEqual(echo, P.DMA_UNMAP_S.pack(24, 0, 0xC0000, 0x20000))
        self.assertEqual(len(self.srv.device.memory.mappings()), 4)
        self.c.dma_unmap(0, 0, P.DMA_UNMAP_FLAG_ALL)
        self.assertEqual(self.srv.device.memory.mappings(), [])
        self.assertErrno(errno.EINVAL, self.c.request, P.DMA_MAP,
                         P.DMA_MAP_S.pack(32, 0x80, 0, 0, 4096))
        self.assertErrno(errno.EINVAL, self.c.dma_unmap, 0, 4096, 1)  # dirty bitmap

    def test_set_irqs_semantics(self) -> None:
        self.c.bring_up(self.ram)
        irq = self.srv.device.irq
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
        try:
            ev = P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER
            self.c.set_irqs(P.IRQ_MSIX, 0, 1, ev)  # 0 fds: de-assign (P13)
            self.assertEqual(irq.assigned(P.IRQ_MSIX), [False] * 4)
            self.c.set_irqs(P.IRQ_MSIX, 0, 4, ev, [os.dup(f) for f in efds])
            self.assertEqual(irq.assigned(P.IRQ_MSIX), [True] * 4)
            self.c.set_irqs(P.IRQ_MSIX, 2, 1, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_TRIGGER)
            self.assertEqual(os.eventfd_read(efds[2]), 1)  # loopback trigger
            self.c.set_irqs(P.IRQ_MSIX, 1, 1, P.IRQ_SET_DATA_BOOL | P.IRQ_SET_ACTION_TRIGGER,
                            data=b"\1")
            self.assertEqual(os.eventfd_read(efds[1]), 1)
            self.c.set_irqs(P.IRQ_MSIX, 3, 1, ev)  # de-assign one
            self.assertEqual(irq.assigned(P.IRQ_MSIX), [True, True, True, False])
            self.c.set_irqs(P.IRQ_MSIX, 0, 0, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_TRIGGER)
            self.assertEqual(irq.assigned(P.IRQ_MSIX), [False] * 4)
            self.c.set_irqs(P.IRQ_ERR, 0, 1, ev, [os.dup(efds[0])])
            self.c.set_irqs(P.IRQ_INTX, 0, 1, P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_MASK)
            bad = [
                (P.IRQ_MSIX, 0, 5, ev, None),  # beyond count
                (7, 0, 1, ev, None),  # bad index
                (P.IRQ_MSIX, 0, 2, ev, [os.dup(efds[0])]),  # fd count mismatch
                (P.IRQ_MSIX, 0, 1, P.IRQ_SET_DATA_NONE | P.IRQ_SET_DATA_BOOL | 0x20, None),
                (P.IRQ_MSIX, 0, 1, P.IRQ_SET_DATA_NONE | 0x18, None),  # two actions
                (P.IRQ_MSIX, 0, 1, P.IRQ_SET_DATA_NONE | 0x20, [os.dup(efds[0])]),
            ]
            for index, start, count, flags, fds in bad:
                with self.subTest(flags=flags, count=count):
                    self.assertErrno(errno.EINVAL, self.c.set_irqs, index, start, count, flags,
                                     fds)
        finally:
            for f in efds:
                os.close(f)

    def test_garbage_header_closes_only_that_connection(self) -> None:
        self.c.version()
        self.c.send_raw(struct.pack("<HHIII", 1, 4, 8, 0, 0))  # msg_size < 16
        with self.assertRaises((ConnectionError, OSError)):
            self.c.recv()
        with self.srv.client() as c2:
            c2.version()
            self.assertEqual(c2.get_info()[2], 9)

    def test_oversized_and_bad_type_messages_close_connection(self) -> None:
        self.c.close()  # one client at a time: the others wait in the backlog
        for hdr in (struct.pack("<HHIII", 1, 10, 1 << 30, 0, 0),
                    struct.pack("<HHIII", 1, 4, 16, 0x3, 0)):
            with self.subTest(hdr=hdr), self.srv.client() as c:
                c.version()
                c.send_raw(hdr)
                with self.assertRaises((ConnectionError, OSError)):
                    c.recv()

    def test_truncated_message_then_eof(self) -> None:
        self.c.version()
        self.c.send_raw(struct.pack("<HHIII", 1, 9, 32, 0, 0) + b"\0" * 4)
        self.c.sock.shutdown(socket.SHUT_WR)
        with self.assertRaises((ConnectionError, OSError)):
            self.c.recv()
        with self.srv.client() as c2:
            c2.version()

    def test_stray_reply_is_ignored(self) -> None:
        self.c.version()
        self.c.send(P.DMA_WRITE, b"", flags=P.TYPE_REPLY)
        self.assertEqual(self.c.get_info()[2], 9)

    def test_disconnect_cleans_maps_and_irqs_keeps_state(self) -> None:
        self.c.bring_up(self.ram)
        efd = os.eventfd(0)
        self.c.set_irqs(P.IRQ_MSIX, 0, 1, P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER,
                        [efd])
        self.c.reg_write(0x080, 0xABCD, posted=False)
        self.c.close()
        with VfioUserClient(self.srv.path) as c2:
            c2.version()  # the server handled the EOF before accepting us
            self.assertEqual(self.srv.device.memory.mappings(), [])
            self.assertEqual(self.srv.device.irq.assigned(P.IRQ_MSIX), [False] * 4)
            self.assertEqual(c2.reg_read(0x080), 0xABCD)
            self.assertEqual(self.srv.device.connections, 2)

    def test_qemu_version_json_size(self) -> None:
        self.assertEqual(16 + 4 + len(QEMU_VERSION_JSON), 214)


if __name__ == "__main__":
    unittest.main()
