"""The vectorised DMA write path (numpy pattern straight into guest memory, audit runs)
against a page-by-page reference model: data, results and audit records must match."""

from __future__ import annotations

import json
import random
import unittest

from pinlab.device import engine as E
from pinlab.device.audit import AuditLog
from pinlab.device.memory import DmaError, GuestMemory
from pinlab.device.regions import pattern
from pinlab.device.testclient import GuestRam, Rig

PAGE = 4096


def reference(ptes: list[int], ram_size: int, rid: int, gen: int, off: int, length: int
              ) -> tuple[tuple[int, int] | None, list[tuple[int, int, int]]]:
    """What the engine must do, page by page: (result, [(page, gpa, len) written])."""
    out = []
    pos = 0
    while pos < length:
        o = off + pos
        page, po = o // PAGE, o % PAGE
        n = min(PAGE - po, length - pos)
        if not ptes[page]:
            return (E.PAGE_FAULT, page), out
        gpa = (ptes[page] & ~(PAGE - 1)) + po
        if gpa + n > ram_size:
            return (E.DMA_ERROR, max(gpa, ram_size)), out
        out.append((page, gpa, n))
        pos += n
    return None, out


class WritePatternTest(unittest.TestCase):
    RAM = 48 << 20

    def setUp(self) -> None:
        self.rig = Rig(ram_size=self.RAM, audit=True)
        self.addCleanup(self.rig.close)
        self.eng = self.rig.device.engine
        self.audit = self.rig.device.audit

    def region(self, rid: int, npages: int) -> E.Region:
        self.assertEqual(self.rig.driver.cmd(E.OP_CREATE_REGION, rid, npages, 1).status, E.OK)
        return self.eng.regions[rid]

    def check(self, region: E.Region, layout: list[int], off: int, length: int,
              gen: int, atomic: bool = False) -> None:
        ram = self.rig.ram
        for i, gpa in enumerate(layout):
            region.ptes[i] = gpa
        want, pages = reference(layout, self.RAM, region.rid, gen, off, length)
        holes = [p for p in range(off // PAGE, (off + length - 1) // PAGE + 1) if not layout[p]]
        if atomic and holes:  # streams: a hole anywhere in the chunk, nothing is written
            want, pages = (E.PAGE_FAULT, holes[0]), []
        for _, gpa, n in pages:
            ram.write(gpa, b"\xee" * n)
        since = self.audit.stats()["last_seq"]
        with region.lock:
            got = self.eng.dma.write_pattern(region, off, length, gen, atomic)
        self.assertEqual(got, want)
        for page, gpa, n in pages:
            o = page * PAGE + gpa % PAGE
            self.assertEqual(ram.read(gpa, n), pattern(region.rid, gen, o, n), (page, gpa))
        recs = self.audit.query(since=since, limit=100000)
        self.assertEqual([(r["page"], r["gpa"], r["len"]) for r in recs], pages)
        self.assertTrue(all(r["kind"] == "access" and r["dir"] == "w" and r["gen"] == gen
                            and r["region"] == region.rid for r in recs))
        self.assertEqual([r["seq"] for r in recs], list(range(since + 1, since + 1 + len(recs))))

    def test_random_layouts(self) -> None:
        rng = random.Random(1234)
        region = self.region(3, 600)
        pool = list(range(0x800000, self.RAM - 0x100000, PAGE))
        for trial in range(300):
            npg = 600
            kind = trial % 4
            start = rng.choice(pool[:len(pool) - npg])
            if kind == 0:  # one contiguous run
                layout = [start + i * PAGE | 1 for i in range(npg)]
            elif kind == 1:  # scattered
                layout = [p | 1 for p in rng.sample(pool, npg)]
            else:  # runs of random lengths, some holes, some pages outside RAM
                layout, p = [], start
                while len(layout) < npg:
                    if rng.random() < 0.2:
                        p = rng.choice(pool)
                    layout.append(p | 1)
                    p += PAGE
                used: set[int] = set()
                for i, v in enumerate(layout):  # no page twice: later writes would hide
                    while v in used:  # earlier ones
                        v = rng.choice(pool) | 1
                    used.add(v)
                    layout[i] = v
                for _ in range(rng.randrange(3)):
                    layout[rng.randrange(npg)] = 0
                if kind == 3:
                    layout[rng.randrange(npg)] = self.RAM + 0x10000 | 1
            length = rng.choice((8, 4096, 65536, 1 << 20, rng.randrange(1, 40000) * 8))
            off = rng.randrange(0, npg * PAGE - length + 1) & ~7
            with self.subTest(trial=trial, off=off, length=length):
                self.check(region, layout, off, length, trial & 0xFFFF or 1,
                           atomic=trial % 3 == 0)

    def test_edges(self) -> None:
        region = self.region(4, 300)
        base = 0x900000
        contiguous = [base + i * PAGE | 1 for i in range(300)]
        self.check(region, contiguous, 0, 8, 1)
        self.check(region, contiguous, PAGE - 8, 16, 2)
        self.check(region, contiguous, 0, 300 * PAGE, 3)
        hole = list(contiguous)
        hole[0] = 0
        self.check(region, hole, 0, 2 * PAGE, 4)  # fault at the first page: nothing
        hole = list(contiguous)
        hole[100] = 0
        self.check(region, hole, 50 * PAGE + 8, 200 * PAGE, 5)
        self.check(region, hole, 50 * PAGE + 8, 200 * PAGE, 6, atomic=True)
        bad = list(contiguous)
        bad[70] = self.RAM | 1  # outside guest RAM
        self.check(region, bad, 0, 100 * PAGE, 7)
        self.check(region, bad, 70 * PAGE + 16, 8, 8)
        desc = [base + (299 - i) * PAGE | 1 for i in range(300)]  # descending pages
        self.check(region, desc, 8, 299 * PAGE, 9)

    def test_file_lines_match_json(self) -> None:
        region = self.region(5, 64)
        layout = [0xA00000 + i * PAGE | 1 for i in range(32)] + \
                 [0xC00000 + i * 2 * PAGE | 1 for i in range(32)]
        self.check(region, layout, 1000 * 8, 60 * PAGE, 77)
        self.audit.flush()
        with open(self.rig.server.audit_path) as f:
            lines = f.read().splitlines()
        recs = self.audit.query(since=0, limit=100000)
        self.assertEqual(len(lines), len(recs))
        for line, rec in zip(lines, recs, strict=True):
            self.assertEqual(line, json.dumps(rec, separators=(",", ":")))


class WriteRampTest(unittest.TestCase):
    def test_spans_mappings_and_refuses_holes(self) -> None:
        ram = GuestRam(1 << 20)
        self.addCleanup(ram.close)
        mem = GuestMemory()
        self.addCleanup(mem.unmap_all)
        mem.map(0x0, 0x40000, 3, 0, ram.dup_fd())
        mem.map(0x40000, 0x40000, 3, 0x40000, ram.dup_fd())  # adjacent
        mem.map(0x90000, 0x10000, 1, 0x90000, ram.dup_fd())  # read-only
        mem.write_ramp(0x3F000, 0x400, 7)  # across the two maps
        self.assertEqual(ram.read(0x3F000, 0x2000),
                         b"".join((7 + i).to_bytes(8, "little") for i in range(0x400)))
        for addr in (0x7F000, 0x90000, 0xA0000):  # runs into a hole / read-only / unmapped
            with self.subTest(addr=hex(addr)):
                before = ram.read(addr, 0x2000)
                with self.assertRaises(DmaError):
                    mem.write_ramp(addr, 0x400, 1)
                self.assertEqual(ram.read(addr, 0x2000), before)  # all or nothing

    def test_unmap_closes_the_mapping(self) -> None:
        ram = GuestRam(1 << 20)
        self.addCleanup(ram.close)
        mem = GuestMemory()
        m = mem.map(0x0, 1 << 20, 3, 0, ram.dup_fd())
        mem.write_ramp(0x1000, 16, 1)
        self.assertIsNotNone(m.words)
        mem.unmap(0, 1 << 20)
        self.assertIsNone(m.mm)  # closed, no export left behind
        self.assertIsNone(m.words)
        with self.assertRaises(DmaError):
            mem.write_ramp(0x1000, 16, 1)


class AuditRunTest(unittest.TestCase):
    def test_run_with_revoked_page_records_one_by_one(self) -> None:
        seen = []
        log = AuditLog(on_violation=seen.append)
        t = log.region_created(1, 8)
        log.pages_mapped(t, 0, 8)
        log.invalidate_ack(t, 3, 1, 1)
        bases = [0x10000 + i * PAGE | 1 for i in range(8)]
        log.access_run(t, 1, bases[1:6], 8, 5 * PAGE - 16, True, 9)
        recs = log.query(since=3)
        self.assertEqual([(r["kind"], r.get("page")) for r in recs],
                         [("access", 1), ("access", 2), ("access", 3), ("violation", 3),
                          ("access", 4), ("access", 5)])
        self.assertEqual([r["len"] for r in recs if r["kind"] == "access"],
                         [PAGE - 8, PAGE, PAGE, PAGE, PAGE - 8])
        self.assertEqual(recs[0]["gpa"], 0x11008)
        self.assertEqual(len(seen), 1)
        self.assertEqual(log.stats()["writes"], 5)
        self.assertEqual(log.stats()["bytes_written"], 5 * PAGE - 16)

    def test_ring_bound_with_runs_and_limits(self) -> None:
        log = AuditLog(ring=100)
        t = log.region_created(1, 64)
        log.pages_mapped(t, 0, 64)
        for i in range(10):
            log.access_run(t, 0, [PAGE * j | 1 for j in range(64)], 0, 64 * PAGE, True, i)
        st = log.stats()
        self.assertEqual(st["last_seq"], 2 + 640)
        first = st["first_seq_in_memory"]
        self.assertLessEqual(st["last_seq"] - first + 1, 164)
        self.assertGreaterEqual(st["last_seq"] - first + 1, 100)
        got = log.query(since=first + 10, limit=7)
        self.assertEqual([r["seq"] for r in got], list(range(first + 11, first + 18)))
        self.assertEqual([r["page"] for r in log.query(since=st["last_seq"] - 2)], [62, 63])
        self.assertEqual(log.query(since=0, kind="map"), [])  # left the ring, no file


if __name__ == "__main__":
    unittest.main()
