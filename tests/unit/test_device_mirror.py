"""BAR0 page 1: the register mirror QEMU maps into the guest (a sparse mmap area backed
by the fd of the REGION_INFO reply). The values a driver reads from memory must be the
registers' current values after every change, with no message to the device."""

from __future__ import annotations

import mmap
import os
import unittest

from pinlab.common import uapi as U
from pinlab.device import engine as E
from pinlab.device import protocol as P
from pinlab.device.mirror import MIRROR_OFFSET, PAGE
from pinlab.device.testclient import Rig


class MirrorTest(unittest.TestCase):
    def setUp(self) -> None:
        self.rig = Rig(ram_size=32 << 20, mirror=True)
        self.c, self.d = self.rig.client, self.rig.driver
        info, areas, fds = self.c.region_info_caps(P.PCI_BAR0)
        self.addCleanup(lambda: [os.close(fd) for fd in fds])
        self.info, self.areas, self.fds = info, areas, fds
        self.assertEqual(len(fds), 1)
        self.mm = mmap.mmap(fds[0], PAGE, mmap.MAP_SHARED, mmap.PROT_READ,
                            offset=info[5] + MIRROR_OFFSET)
        self.addCleanup(self.mm.close)

    def tearDown(self) -> None:
        self.rig.close()

    def mirrored(self, reg: int) -> int:
        return int.from_bytes(self.mm[reg:reg + 4], "little")

    def assert_same(self) -> None:
        for name in ("REG_ID", "REG_VERSION", "REG_STATUS", "REG_CTRL", "REG_SQ_HEAD",
                     "REG_SQ_TAIL", "REG_CQ_HEAD", "REG_CQ_TAIL", "REG_EQ_TAIL",
                     "REG_CMDS_DONE", "REG_ERRORS", "REG_SCRATCH", "REG_SQ_ENTRIES"):
            reg = getattr(U, name)
            with self.subTest(reg=name):
                self.assertEqual(self.mirrored(reg), self.c.reg_read(reg))

    def test_reply_offers_one_area(self) -> None:
        argsz, flags, index, cap, size, off = self.info
        self.assertEqual((argsz, index, size, cap), (64, 0, 8192, 32))
        self.assertEqual(flags & P.REGION_INFO_FLAG_MMAP, P.REGION_INFO_FLAG_MMAP)
        self.assertEqual(self.areas, [(MIRROR_OFFSET, PAGE)])

    def test_mirror_follows_every_change(self) -> None:
        self.assertEqual(self.mirrored(U.REG_ID), U.ID_MAGIC)
        self.assert_same()  # enabled by the rig
        self.assertEqual(self.mirrored(U.REG_STATUS), U.STATUS_ENABLED)
        for _ in range(5):
            self.d.cmd(E.OP_NOP)
        self.assertEqual(self.d.cmd(E.OP_DMA_WRITE, 9, 0, 8, 1).status, E.NO_REGION)
        self.assert_same()
        self.assertEqual(self.mirrored(U.REG_CMDS_DONE), 6)
        self.assertEqual(self.mirrored(U.REG_ERRORS), 1)
        # a posted write may still be on its way: a read of the mirror does not flush it
        # (as a memory read does not flush posted PCI writes); a non-posted one is done
        self.c.reg_write(U.REG_SCRATCH, 0x1234, posted=False)
        self.assertEqual(self.mirrored(U.REG_SCRATCH), 0x1234)
        self.c.reg_write(U.REG_CTRL, U.CTRL_RESET, posted=False)
        self.assert_same()
        self.assertEqual(self.mirrored(U.REG_STATUS), 0)
        self.assertEqual(self.mirrored(U.REG_CMDS_DONE), 0)

    def test_page1_trapped_reads_and_writes(self) -> None:
        # a client that does not map page 1 reads the same registers through messages
        self.assertEqual(self.c.reg_read(MIRROR_OFFSET + U.REG_ID), U.ID_MAGIC)
        self.c.reg_write(MIRROR_OFFSET + U.REG_SCRATCH, 77)  # no register there
        self.assertEqual(self.c.reg_read(U.REG_SCRATCH), 0)
        self.c.reg_write(MIRROR_OFFSET + U.REG_CTRL, U.CTRL_RESET)  # not a reset
        self.assertEqual(self.c.reg_read(U.REG_STATUS), U.STATUS_ENABLED)


if __name__ == "__main__":
    unittest.main()
