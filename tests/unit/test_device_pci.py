"""PCI config space semantics, BAR2 (MSI-X) and BAR0 register access widths."""

from __future__ import annotations

import unittest

from pinlab.device import protocol as P
from pinlab.device.testclient import LocalServer


class ConfigSpaceTest(unittest.TestCase):
    def setUp(self) -> None:
        self.srv = LocalServer()
        self.c = self.srv.client()
        self.c.version()

    def tearDown(self) -> None:
        self.c.close()
        self.srv.close()

    def test_identity(self) -> None:
        c = self.c
        self.assertEqual(c.cfg_read(0x00, 2), 0x1DE5)
        self.assertEqual(c.cfg_read(0x02, 2), 0x0001)
        self.assertEqual(c.cfg_read(0x08, 4), 0x08800001)
        self.assertEqual(c.cfg_read(0x0E, 1), 0)
        self.assertEqual(c.cfg_read(0x2C, 4), 0x00011DE5)
        self.assertEqual(c.cfg_read(0x06, 2) & 0x10, 0x10)
        self.assertEqual(c.cfg_read(0x34, 1), 0x40)
        self.assertEqual(c.cfg_read(0x3D, 1), 0)  # P14

    def test_msix_capability(self) -> None:
        c = self.c
        self.assertEqual(c.cfg_read(0x40, 1), 0x11)
        self.assertEqual(c.cfg_read(0x41, 1), 0)
        self.assertEqual(c.cfg_read(0x42, 2), 3)
        self.assertEqual(c.cfg_read(0x44, 4), 0x000 | 2)
        self.assertEqual(c.cfg_read(0x48, 4), 0x800 | 2)
        c.cfg_write(0x42, 2, 0xFFFF)
        self.assertEqual(c.cfg_read(0x42, 2), 0xC003)  # only enable + mask are writable
        self.assertTrue(self.srv.device.pci.config.msix_enabled)
        c.cfg_write(0x44, 4, 0xFFFFFFFF)
        self.assertEqual(c.cfg_read(0x44, 4), 2)

    def test_read_only_fields(self) -> None:
        c = self.c
        before = c.region_read(P.PCI_CONFIG, 0, 256)
        for off in (0x00, 0x08, 0x2C, 0x34, 0x3D, 0x0E):
            c.cfg_write(off, 1, 0xA5)
        c.cfg_write(0x00, 4, 0xFFFFFFFF)
        c.cfg_write(0x06, 2, 0xFFFF)
        after = c.region_read(P.PCI_CONFIG, 0, 256)
        self.assertEqual(before, after)

    def test_command_register_mask(self) -> None:
        self.c.cfg_write(0x04, 2, 0xFFFF)
        self.assertEqual(self.c.cfg_read(0x04, 2), 0x0547)
        self.c.cfg_write(0x04, 2, 0)
        self.assertEqual(self.c.cfg_read(0x04, 2), 0)

    def test_bar_sizing(self) -> None:
        c = self.c
        for off, expect in ((0x10, 0xFFFFE000), (0x14, 0), (0x18, 0xFFFFF000), (0x1C, 0),
                            (0x20, 0), (0x24, 0)):
            c.cfg_write(off, 4, 0xFFFFFFFF)
            self.assertEqual(c.cfg_read(off, 4), expect, hex(off))
        c.cfg_write(0x10, 4, 0xFEBF1234)
        self.assertEqual(c.cfg_read(0x10, 4), 0xFEBF0000)  # 8 KiB aligned

    def test_rom_sizing_reads_zero(self) -> None:  # P11 / P12
        for value in (0xFFFFF800, 0xFFFFFFFE, 0xFFFFFFFF):
            self.c.cfg_write(0x30, 4, value)
            self.assertEqual(self.c.cfg_read(0x30, 4), 0)

    def test_interrupt_line_is_scratch(self) -> None:
        self.c.cfg_write(0x3C, 1, 0x0B)
        self.assertEqual(self.c.cfg_read(0x3C, 1), 0x0B)

    def test_unaligned_config_access(self) -> None:
        self.assertEqual(self.c.region_read(P.PCI_CONFIG, 1, 3), bytes([0x1D, 0x01, 0x00]))

    def test_bar2_pba_reads_zero_and_drops_writes(self) -> None:
        c = self.c
        self.assertEqual(c.region_read(2, 0x800, 8), bytes(8))
        c.region_write(2, 0x800, b"\xff" * 8)
        self.assertEqual(c.region_read(2, 0x800, 8), bytes(8))
        c.region_write(2, 0x10, b"\x01\x02\x03\x04")  # table: plain storage
        self.assertEqual(c.region_read(2, 0x10, 4), b"\x01\x02\x03\x04")

    def test_bar0_access_widths(self) -> None:
        c = self.c
        self.assertEqual(c.reg_read(0x000), 0x50494E4C)
        self.assertEqual(c.reg_read(0x004), 0x00010000)
        self.assertEqual(c.reg_read(0x000, 8), 0x00010000_50494E4C)
        self.assertEqual(c.reg_read(0x001, 1), 0x4E)
        self.assertEqual(c.reg_read(0x002, 2), 0x5049)
        c.reg_write(0x000, 0, posted=False)  # RO: ignored
        self.assertEqual(c.reg_read(0x000), 0x50494E4C)
        c.reg_write(0x080, 0x11223344, posted=False)
        c.reg_write(0x081, 0xAA, n=1, posted=False)
        self.assertEqual(c.reg_read(0x080), 0x1122AA44)
        c.reg_write(0x010, 0x1_2345_6000, n=8, posted=False)
        self.assertEqual(c.reg_read(0x010, 8), 0x1_2345_6000)
        c.reg_write(0x014, 0, posted=False)  # high word alone
        self.assertEqual(c.reg_read(0x010, 8), 0x2345_6000)
        self.assertEqual(c.reg_read(0x0F0), 0)  # undefined offsets read 0
        self.assertEqual(c.region_read(0, 0x7F0, 16), bytes(16))


if __name__ == "__main__":
    unittest.main()
