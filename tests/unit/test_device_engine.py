"""DMA engine: queues, every opcode and every status code, reset, MSI-X."""

from __future__ import annotations

import select
import time
import unittest
import zlib
from array import array

from pinlab.common import uapi as U
from pinlab.device import engine as E
from pinlab.device.regions import pattern
from pinlab.device.testclient import Rig

W = 1  # CREATE_REGION flags: writable


class EngineTest(unittest.TestCase):
    def setUp(self) -> None:
        self.rig = Rig(audit=True)
        self.d = self.rig.driver
        self.c = self.rig.client
        self.ram = self.rig.ram

    def tearDown(self) -> None:
        self.rig.close()

    def region(self, rid: int, npages: int, flags: int = W) -> list[int]:
        self.assertEqual(self.d.cmd(E.OP_CREATE_REGION, rid, npages, flags).status, E.OK)
        pages = self.rig.pages(npages)
        self.assertEqual(self.rig.map_pages(rid, 0, pages).status, E.OK)
        return pages

    def gather(self, pages: list[int]) -> bytes:
        return b"".join(self.ram.read(p, 4096) for p in pages)

    # --- queue mechanics --------------------------------------------------------------
    def test_nop_completion_and_msix(self) -> None:
        comp = self.d.cmd(E.OP_NOP)
        self.assertEqual((comp.status, comp.flags, comp.sq_head), (E.OK, 1, 1))
        # the interrupt follows the completion entry (a poller may see the entry first)
        self.assertTrue(select.select([self.d.vectors[0]], [], [], 10)[0], "no MSI-X")
        self.assertEqual(self.d.irq_count(0), 1)
        self.assertEqual(self.c.reg_read(U.REG_CMDS_DONE), 1)
        self.assertEqual(self.c.reg_read(U.REG_SQ_HEAD), 1)
        self.assertEqual(self.c.reg_read(U.REG_CQ_TAIL), 1)

    def test_phase_flips_on_wrap(self) -> None:
        entries = self.d.entries
        for i in range(entries * 2 + 3):
            comp = self.d.cmd(E.OP_NOP)
            self.assertEqual(comp.flags & 1, 1 if (i // entries) % 2 == 0 else 0)
        self.assertEqual(self.c.reg_read(U.REG_CMDS_DONE), entries * 2 + 3)

    def test_batch_in_order(self) -> None:
        cids = [self.d.submit(E.OP_NOP) for _ in range(10)]
        got = [self.d.poll().cid for _ in range(10)]
        self.assertEqual(got, cids)

    def test_cq_full_stops_fetching(self) -> None:
        n = self.d.entries
        for _ in range(n - 1):  # n - 1 completions fill the CQ (tail + 1 == head)
            self.d.submit(E.OP_NOP)
        deadline = time.monotonic() + 5
        while self.c.reg_read(U.REG_CQ_TAIL) != n - 1:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        self.d.submit(E.OP_NOP)
        time.sleep(0.2)
        self.assertEqual(self.c.reg_read(U.REG_SQ_HEAD), n - 1)  # CQ full: not fetched
        self.assertEqual(self.c.reg_read(U.REG_CQ_TAIL), n - 1)
        for _ in range(n):
            self.d.poll()
        self.assertEqual(self.c.reg_read(U.REG_CMDS_DONE), n)

    def test_bad_opcode(self) -> None:
        self.assertEqual(self.d.cmd(0x55).status, E.BAD_OPCODE)
        self.assertEqual(self.d.cmd(0x0A).status, E.BAD_OPCODE)
        self.assertEqual(self.c.reg_read(U.REG_ERRORS), 2)

    def test_enable_with_bad_queue_config_is_fatal(self) -> None:
        self.c.reg_write(U.REG_CTRL, 2)  # reset
        self.c.reg_write(U.REG_SQ_ENTRIES, 3)  # not a power of two
        self.c.reg_write(U.REG_CTRL, 1)
        self.assertEqual(self.c.reg_read(U.REG_STATUS), E.STATUS_FATAL)
        self.c.reg_write(U.REG_CTRL, 2)
        self.assertEqual(self.c.reg_read(U.REG_STATUS), 0)
        for base, entries in ((0x10008, 64), (0x7FFF_0000, 64), (0x10000, 8192)):
            with self.subTest(base=base, entries=entries):
                self.c.reg_write(U.REG_SQ_BASE, base, 8)
                self.c.reg_write(U.REG_SQ_ENTRIES, entries)
                self.c.reg_write(U.REG_CQ_BASE, 0x20000, 8)
                self.c.reg_write(U.REG_CQ_ENTRIES, 64)
                self.c.reg_write(U.REG_EQ_BASE, 0, 8)
                self.c.reg_write(U.REG_CTRL, 1)
                self.assertEqual(self.c.reg_read(U.REG_STATUS), E.STATUS_FATAL)
                self.c.reg_write(U.REG_CTRL, 2)

    def test_queue_registers_ignored_while_enabled(self) -> None:
        self.c.reg_write(U.REG_SQ_ENTRIES, 8)
        self.assertEqual(self.c.reg_read(U.REG_SQ_ENTRIES), self.d.entries)

    def test_bad_doorbell_is_fatal(self) -> None:
        self.c.reg_write(U.REG_SQ_TAIL, self.d.entries)
        self.assertEqual(self.c.reg_read(U.REG_STATUS), E.STATUS_FATAL)

    def test_sq_in_unmapped_memory_is_fatal(self) -> None:
        self.c.dma_unmap(0, self.ram.size)
        self.d.submit(E.OP_NOP)
        deadline = time.monotonic() + 5
        while self.c.reg_read(U.REG_STATUS) != E.STATUS_FATAL and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.c.reg_read(U.REG_STATUS), E.STATUS_FATAL)

    def test_ctrl_reset(self) -> None:
        self.region(1, 4)
        self.c.reg_write(U.REG_SCRATCH, 7)
        self.c.reg_write(U.REG_CTRL, 2)
        self.assertEqual(self.c.reg_read(U.REG_STATUS), 0)  # visible at once
        self.assertEqual(self.c.reg_read(U.REG_CTRL), 0)
        self.assertEqual(self.c.reg_read(U.REG_CMDS_DONE), 0)
        self.assertEqual(self.c.reg_read(U.REG_SCRATCH), 0)
        self.assertEqual(self.rig.device.engine.regions, {})
        self.d.sq_tail = self.d.cq_head = self.d.eq_head = 0
        self.d.cq_phase = self.d.eq_phase = 1
        self.d.enable()
        self.assertEqual(self.d.cmd(E.OP_DMA_WRITE, 1, 0, 8, 1).status, E.NO_REGION)

    def test_device_reset_message(self) -> None:
        self.region(1, 4)
        self.c.reset()
        self.assertEqual(self.c.reg_read(U.REG_STATUS), 0)
        self.assertEqual(self.rig.device.engine.regions, {})

    # --- regions ----------------------------------------------------------------------
    def test_create_region_errors(self) -> None:
        d = self.d
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 0, 1, W).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 65536, 1, W).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 1, 0, W).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 1, 262145, W).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 1, 1, 2).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 1, 262144, W).status, E.OK)
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 1, 1, W).status, E.EXISTS)
        for rid in (2, 3, 4):
            self.assertEqual(d.cmd(E.OP_CREATE_REGION, rid, 262144, W).status, E.OK)
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 5, 1, W).status, E.NO_SPACE)

    def test_region_commands_need_a_region(self) -> None:
        for op in (E.OP_MAP_PAGES, E.OP_INVALIDATE, E.OP_DESTROY_REGION, E.OP_DMA_WRITE,
                   E.OP_DMA_READ, E.OP_STREAM_START, E.OP_STREAM_STOP):
            with self.subTest(op=op):
                self.assertEqual(self.d.cmd(op, 9, 0, 1, 1).status, E.NO_REGION)

    def test_map_pages_errors(self) -> None:
        d, lst = self.d, self.d.scratch
        d.cmd(E.OP_CREATE_REGION, 1, 8, W)
        d.write_page_list(lst, [0x900000])
        self.assertEqual(d.cmd(E.OP_MAP_PAGES, 1, 0, 0, lst).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_MAP_PAGES, 1, 0, 513, lst).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_MAP_PAGES, 1, 8, 1, lst).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_MAP_PAGES, 1, 7, 2, lst).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_MAP_PAGES, 1, 0, 1, lst + 8).status, E.BAD_ARG)
        comp = d.cmd(E.OP_MAP_PAGES, 1, 0, 1, 0x7000_0000)  # list outside RAM
        self.assertEqual((comp.status, comp.result0), (E.DMA_ERROR, 0x7000_0000))
        d.write_page_list(lst, [0x900010])
        self.assertEqual(d.cmd(E.OP_MAP_PAGES, 1, 0, 1, lst).status, E.BAD_ARG)
        d.write_page_list(lst, [0x900000, 0x7000_0000])
        comp = d.cmd(E.OP_MAP_PAGES, 1, 0, 2, lst)
        self.assertEqual((comp.status, comp.result0), (E.DMA_ERROR, 0x7000_0000))
        self.assertEqual(self.rig.device.engine.regions[1].mapped, 0)  # all or nothing

    def test_map_pages_into_read_only_guest_memory(self) -> None:
        self.c.dma_map(0x4000_0000, 0x10000, 1, 0, self.ram.dup_fd())  # RO map
        d, lst = self.d, self.d.scratch
        d.cmd(E.OP_CREATE_REGION, 1, 1, W)
        d.cmd(E.OP_CREATE_REGION, 2, 1, 0)
        d.write_page_list(lst, [0x4000_0000])
        self.assertEqual(d.cmd(E.OP_MAP_PAGES, 1, 0, 1, lst).status, E.DMA_ERROR)
        self.assertEqual(d.cmd(E.OP_MAP_PAGES, 2, 0, 1, lst).status, E.OK)
        self.assertEqual(d.cmd(E.OP_DMA_READ, 2, 0, 4096).result1, 4096)

    def test_dma_write_pattern(self) -> None:
        pages = self.region(7, 20)
        comp = self.d.cmd(E.OP_DMA_WRITE, 7, 4096 + 64, 3 * 4096, 0x1234)
        self.assertEqual((comp.status, comp.result0), (E.OK, 3 * 4096))
        data = self.gather(pages)
        self.assertEqual(data[4096 + 64:4 * 4096 + 64], pattern(7, 0x1234, 4096 + 64, 3 * 4096))
        self.assertEqual(data[:4096 + 64], bytes(4096 + 64))
        self.assertEqual(data[4 * 4096 + 64:], bytes(len(data) - 4 * 4096 - 64))
        word = self.ram.u64(pages[2] + 8)
        self.assertEqual(word, 7 << 48 | 0x1234 << 32 | (2 * 4096 + 8) >> 3)

    def test_pattern_helper(self) -> None:
        got = array("Q", pattern(3, 9, 8 * 100, 8 * 5))
        self.assertEqual(list(got), [3 << 48 | 9 << 32 | (100 + i) for i in range(5)])
        hi = 0xFFFFFFFF << 3
        got = array("Q", pattern(1, 1, hi - 8, 24))  # the low half wraps
        self.assertEqual([w & 0xFFFFFFFF for w in got], [0xFFFFFFFE, 0xFFFFFFFF, 0])

    def test_dma_write_errors(self) -> None:
        self.region(1, 4)
        self.region(2, 1, 0)
        d = self.d
        for args in ((3, 8, 1), (0, 12, 1), (0, 0, 1), (0, 8, 0), (0, 8, 65536),
                     (4 * 4096 - 8, 16, 1), (4 * 4096, 8, 1)):
            with self.subTest(args=args):
                self.assertEqual(d.cmd(E.OP_DMA_WRITE, 1, *args).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_DMA_WRITE, 2, 0, 8, 1).status, E.BAD_ARG)  # read-only

    def test_dma_write_page_fault(self) -> None:
        d = self.d
        d.cmd(E.OP_CREATE_REGION, 1, 4, W)
        pages = self.rig.pages(4)
        self.rig.map_pages(1, 0, pages[:2])
        self.rig.map_pages(1, 3, pages[3:])
        d.events()
        comp = d.cmd(E.OP_DMA_WRITE, 1, 0, 4 * 4096, 5)
        self.assertEqual((comp.status, comp.result0, comp.result1), (E.PAGE_FAULT, 2, 8192))
        self.assertEqual(self.ram.read(pages[1], 4096), pattern(1, 5, 4096, 4096))
        self.assertEqual(self.ram.read(pages[2], 4096), bytes(4096))
        self.assertEqual(self.ram.read(pages[3], 4096), bytes(4096))  # stops at the fault
        evs = d.events()
        self.assertEqual([(e.type, e.region, e.info0) for e in evs], [(E.EV_PAGE_FAULT, 1, 2)])
        self.assertGreaterEqual(d.irq_count(1), 1)

    def test_dma_error_when_guest_memory_goes_away(self) -> None:
        pages = self.region(1, 2)
        self.c.dma_map(0x4000_0000, 0x2000, 3, 0x900000, self.ram.dup_fd())  # alias
        self.d.write_page_list(self.d.scratch, [0x4000_0000])
        self.d.cmd(E.OP_MAP_PAGES, 1, 1, 1, self.d.scratch)
        self.c.dma_unmap(0x4000_0000, 0x2000)
        comp = self.d.cmd(E.OP_DMA_WRITE, 1, 0, 8192, 1)
        self.assertEqual((comp.status, comp.result0), (E.DMA_ERROR, 0x4000_0000))
        self.assertEqual(self.ram.read(pages[0], 8), pattern(1, 1, 0, 8))
        comp = self.d.cmd(E.OP_DMA_READ, 1, 4096, 8)
        self.assertEqual((comp.status, comp.result0), (E.DMA_ERROR, 0x4000_0000))

    def test_dma_read_crc(self) -> None:
        pages = self.region(4, 3)
        for i, p in enumerate(pages):
            self.ram.write(p, bytes([i + 1]) * 4096)
        comp = self.d.cmd(E.OP_DMA_READ, 4, 100, 8000)
        expect = zlib.crc32(self.gather(pages)[100:8100])
        self.assertEqual((comp.status, comp.result0, comp.result1), (E.OK, expect, 8000))
        self.assertEqual(self.d.cmd(E.OP_DMA_READ, 4, 0, 0).status, E.BAD_ARG)
        self.assertEqual(self.d.cmd(E.OP_DMA_READ, 4, 3 * 4096 - 1, 2).status, E.BAD_ARG)
        self.d.cmd(E.OP_INVALIDATE, 4, 1, 1)
        comp = self.d.cmd(E.OP_DMA_READ, 4, 0, 3 * 4096)
        self.assertEqual((comp.status, comp.result0), (E.PAGE_FAULT, 1))

    def test_invalidate(self) -> None:
        pages = self.region(1, 8)
        d = self.d
        comp = d.cmd(E.OP_INVALIDATE, 1, 2, 4)
        self.assertEqual((comp.status, comp.result0), (E.OK, 4))
        self.assertEqual(d.cmd(E.OP_INVALIDATE, 1, 0, 8).result0, 4)  # 4 were left
        self.assertEqual(d.cmd(E.OP_INVALIDATE, 1, 0, 8).result0, 0)
        for args in ((0, 0), (8, 1), (7, 2)):
            self.assertEqual(d.cmd(E.OP_INVALIDATE, 1, *args).status, E.BAD_ARG)
        self.rig.map_pages(1, 0, pages)  # remap: usable again
        self.assertEqual(d.cmd(E.OP_DMA_WRITE, 1, 0, 8 * 4096, 2).status, E.OK)

    def test_destroy_region(self) -> None:
        pages = self.region(1, 2)
        self.assertEqual(self.d.cmd(E.OP_DESTROY_REGION, 1).status, E.OK)
        self.assertEqual(self.d.cmd(E.OP_DMA_WRITE, 1, 0, 8, 1).status, E.NO_REGION)
        self.assertEqual(self.ram.read(pages[0], 8), bytes(8))
        self.assertEqual(self.d.cmd(E.OP_CREATE_REGION, 1, 2, W).status, E.OK)  # id reusable

    def test_fence(self) -> None:
        self.region(1, 2)
        self.assertEqual(self.d.cmd(E.OP_FENCE).status, E.OK)

    def test_large_region(self) -> None:
        # a 1 GiB region mapped, written and revoked whole (its cost: bench/device.py)
        npages = 262144
        self.assertEqual(self.d.cmd(E.OP_CREATE_REGION, 1, npages, W).status, E.OK)
        pages = self.rig.pages(256)  # alias 256 guest pages over the whole region
        for first in range(0, npages, 512):
            self.d.write_page_list(self.d.scratch, pages * 2)
            self.assertEqual(self.d.cmd(E.OP_MAP_PAGES, 1, first, 512,
                                        self.d.scratch).status, E.OK)
        comp = self.d.cmd(E.OP_DMA_WRITE, 1, 0, 64 << 20, 9, timeout=60)  # 16384 pages
        self.assertEqual((comp.status, comp.result0), (E.OK, 64 << 20))
        comp = self.d.cmd(E.OP_INVALIDATE, 1, 0, npages)
        self.assertEqual(comp.result0, npages)
        # the page table is one array, not per-page objects
        ptes = self.rig.device.engine.regions[1].ptes
        self.assertIsInstance(ptes, array)
        self.assertEqual(len(ptes), npages)


if __name__ == "__main__":
    unittest.main()
