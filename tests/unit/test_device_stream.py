"""Streams: background writes, invalidate fences while streaming, faults."""

from __future__ import annotations

import time
import unittest
from array import array

from pinlab.common import uapi as U
from pinlab.device import engine as E
from pinlab.device.testclient import Rig


def wait_for(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.005)


class StreamTest(unittest.TestCase):
    def setUp(self) -> None:
        self.rig = Rig(audit=True)
        self.d = self.rig.driver
        self.dev = self.rig.device

    def tearDown(self) -> None:
        self.rig.close()

    def make(self, rid: int, npages: int) -> list[int]:
        self.assertEqual(self.d.cmd(E.OP_CREATE_REGION, rid, npages, 1).status, E.OK)
        pages = self.rig.pages(npages)
        self.assertEqual(self.rig.map_pages(rid, 0, pages).status, E.OK)
        return pages

    def stream(self, rid: int) -> E.Stream:
        s = self.dev.engine.regions[rid].stream
        assert isinstance(s, E.Stream)
        return s

    def test_start_stop(self) -> None:
        pages = self.make(1, 16)
        comp = self.d.cmd(E.OP_STREAM_START, 1, 0, 16 * 4096, 1, 8192, 0)
        self.assertEqual(comp.status, E.OK)
        wait_for(lambda: self.stream(1).passes >= 2)
        comp = self.d.cmd(E.OP_STREAM_STOP, 1)
        self.assertEqual(comp.status, E.OK)
        self.assertGreaterEqual(comp.result0, 16)
        words = array("Q", self.rig.ram.read(pages[5], 4096))
        self.assertEqual(words[0] >> 48, 1)
        self.assertEqual(words[0] & 0xFFFFFFFF, 5 * 512)
        self.assertGreaterEqual(words[0] >> 32 & 0xFFFF, 1)
        self.assertEqual(self.d.cmd(E.OP_STREAM_STOP, 1).status, E.BAD_ARG)

    def test_start_errors(self) -> None:
        self.make(1, 4)
        d = self.d
        for args in ((4, 8, 1, 0, 0), (0, 12, 1, 0, 0), (0, 8, 1, 12, 0), (0, 8, 70000, 0, 0),
                     (0, 8, 1, (1 << 20) + 8, 0), (0, 5 * 4096, 1, 0, 0)):
            with self.subTest(args=args):
                self.assertEqual(d.cmd(E.OP_STREAM_START, 1, *args).status, E.BAD_ARG)
        self.assertEqual(d.cmd(E.OP_STREAM_START, 1, 0, 4096, 1, 0, 1000).status, E.OK)
        self.assertEqual(d.cmd(E.OP_STREAM_START, 1, 0, 4096, 1, 0, 1000).status, E.EXISTS)
        d.cmd(E.OP_CREATE_REGION, 2, 1, 0)
        self.assertEqual(d.cmd(E.OP_STREAM_START, 2, 0, 8, 1, 0, 0).status, E.BAD_ARG)

    def test_revoke_races_large_chunks(self) -> None:
        """Revokes that land inside 1 MiB chunks of the compiled stream loop, again and
        again: every chunk written is audited before the acknowledgement, none after."""
        pages = self.make(1, 1024)
        self.d.cmd(E.OP_STREAM_START, 1, 0, 1024 * 4096, 1, 1 << 20, 0)
        wait_for(lambda: self.stream(1).chunks > 4)
        for i in range(150):
            first = (i * 37) % 1008
            comp = self.d.cmd(E.OP_INVALIDATE, 1, first, 16)
            self.assertEqual((comp.status, comp.result0), (E.OK, 16))
            self.assertEqual(self.rig.map_pages(1, first, pages[first:first + 16]).status,
                             E.OK)
        self.assertEqual(self.d.cmd(E.OP_STREAM_STOP, 1).status, E.OK)
        self.assertGreater(self.dev.audit.stats()["writes"], 1024)
        self.assertEqual(self.dev.audit.stats()["violations"], 0)

    def test_invalidate_while_streaming_never_leaks(self) -> None:
        pages = self.make(1, 64)
        self.d.cmd(E.OP_STREAM_START, 1, 0, 64 * 4096, 1, 16384, 0)
        wait_for(lambda: self.stream(1).chunks > 20)
        for first in range(0, 64, 8):
            comp = self.d.cmd(E.OP_INVALIDATE, 1, first, 8)
            self.assertEqual(comp.status, E.OK)
            snap = [self.rig.ram.read(p, 4096) for p in pages[first:first + 8]]
            time.sleep(0.01)
            # after the ack the device must not touch those pages again
            self.assertEqual(snap, [self.rig.ram.read(p, 4096) for p in pages[first:first + 8]])
        self.assertEqual(self.dev.audit.stats()["violations"], 0)
        wait_for(lambda: self.stream(1).state == "paused")
        # every page was revoked: the stream stops at a page of the range and says which
        fault_page = self.stream(1).fault_page
        self.assertIn(fault_page, range(64))
        evs = self.d.events()
        self.assertIn((1, fault_page), [(e.region, e.info0) for e in evs
                                        if e.type == E.EV_PAGE_FAULT])
        # re-map: the stream resumes
        chunks = self.stream(1).chunks
        self.rig.map_pages(1, 0, pages)
        wait_for(lambda: self.stream(1).chunks > chunks + 10)
        self.assertEqual(self.d.cmd(E.OP_STREAM_STOP, 1).status, E.OK)
        self.assertEqual(self.dev.audit.stats()["violations"], 0)

    def test_destroy_stops_stream(self) -> None:
        self.make(1, 8)
        self.d.cmd(E.OP_STREAM_START, 1, 0, 8 * 4096, 1, 0, 0)
        wait_for(lambda: self.stream(1).chunks > 5)
        stream = self.stream(1)
        self.assertEqual(self.d.cmd(E.OP_DESTROY_REGION, 1).status, E.OK)
        self.assertEqual(stream.state, "stopped")
        n = self.dev.audit.stats()["writes"]
        time.sleep(0.05)
        self.assertEqual(self.dev.audit.stats()["writes"], n)
        evs = self.d.events()
        self.assertIn((E.EV_STREAM_STOPPED, 1, E.ABORTED), [(e.type, e.region, e.info0)
                                                            for e in evs])
        self.assertEqual(self.dev.audit.stats()["violations"], 0)

    def test_reset_stops_streams(self) -> None:
        self.make(1, 8)
        self.d.cmd(E.OP_STREAM_START, 1, 0, 8 * 4096, 1, 0, 0)
        wait_for(lambda: self.stream(1).chunks > 5)
        stream = self.stream(1)
        self.rig.client.reg_write(U.REG_CTRL, 2)
        self.assertEqual(self.rig.client.reg_read(U.REG_STATUS), 0)
        self.assertEqual(stream.state, "stopped")

    def test_vfio_user_stays_responsive_while_streaming(self) -> None:
        # register accesses are served while a stream runs (how fast: bench/device.py)
        self.make(1, 256)
        self.d.cmd(E.OP_STREAM_START, 1, 0, 256 * 4096, 1, 1 << 20, 0)
        chunks = self.stream(1).chunks
        for i in range(50):
            self.rig.client.reg_write(U.REG_SCRATCH, i)
            self.assertEqual(self.rig.client.reg_read(U.REG_SCRATCH), i)
        wait_for(lambda: self.stream(1).chunks > chunks)   # and the stream went on too
        self.assertEqual(self.d.cmd(E.OP_STREAM_STOP, 1).status, E.OK)

    def test_client_disconnect_while_streaming(self) -> None:
        self.make(1, 16)
        self.d.cmd(E.OP_STREAM_START, 1, 0, 16 * 4096, 1, 0, 0)
        wait_for(lambda: self.stream(1).chunks > 5)
        stream = self.stream(1)
        self.rig.client.close()  # guest RAM goes away under the stream
        wait_for(lambda: stream.state == "stopped")
        self.assertEqual(stream.reason, E.DMA_ERROR)
        with self.rig.server.client() as c2:
            c2.version()
            self.assertIn(1, self.dev.engine.regions)  # device state is kept
            self.assertEqual(c2.reg_read(U.REG_ID), U.ID_MAGIC)
        self.assertEqual(self.dev.audit.stats()["violations"], 0)

    def test_delay_revoke_fault(self) -> None:
        self.make(1, 4)
        self.dev.faults.update({"delay-revoke-ms": 200})
        self.assertEqual(self.d.cmd(E.OP_INVALIDATE, 1, 0, 4).status, E.OK)
        # the device's own clock: the acknowledgement came at least the delay after the
        # request (a causal check of the fault, not a speed measurement)
        req = self.dev.audit.query(kind="invalidate")[-1]
        ack = self.dev.audit.query(kind="invalidate_ack")[-1]
        self.assertGreaterEqual(ack["t"] - req["t"], 200_000_000)

    def test_never_ack_revoke_then_clear(self) -> None:
        self.make(1, 4)
        self.dev.faults.update({"never-ack-revoke": True})
        self.d.submit(E.OP_INVALIDATE, 1, 0, 4)
        with self.assertRaises(TimeoutError):
            self.d.poll(0.3)
        self.dev.faults.clear()
        self.assertEqual(self.d.poll().status, E.OK)

    def test_never_ack_revoke_then_reset(self) -> None:
        self.make(1, 4)
        self.dev.faults.update({"never-ack-revoke": True})
        self.d.submit(E.OP_INVALIDATE, 1, 0, 4)
        time.sleep(0.1)
        self.rig.client.reg_write(U.REG_CTRL, 2)
        self.assertEqual(self.rig.client.reg_read(U.REG_STATUS), 0)

    def test_drop_and_delay_irq(self) -> None:
        self.dev.faults.update({"drop-irq": True})
        self.d.cmd(E.OP_NOP)
        self.assertEqual(self.d.irq_count(0), 0)
        self.dev.faults.update({"drop-irq": False, "delay-irq-ms": 2000})
        self.d.cmd(E.OP_NOP)
        self.assertEqual(self.d.irq_count(0), 0)   # not yet: it comes 2 s later
        wait_for(lambda: self.d.irq_count(0) == 1)


class InvalidateOvertakesTest(unittest.TestCase):
    """INVALIDATE is executed when fetched, not behind a long command (issue 3)."""

    def setUp(self) -> None:
        self.rig = Rig(ram_size=160 << 20, audit=True)
        self.d = self.rig.driver
        self.dev = self.rig.device

    def tearDown(self) -> None:
        self.rig.close()

    def test_invalidate_during_large_dma_write(self) -> None:
        npages = 8192
        d = self.d
        eng = self.dev.engine
        write_pattern = eng.dma.write_pattern

        def slow_write_pattern(*args, **kw):  # ~1 s for the whole write: slow memory
            time.sleep(0.002)
            return write_pattern(*args, **kw)

        eng.dma.write_pattern = slow_write_pattern
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 1, npages, 1).status, E.OK)
        self.assertEqual(self.rig.map_pages(1, 0, self.rig.pages(npages)).status, E.OK)
        audit = self.dev.audit
        base = audit.stats()["bytes_written"]
        wcid = d.submit(E.OP_DMA_WRITE, 1, 0, npages * 4096, 7)
        wait_for(lambda: audit.stats()["bytes_written"] - base >= 1 << 20)
        first = npages - 32
        icid = d.submit(E.OP_INVALIDATE, 1, first, 16)
        comp = d.poll(10)
        # the fence completes first, out of submission order, while the write still runs
        self.assertEqual((comp.cid, comp.status, comp.result0), (icid, E.OK, 16))
        self.assertLess(audit.stats()["bytes_written"] - base, first * 4096)
        comp = d.poll(60)
        self.assertEqual(comp.cid, wcid)
        self.assertEqual((comp.status, comp.result0, comp.result1),
                         (E.PAGE_FAULT, first, first * 4096))
        self.assertEqual(audit.stats()["violations"], 0)
        faults = [e for e in d.events() if e.type == E.EV_PAGE_FAULT]
        self.assertEqual([(e.region, e.info0) for e in faults], [(1, first)])

    def test_invalidate_keeps_order_behind_map_of_same_region(self) -> None:
        d = self.d
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 1, 8192, 1).status, E.OK)
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 2, 4, 1).status, E.OK)
        self.assertEqual(self.rig.map_pages(1, 0, self.rig.pages(8192)).status, E.OK)
        pages = self.rig.pages(4)
        d.write_page_list(d.scratch, pages)
        cids = [d.submit(E.OP_DMA_WRITE, 1, 0, 8192 * 4096, 1),
                d.submit(E.OP_MAP_PAGES, 2, 0, 4, d.scratch),
                d.submit(E.OP_INVALIDATE, 2, 0, 4)]
        comps = [d.poll(60) for _ in cids]
        self.assertEqual([c.cid for c in comps], cids)
        self.assertEqual([c.status for c in comps], [E.OK, E.OK, E.OK])
        self.assertEqual(comps[2].result0, 4)  # the map happened before the invalidate
        self.assertEqual(self.dev.audit.stats()["violations"], 0)


if __name__ == "__main__":
    unittest.main()
