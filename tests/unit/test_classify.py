"""Cell classification: each class on its positive evidence, INCONCLUSIVE without it, the
audit facts from audit records, and expectation coverage of the matrix.

The inputs here are built record by record the way the device and the guest workload
write them (an audit extract with seqs, page scans, steps); the corpus test
(test_classify_corpus.py) does the same on reports recorded from a real run."""

from __future__ import annotations

import re
import unittest
from typing import Any

from pinlab.images.kernel import KERNELS
from pinlab.orchestrator import events
from pinlab.orchestrator.cells import all_cells
from pinlab.orchestrator.classify import EVIDENCE, all_gen, audit_facts, base_class, states
from pinlab.orchestrator.classify import classify_cell as classify_cell_
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.expectations import Cell, expect, load

PINS = {"nr_foll_pin_acquired": 16, "nr_foll_pin_released": 16}
PFNS = list(range(100, 116))
SINCE = 1000


class Audit:
    """An audit extract as the device writes it: consecutive seqs from the mark."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, kind: str, **kw: Any) -> Audit:
        self.records.append({"seq": SINCE + 1 + len(self.records), "kind": kind, **kw})
        return self

    def write(self, gen: int, pages: list[int] = PFNS, rid: int = 1, inst: int = 7) -> Audit:
        for p in pages:
            self.add("access", region=rid, inst=inst, gpa=p * 4096, dir="w", gen=gen)
        return self

    def facts(self, rep: dict[str, Any]) -> dict[str, Any]:
        return audit_facts(rep, self.records, [], SINCE, 100_000)


def report(**kw: Any) -> dict[str, Any]:
    rep: dict[str, Any] = {"errno": 0, "npages": 16, "region": 1, "mode": "pin",
                           "steps": [{"step": "dma_write_g1", "errno": 0},
                                     {"step": "dma_write_g2", "errno": 0}],
                           "vmstat_before": PINS, "vmstat_end": PINS,
                           "pfns_before": PFNS, "pfns_registered": PFNS}
    rep.update(kw)
    return rep


def written(acks: int = 0, gen2: bool = True, rid: int = 1) -> Audit:
    """create, map, gen 1 everywhere, ``acks`` invalidate acks, gen 2 everywhere."""
    a = Audit().add("create", region=rid, inst=7, npages=16).add("map", region=rid, inst=7)
    a.write(1, rid=rid)
    for _ in range(acks):
        a.add("invalidate", region=rid, inst=7).add("invalidate_ack", region=rid, inst=7)
    if gen2:
        a.write(2, rid=rid)
    return a.add("destroy", region=rid, inst=7)


def classify_cell(cell: Cell, rep: dict[str, Any], text: str = "",
                  audit: Audit | dict[str, Any] | None = None) -> str:
    rep.setdefault("mode", cell.mode)
    facts = (audit or written()).facts(rep) if not isinstance(audit, dict) else audit
    return classify_cell_(cell, rep, classify(text), facts)[0]


G2 = [["g2", 0, 16]]


class ClassifyTest(unittest.TestCase):
    def test_states_expand_rle(self) -> None:
        scan = [["g2", 0, 8], ["zero", 8, 8]]
        self.assertEqual(states(scan), ["g2"] * 8 + ["zero"] * 8)
        self.assertTrue(all_gen(scan, 2, 0, 8))
        self.assertFalse(all_gen(scan, 2))

    def test_register_refusal(self) -> None:
        obs = classify_cell(Cell("6.12", "longterm", "ext4", "truncate"),
                            report(errno=14, errno_name="EFAULT", step="register"))
        self.assertEqual(obs, "PIN_REFUSED(EFAULT)")
        obs = classify_cell(Cell("6.12", "longterm", "ext4", "truncate"),
                            report(errno=0, step="register"))
        self.assertTrue(obs.startswith("INCONCLUSIVE"), obs)

    def test_coherent_needs_the_audit_and_every_view(self) -> None:
        cell = Cell("6.12", "pin", "memfd", "pageout")
        self.assertEqual(classify_cell(cell, report(map_g2=G2, file_after=G2)), "COHERENT")
        for broken in (report(map_g2=G2), report(file_after=G2), report(map_g2=[], file_after=G2)):
            self.assertTrue(classify_cell(cell, broken).startswith("INCONCLUSIVE"))
        # the DMA step succeeded but the device never wrote gen 2: contradictory
        obs = classify_cell(cell, report(map_g2=G2, file_after=G2), audit=written(gen2=False))
        self.assertRegex(obs, r"INCONCLUSIVE\(audit shows gen2 in 0 pages")
        obs = classify_cell(cell, report(map_g2=G2, file_after=G2), audit={"unavailable": "x"})
        self.assertRegex(obs, r"INCONCLUSIVE\(audit unavailable")

    def test_anon_reclaim_needs_a_swapped_control_page(self) -> None:
        def swap_rep(ctl: Any = ("swap", "swap", 7, 8), pswpout: Any = 2,
                     intact: Any = 4, **kw: Any) -> dict[str, Any]:
            rep = report(map_g2=G2, pagemap_after_event=PFNS, control_pages=4,
                         control_pagemap_after_event=list(ctl) if ctl is not None else None,
                         vmstat_event={"pswpout": pswpout} if pswpout is not None else {},
                         control_intact=intact)
            rep.update(kw)
            return rep
        for backing in ("anon", "private-file"):
            for event in ("pageout", "memcg-reclaim"):
                cell = Cell("6.12", "pin", backing, event)
                self.assertEqual(classify_cell(cell, swap_rep()), "COHERENT")
                # reclaim never reached the mapping: nothing proven
                self.assertRegex(classify_cell(cell, swap_rep(ctl=(1, 2, 3, 4))),
                                 r"INCONCLUSIVE\(reclaim did not reach the mapping")
                self.assertRegex(classify_cell(cell, swap_rep(ctl=None)),
                                 r"INCONCLUSIVE\(control pagemap missing")
                self.assertRegex(classify_cell(cell, swap_rep(ctl=("swap",))),
                                 r"INCONCLUSIVE\(control pagemap missing")
                self.assertRegex(classify_cell(cell, swap_rep(pswpout=None)),
                                 r"INCONCLUSIVE\(pswpout")
                self.assertRegex(classify_cell(cell, swap_rep(pswpout=1)),
                                 r"INCONCLUSIVE\(pswpout 1 below")
                self.assertRegex(classify_cell(cell, swap_rep(intact=3)),
                                 r"INCONCLUSIVE\(control pages intact")
                self.assertRegex(classify_cell(cell, swap_rep(control_pages=None)),
                                 r"INCONCLUSIVE\(control_pages missing")
                self.assertRegex(classify_cell(cell, swap_rep(pagemap_after_event=None)),
                                 r"INCONCLUSIVE\(pagemap after the event missing")
        # odp: revoked in time only with the control evidence too
        cell = Cell("6.12", "odp", "anon", "pageout")
        self.assertEqual(classify_cell(cell, swap_rep(), audit=written(acks=1)),
                         "REVOKED_IN_TIME")
        self.assertRegex(classify_cell(cell, swap_rep(ctl=(1, 2, 3, 4)),
                                       audit=written(acks=1)), "INCONCLUSIVE")
        # other backings' reclaim cells are judged as before (no control pages)
        cell = Cell("6.12", "pin", "memfd", "pageout")
        self.assertEqual(classify_cell(cell, report(map_g2=G2, file_after=G2)), "COHERENT")

    def test_btrfs_rejected_dirty_folio(self) -> None:
        line = ("[ 90.4] BTRFS error (device vdc): root 5 ino 257 folio 0 is marked dirty "
                "without notifying the fs")
        steps = [{"step": "dma_write_g1", "errno": 0}, {"step": "dma_write_g2", "errno": 0},
                 {"step": "fsync_final", "errno": 117, "errno_name": "EUCLEAN"}]
        cell = Cell("6.12", "gup", "btrfs", "2018")
        g1 = [["g1", 0, 16]]
        self.assertEqual(classify_cell(cell, report(steps=steps, file_after=g1), line),
                         "DIRTY_FOLIO_REJECTED")
        # the log lines are rate-limited: the fsync error alone is btrfs's verdict too
        self.assertEqual(classify_cell(cell, report(steps=steps, file_after=g1)),
                         "DIRTY_FOLIO_REJECTED")
        # rejected but no error reached the process: contradictory
        quiet = [dict(st, errno=0, errno_name=None) for st in steps]
        self.assertRegex(classify_cell(cell, report(steps=quiet, file_after=g1), line),
                         r"INCONCLUSIVE\(btrfs rejected folios")
        # neither lines nor error: the event decides (here the data is lost, silently)
        self.assertEqual(classify_cell(cell, report(steps=quiet, file_after=g1)),
                         "WRITES_LOST_SILENTLY")
        # the device never wrote gen 2: no class that needs it
        self.assertRegex(classify_cell(cell, report(steps=steps, file_after=g1), line,
                                       audit=written(gen2=False)), "INCONCLUSIVE")
        csum = "[ 91.0] BTRFS warning (device vdc): csum failed root 5 ino 257 off 0"
        self.assertEqual(classify_cell(cell, report(steps=quiet, file_after=g1), csum),
                         "CSUM_FAILED")
        # an ext4 cell is not judged by btrfs's lines
        self.assertNotEqual(classify_cell(Cell("6.12", "gup", "ext4", "writeback"),
                                          report(steps=steps), line), "DIRTY_FOLIO_REJECTED")

    def test_truncated_audit_is_inconclusive(self) -> None:
        cell = Cell("6.12", "pin", "anon", "pageout")
        rep = report(map_g2=G2)
        a = written()
        del a.records[5]              # a gap in the seqs: the ring lost records
        self.assertRegex(classify_cell(cell, rep, audit=a), r"INCONCLUSIVE\(audit extract")
        facts = written().facts(rep)
        self.assertTrue(facts["complete"])
        limited = audit_facts(rep, written().records, [], SINCE, 10)
        self.assertFalse(limited["complete"])

    def test_truncate_lost_vs_revoked(self) -> None:
        rep = report(kept_pages=8, map_kept_g2=[["g2", 0, 8]],
                     map_after_extend=[["g2", 0, 8], ["zero", 8, 8]])
        self.assertEqual(classify_cell(Cell("6.12", "pin", "memfd", "truncate"), rep),
                         "WRITES_LOST_SILENTLY")
        odp = report(kept_pages=8, map_kept_g2=[["g2", 0, 8]],
                     steps=[{"step": "dma_write_g1", "errno": 0},
                            {"step": "dma_write_g2", "errno": 14, "errno_name": "EFAULT"}])
        a = written(acks=1, gen2=False)
        a.records.pop()                                  # destroy after the gen 2 pages
        a.write(2, PFNS[:8]).add("destroy", region=1, inst=7)
        cell = Cell("6.12", "odp", "memfd", "truncate")
        self.assertEqual(classify_cell(cell, odp, audit=a), "REVOKED_IN_TIME")
        # the only acknowledgement came before the gen 1 write: not the event's
        early = Audit().add("create", region=1, inst=7, npages=16)
        early.add("invalidate_ack", region=1, inst=7).write(1).write(2, PFNS[:8])
        self.assertEqual(classify_cell(cell, odp, audit=early), "DMA_FAILED(EFAULT)")

    def test_lost_writes_need_the_device_write(self) -> None:
        cell = Cell("6.12", "gup", "anon", "munmap")
        rep = report(steps=[{"step": "dma_write_g1", "errno": 0}, {"step": "munmap", "errno": 0},
                            {"step": "dma_write_g2", "errno": 0}])
        self.assertEqual(classify_cell(cell, rep), "WRITES_LOST_SILENTLY")
        self.assertRegex(classify_cell(cell, rep, audit=written(gen2=False)), "INCONCLUSIVE")
        rep["steps"] = rep["steps"][:2]
        self.assertRegex(classify_cell(cell, rep), r"INCONCLUSIVE\(step dma_write_g2 missing")

    def test_2018_warn_and_lost(self) -> None:
        text = ("WARNING: CPU: 1 PID: 5 at fs/ext4/inode.c:3587 ext4_dirty_folio+0x2c\n"
                "EXT4-fs warning (device vdc): page 0 does not have buffers attached\n")
        rep = report(file_after=[["g1", 0, 16]])
        self.assertEqual(classify_cell(Cell("6.12", "gup", "ext4", "2018"), rep, text),
                         "EXT4_WARN_DATA_LOST")
        # the same WARN from another file is a kernel error, not the ext4 excuse
        other = "WARNING: CPU: 1 PID: 5 at mm/gup.c:1234 try_grab_folio+0x2c\n"
        self.assertEqual(classify_cell(Cell("6.12", "gup", "ext4", "2018"), rep, text + other),
                         "KERNEL_ERROR")
        self.assertEqual(classify_cell(Cell("6.12", "gup", "xfs", "2018"), rep, text),
                         "KERNEL_ERROR")

    def test_odirect_write(self) -> None:
        view = [["g2", 0, 4], ["zero", 4, 4], ["g2", 8, 8]]
        steps = [{"step": "dma_write_g1", "errno": 0}, {"step": "odirect_write", "errno": 0},
                 {"step": "dma_write_g2", "errno": 0}]
        lost = report(map_g2=view, file_after=view, steps=steps)
        self.assertEqual(classify_cell(Cell("6.12", "pin", "ext4", "odirect-write"), lost),
                         "WRITES_LOST_SILENTLY")
        ok = report(map_g2=G2, file_after=G2, steps=steps, mode="odp")
        cell = Cell("6.12", "odp", "ext4", "odirect-write")
        self.assertEqual(classify_cell(cell, ok, audit=written(acks=4)), "REVOKED_IN_TIME")
        self.assertEqual(classify_cell(cell, ok, audit=written(acks=0)), "COHERENT")

    def test_victim_exit_and_oom(self) -> None:
        reg = {"nr_foll_pin_acquired": 32, "nr_foll_pin_released": 16}

        def victim(mode: str, event: str, destroy: bool, gone: dict[str, int],
                   ack: bool = False, **extra: Any) -> str:
            rep = report(victim={"region": 2, "pfns": [1, 2]}, victim_status=9,
                         victim_signal=9, vmstat_before_victim=PINS, map_g2=G2,
                         vmstat_victim_registered=reg, vmstat_victim_gone=gone, **extra)
            rep["mode"] = mode
            a = written()
            a.add("create", region=2, inst=8, npages=2).write(1, [1, 2], rid=2, inst=8)
            if ack:
                a.add("invalidate_ack", region=2, inst=8)
            if destroy:
                a.add("destroy", region=2, inst=8)
            facts = a.facts(rep)
            facts["victim"] = audit_facts({"mode": mode, "pfns_before": [1, 2]}, a.records,
                                          [], SINCE, 100_000, region=2)
            return classify_cell(Cell("6.12", mode, "anon", event), rep, audit=facts)

        self.assertEqual(victim("pin", "exit", True, PINS), "RELEASED_AT_EXIT")
        self.assertEqual(victim("pin", "exit", True, reg), "PINS_LEAKED")
        self.assertEqual(victim("gup", "exit", False, PINS), "REGION_NOT_RELEASED")
        self.assertEqual(victim("odp", "exit", True, PINS, ack=True), "REVOKED_IN_TIME")
        self.assertRegex(victim("odp", "exit", True, PINS), "INCONCLUSIVE")
        self.assertRegex(victim("odp", "oom", True, PINS, ack=True, oom_events={"oom_kill": 0}),
                         r"INCONCLUSIVE\(the memcg OOM killer")
        self.assertEqual(victim("pin", "oom", True, PINS, oom_events={"oom_kill": 1}),
                         "RELEASED_AT_EXIT")

    def test_mem_offline(self) -> None:
        blocked = report(blocks={"32": "Movable"}, map_g2=G2,
                         offline=[{"block": 32, "result": "timeout", "state": "online"}])
        text = ("[ 13.5] migrating pfn 1000fb failed ret:16\n"
                "[ 13.6] page dumped because: migration failure\n")
        self.assertEqual(classify_cell(Cell("6.12", "pin", "anon", "mem-offline"), blocked, text),
                         "OFFLINE_BLOCKED")
        done = dict(blocked, offline=[{"block": 32, "result": "ok", "state": "offline"}])
        self.assertEqual(classify_cell(Cell("6.12", "longterm", "anon", "mem-offline"),
                                       dict(done)), "OFFLINE_SUCCEEDS")
        self.assertEqual(classify_cell(Cell("6.12", "odp", "anon", "mem-offline"), dict(done),
                                       audit=written(acks=16)), "REVOKED_IN_TIME")
        self.assertRegex(classify_cell(Cell("6.12", "pin", "anon", "mem-offline"),
                                       dict(blocked, offline=[])), "INCONCLUSIVE")

    def test_violation_and_pin_leak_win(self) -> None:
        a = written()
        a.add("violation", region=1, inst=7, why="access after invalidate ack")
        self.assertEqual(classify_cell(Cell("6.12", "odp", "anon", "dma-write"),
                                       report(map_g1=[["g1", 0, 16]]), audit=a),
                         "DMA_AFTER_REVOKE")
        rep = report(map_g1=[["g1", 0, 16]])
        rep["vmstat_end"] = {"nr_foll_pin_acquired": 32, "nr_foll_pin_released": 16}
        self.assertEqual(classify_cell(Cell("6.12", "pin", "anon", "dma-write"), rep),
                         "PINS_LEAKED")
        del rep["vmstat_end"]
        self.assertRegex(classify_cell(Cell("6.12", "pin", "anon", "dma-write"), rep),
                         r"INCONCLUSIVE\(vmstat pin counters")

    def test_fork_parent_loses_and_child_report(self) -> None:
        rep = report(map_parent_g2=[["g1", 0, 16]], child_status=0,
                     child={"mapped": True, "map": G2})
        self.assertEqual(classify_cell(Cell("6.12", "gup", "anon", "fork"), rep),
                         "PARENT_LOSES_WRITES")
        for child, status in (({}, 0), ({"mapped": True, "map": G2}, 256)):
            rep.update(child=child, child_status=status)
            self.assertRegex(classify_cell(Cell("6.12", "gup", "anon", "fork"), rep),
                             "INCONCLUSIVE")

    def test_seal_needs_the_recorded_seals(self) -> None:
        steps = [{"step": "dma_write_g1", "errno": 0}, {"step": "seal_write", "errno": 0}]
        cell = Cell("6.12", "odp", "memfd", "seal-write")
        self.assertEqual(classify_cell(cell, report(steps=steps, seals=8)), "SEAL_APPLIED")
        self.assertRegex(classify_cell(cell, report(steps=steps, seals=0)), "INCONCLUSIVE")
        self.assertRegex(classify_cell(cell, report(steps=steps[:1], seals=8)), "INCONCLUSIVE")


class EvidenceDocTest(unittest.TestCase):
    def test_every_class_states_its_evidence_in_the_expectations_header(self) -> None:
        from importlib import resources
        header = resources.files("pinlab.orchestrator").joinpath(
            "data", "expectations.toml").read_text().split("\n[[rule]]")[0]
        documented = set(re.findall(r"^#   ([A-Z0-9_]+)(?:\(|\s)", header, re.M))
        for cls in EVIDENCE:
            self.assertIn(cls, documented, f"{cls} is not described in the header")
        for rule in load():
            self.assertIn(base_class(rule["expected"]), EVIDENCE, rule["expected"])

    def test_no_rule_may_expect_inconclusive(self) -> None:
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as d:
            p = Path(d, "t.toml")
            p.write_text('[[rule]]\nexpected = "INCONCLUSIVE(x)"\nsource = "s"\n')
            with self.assertRaisesRegex(ValueError, "never an expected outcome"):
                load(p)


class CoverageTest(unittest.TestCase):
    def test_every_cell_has_a_rule_and_a_scenario(self) -> None:
        rules = load()
        for k in KERNELS:
            for c in all_cells(k):
                self.assertIsNotNone(events.event(c.event), c.name)
                e = expect(c, rules)
                self.assertIsNotNone(e, c.name)
                assert e is not None
                self.assertTrue(e.source, c.name)


class DmesgWarnFormatTest(unittest.TestCase):
    def test_warn_formats_of_every_kernel(self) -> None:
        for line in ("WARNING: CPU: 1 PID: 1530 at fs/ext4/inode.c:3587 ext4_dirty_folio+0x2c",
                     "WARNING: fs/ext4/inode.c:3937 at ext4_dirty_folio+0x2c/0x40 [ext4], "
                     "CPU#1: python3/2471"):
            self.assertIn("WARN", classify(f"[  1.0] {line}").classes(), line)


if __name__ == "__main__":
    unittest.main()
