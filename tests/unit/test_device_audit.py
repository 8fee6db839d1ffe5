"""Audit log: records, violations (the oracle), bounded memory, JSONL spill."""

from __future__ import annotations

import json
import os
import tempfile
import time
import unittest

from pinlab.device import engine as E
from pinlab.device.audit import AuditLog
from pinlab.device.testclient import Rig


class AuditLogUnitTest(unittest.TestCase):
    def test_violation_rules(self) -> None:
        seen = []
        log = AuditLog(on_violation=seen.append)
        t = log.region_created(5, 4)
        log.pages_mapped(t, 0, 4)
        log.access(t, 1, 0x1000, 4096, True, 1)
        log.invalidate_request(t, 1, 2)
        log.access(t, 1, 0x1000, 8, True, 1)  # before the ack: allowed
        log.invalidate_ack(t, 1, 2, 2)
        log.access(t, 0, 0x0, 8, False)  # other page: fine
        log.access(t, 2, 0x2000, 8, False)  # revoked: violation
        log.pages_mapped(t, 2, 1)
        log.access(t, 2, 0x2000, 8, True, 2)  # re-mapped: fine
        log.region_destroyed(t)
        log.access(t, 0, 0x0, 8, True, 3)  # destroyed: violation
        v = log.violations()
        self.assertEqual([(r["page"], r["why"]) for r in v],
                         [(2, "access after invalidate ack"), (0, "access to a destroyed region")])
        self.assertEqual(len(seen), 2)
        st = log.stats()
        self.assertEqual((st["violations"], st["writes"], st["reads"]), (2, 4, 2))
        kinds = [r["kind"] for r in log.query()]
        self.assertEqual(kinds[:4], ["create", "map", "access", "invalidate"])
        acc = log.query(kind="access")[0]
        self.assertEqual({k: acc[k] for k in ("region", "page", "gpa", "len", "dir", "gen")},
                         {"region": 5, "page": 1, "gpa": 0x1000, "len": 4096, "dir": "w",
                          "gen": 1})
        self.assertIsInstance(acc["t"], int)

    def test_query_filters_and_ring_bound(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "a.jsonl")
            log = AuditLog(path, ring=100)
            a, b = log.region_created(1, 1), log.region_created(2, 1)
            for i in range(300):
                log.access(a if i % 2 else b, 0, 0, 8, True, i)
            self.assertEqual(len(log.query(since=202, limit=10000)), 100)
            self.assertEqual(log.query(since=202, limit=5)[0]["seq"], 203)
            # older records come back from the JSONL file
            self.assertEqual([r["seq"] for r in log.query(since=0, limit=3)], [1, 2, 3])
            self.assertEqual(len(log.query(since=150, limit=10000)), 152)
            self.assertEqual(len(log.query(since=0, region=2, limit=10000)), 151)
            self.assertTrue(all(r["region"] == 1 for r in log.query(region=1)))
            self.assertEqual([r["seq"] for r in log.query(since=300)], [301, 302])
            self.assertEqual(log.stats()["first_seq_in_memory"], 203)
            log.close()
            with open(path) as f:
                lines = [json.loads(x) for x in f]
            self.assertEqual(len(lines), 302)
            self.assertEqual(lines[0]["kind"], "create")
            again = AuditLog(path, ring=10)  # a restarted device appends; queries ignore
            t = again.region_created(9, 1)  # the earlier run's records
            for _ in range(20):
                again.access(t, 0, 0, 8, False)
            self.assertEqual([r["region"] for r in again.query(since=0, limit=2)], [9, 9])
            self.assertEqual(len(again.query(since=0, limit=1000)), 21)
            again.close()

    def test_file_queries_seek_by_index(self) -> None:
        from pinlab.device import audit as A

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "a.jsonl")
            with open(path, "w") as f:
                f.write('{"kind":"reset","seq":1,"t":0}\n')  # an earlier run
            log = AuditLog(path, ring=50)
            t = log.region_created(3, 4)
            n = 5 * A.INDEX_EVERY + 7
            for i in range(n):
                log.access(t, i % 4, 0x1000, 8, i % 3 == 0, i & 0xFFFF)
            log.flush()  # the file (and its index) is written in batches
            self.assertGreaterEqual(len(log._index_seq), 5)
            for since in (0, 1, A.INDEX_EVERY - 1, A.INDEX_EVERY, 2 * A.INDEX_EVERY + 5,
                          n - 60):
                with self.subTest(since=since):
                    got = log.query(since=since, limit=20)
                    self.assertEqual([r["seq"] for r in got],
                                     list(range(since + 1, since + 21)))
            self.assertEqual(log.query(since=10, limit=1, kind="access")[0]["gen"], 9)
            log.close()


    def test_compiled_run_lines_equal_python(self) -> None:
        """The audit file's lines of access runs, formatted by the compiled formatter
        (auditfmt.py), equal json.dumps of the records, byte for byte, with the sparse
        index and the file bound's cut (inside a run) the same as the Python path's."""
        import random
        from array import array
        from unittest import mock

        from pinlab.device import audit as A
        from pinlab.device import fastpath

        fastpath.warm_up()
        deadline = time.monotonic() + 120
        while not fastpath.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertTrue(fastpath.ready())
        rnd = random.Random(16)

        def fill(path: str, file_max: int) -> AuditLog:
            log = AuditLog(path, ring=64, file_max=file_max)
            t = log.region_created(rnd.randrange(1, 65536), 4096)
            log.pages_mapped(t, 0, 4096)
            for i in range(300):
                n = rnd.randrange(1, 40)
                page0 = rnd.randrange(0, 4096 - n)
                bases = array("Q", [rnd.randrange(1 << 40) << 12 | 1 for _ in range(n)])
                po = rnd.randrange(0, 4096, 8) if i % 2 else 0
                total = n * 4096 - po - rnd.randrange(0, 4088, 8)
                log.access_run(t, page0, bases, po, total, bool(i % 3), i & 0xFFFF)
            log.close()
            return log

        for file_max in (1 << 30, 300_000):
            with self.subTest(file_max=file_max), tempfile.TemporaryDirectory() as tmp:
                state = rnd.getstate()
                compiled = fill(os.path.join(tmp, "c.jsonl"), file_max)
                rnd.setstate(state)
                with mock.patch.object(A, "fastpath_ready", return_value=False):
                    python = fill(os.path.join(tmp, "p.jsonl"), file_max)
                with open(os.path.join(tmp, "c.jsonl"), "rb") as f:
                    got = f.read()
                with open(os.path.join(tmp, "p.jsonl"), "rb") as f:
                    want = f.read()
                # the same records, apart from the time stamps
                strip = [json.loads(x) for x in want.splitlines()]
                self.assertGreater(len(strip), 2000 if file_max > 1e6 else 100)
                for r in strip:
                    r.pop("t", None)
                self.assertEqual([{k: v for k, v in json.loads(x).items() if k != "t"}
                                  for x in got.splitlines()], strip)
                self.assertEqual(got.count(b"\n"), want.count(b"\n"))
                self.assertEqual(compiled._index_seq, python._index_seq)
                for line in got.splitlines():  # json.dumps' own text, compact
                    self.assertEqual(line, json.dumps(json.loads(line),
                                                      separators=(",", ":")).encode())
                if file_max < 1e6:
                    self.assertEqual(strip[-1]["kind"], "truncated")


class AuditEngineTest(unittest.TestCase):
    def setUp(self) -> None:
        self.rig = Rig(audit=True)
        self.d = self.rig.driver

    def tearDown(self) -> None:
        self.rig.close()

    def test_engine_records_every_page(self) -> None:
        d, audit = self.d, self.rig.device.audit
        d.cmd(E.OP_CREATE_REGION, 3, 4, 1)
        pages = self.rig.pages(4)
        self.rig.map_pages(3, 0, pages)
        since = audit.stats()["last_seq"]
        d.cmd(E.OP_DMA_WRITE, 3, 2048, 8192, 6)
        recs = audit.query(since=since, kind="access")
        self.assertEqual([(r["page"], r["gpa"], r["len"], r["dir"], r["gen"]) for r in recs],
                         [(0, pages[0] + 2048, 2048, "w", 6), (1, pages[1], 4096, "w", 6),
                          (2, pages[2], 2048, "w", 6)])
        d.cmd(E.OP_DMA_READ, 3, 0, 10)
        self.assertEqual(audit.query(kind="access")[-1]["dir"], "r")
        d.cmd(E.OP_INVALIDATE, 3, 0, 2)
        d.cmd(E.OP_DESTROY_REGION, 3)
        kinds = [r["kind"] for r in audit.query(since=since)]
        self.assertEqual(kinds[-3:], ["invalidate", "invalidate_ack", "destroy"])
        ack = audit.query(kind="invalidate_ack")[-1]
        self.assertEqual((ack["first"], ack["count"], ack["mapped"]), (0, 2, 2))
        self.assertEqual(audit.stats()["violations"], 0)
        audit.flush()
        with open(self.rig.server.audit_path) as f:
            self.assertEqual(sum(1 for _ in f), audit.stats()["last_seq"])

    def test_write_after_revoke_fault_is_caught(self) -> None:
        d, dev = self.d, self.rig.device
        d.cmd(E.OP_CREATE_REGION, 1, 4, 1)
        pages = self.rig.pages(4)
        self.rig.map_pages(1, 0, pages)
        dev.faults.update({"write-after-revoke": True})
        comp = d.cmd(E.OP_INVALIDATE, 1, 1, 2)
        self.assertEqual(comp.status, E.OK)
        d.cmd(E.OP_FENCE)
        v = dev.audit.violations()
        self.assertEqual(len(v), 1)
        self.assertEqual((v[0]["region"], v[0]["page"], v[0]["gpa"]), (1, 1, pages[1]))
        ack = dev.audit.query(kind="invalidate_ack")[-1]
        self.assertLess(ack["seq"], v[0]["seq"])


if __name__ == "__main__":
    unittest.main()
