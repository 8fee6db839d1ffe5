"""GuestMemory: translation, bounds, read-only and fd-less maps, spans, unmap."""

from __future__ import annotations

import unittest
import zlib

from pinlab.device.memory import DmaError, GuestMemory
from pinlab.device.testclient import GuestRam


class GuestMemoryTest(unittest.TestCase):
    def setUp(self) -> None:
        self.ram = GuestRam(1 << 20)
        self.mem = GuestMemory()
        # two adjacent maps of the same memfd: [0, 512K) and [512K, 1M)
        self.mem.map(0, 512 << 10, 3, 0, self.ram.dup_fd())
        self.mem.map(512 << 10, 512 << 10, 3, 512 << 10, self.ram.dup_fd())

    def tearDown(self) -> None:
        self.mem.unmap_all()
        self.ram.close()

    def test_read_write_roundtrip(self) -> None:
        self.mem.write(0x1000, b"hello")
        self.assertEqual(self.ram.read(0x1000, 5), b"hello")
        self.ram.write(0x2000, b"world")
        self.assertEqual(self.mem.read(0x2000, 5), b"world")

    def test_span_across_two_maps(self) -> None:
        addr = (512 << 10) - 4
        self.mem.write(addr, b"abcdefgh")
        self.assertEqual(self.ram.read(addr, 8), b"abcdefgh")
        self.assertEqual(self.mem.read(addr, 8), b"abcdefgh")
        self.assertEqual(self.mem.crc32(addr, 8, 0, zlib.crc32), zlib.crc32(b"abcdefgh"))

    def test_bounds(self) -> None:
        with self.assertRaises(DmaError) as cm:
            self.mem.read((1 << 20) - 4, 8)
        self.assertEqual(cm.exception.addr, 1 << 20)
        with self.assertRaises(DmaError):
            self.mem.write(1 << 40, b"x")
        with self.assertRaises(DmaError):
            self.mem.read(-8, 8)
        with self.assertRaises(DmaError):
            self.mem.read((1 << 64) - 4, 8)

    def test_read_only_and_fdless(self) -> None:
        self.mem.map(1 << 30, 4096, 1, 0, self.ram.dup_fd())
        self.mem.map(2 << 30, 4096, 3, 0, None)
        self.assertEqual(len(self.mem.read(1 << 30, 16)), 16)
        with self.assertRaises(DmaError):
            self.mem.write(1 << 30, b"x")
        with self.assertRaises(DmaError):
            self.mem.read(2 << 30, 1)
        self.mem.check(1 << 30, 4096, False)
        with self.assertRaises(DmaError):
            self.mem.check(1 << 30, 4096, True)

    def test_unmap(self) -> None:
        self.assertEqual(self.mem.unmap(0, 512 << 10), 1)
        with self.assertRaises(DmaError):
            self.mem.read(0, 1)
        self.mem.read(512 << 10, 1)
        self.assertEqual(self.mem.unmap(0, 1 << 40), 1)  # not exact: every intersecting map
        self.assertEqual(self.mem.mappings(), [])


if __name__ == "__main__":
    unittest.main()
