"""Cells with options (readonly, fast): the registration check every such cell gets
(classify.Judge.registration: the register options and the module's gup_path) and the
read-only flow's classifier (orchestrator/readonly.py), each class on its evidence and
INCONCLUSIVE without it. Reports are built the way guest/pinlab_readonly.py and
guest/pinlab_cell.py write them; the audit extract the way the device writes it."""

from __future__ import annotations

import unittest
import zlib
from typing import Any

from pinlab.orchestrator.classify import audit_facts, classify_cell
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.expectations import Cell

PINS = {"nr_foll_pin_acquired": 16, "nr_foll_pin_released": 16}
PFNS = list(range(100, 116))
SINCE = 1000
PAGE = 4096
OLD = b"".join(bytes([0x40 + i % 26]) * PAGE for i in range(16))
NEW = b"".join(bytes([0xa0 + i % 26]) * PAGE for i in range(16))
ZEROED = OLD[:8 * PAGE] + bytes(8 * PAGE)      # what a truncate to half leaves


def crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def audit(rep: dict[str, Any], reads: int = 2, writes: int = 0, acks: int = 0,
          gen: int = 1) -> dict[str, Any]:
    """The device's audit: create, ``writes`` full writes of ``gen``, ``reads`` full reads,
    ``acks`` invalidate acks, destroy."""
    recs: list[dict[str, Any]] = []

    def add(kind: str, **kw: Any) -> None:
        recs.append({"seq": SINCE + 1 + len(recs), "kind": kind, "region": 1, "inst": 7,
                     **kw})

    add("create", npages=16)
    for _ in range(writes):
        for p in PFNS:
            add("access", gpa=p * PAGE, dir="w", gen=gen)
    for i in range(reads):
        for p in PFNS:
            add("access", gpa=p * PAGE, dir="r")
        if i == 0:
            for _ in range(acks):
                add("invalidate")
                add("invalidate_ack")
    add("destroy")
    return audit_facts(rep, recs, [], SINCE, 100_000)


def ro_report(mode: str = "pin", fast: bool = False, path: str | None = None,
              after: bytes = OLD, device_after: bytes = OLD, file_after: bytes | None = None,
              **kw: Any) -> dict[str, Any]:
    """A read-only flow report (guest/pinlab_readonly.py): the process sees ``after``, the
    device read ``device_after`` after the event."""
    rep: dict[str, Any] = {
        "errno": 0, "npages": 16, "region": 1, "mode": mode,
        "steps": [{"step": "dma_read_before", "errno": 0},
                  {"step": "dma_read_after", "errno": 0}],
        "vmstat_before": PINS, "vmstat_end": PINS, "pfns_before": PFNS,
        "pfns_registered": PFNS, "register_options": {"readonly": True, "fast": fast},
        "query_registered": {"gup_path_name": path or (
            "none" if mode == "odp" else "fast" if fast else "slow")},
        "readonly_flow": True, "crc_old": crc(OLD), "crc_map_before": crc(OLD),
        "device_crc_before": crc(OLD), "crc_expected_after": crc(after),
        "crc_map_after": crc(after), "device_crc_after": crc(device_after)}
    if file_after is not None:
        rep["crc_file_after"] = crc(file_after)
    rep.update(kw)
    return rep


def judge(cell: Cell, rep: dict[str, Any], a: dict[str, Any] | None = None) -> str:
    return classify_cell(cell, rep, classify(""), audit(rep) if a is None else a)[0]


class RegistrationCheckTest(unittest.TestCase):
    """Every cell with options: the module must have taken the path the cell asked for."""

    def writable(self, path: Any = "fast", opts: Any = None, **kw: Any) -> dict[str, Any]:
        rep: dict[str, Any] = {
            "errno": 0, "npages": 16, "region": 1, "mode": "pin",
            "steps": [{"step": "dma_write_g1", "errno": 0}], "vmstat_before": PINS,
            "vmstat_end": PINS, "pfns_before": PFNS, "pfns_registered": PFNS,
            "register_options": {"readonly": False, "fast": True} if opts is None else opts,
            "query_registered": {"gup_path_name": path} if path is not None else {},
            "map_g1": [["g1", 0, 16]]}
        rep.update(kw)
        return rep

    def test_fast_cell_needs_the_fast_path(self) -> None:
        cell = Cell("6.12", "pin", "anon", "dma-write", "fast")
        rep = self.writable()
        self.assertEqual(judge(cell, rep, audit(rep, reads=0, writes=1)), "COHERENT")
        for path in ("slow", "none", None, 3):
            rep = self.writable(path)
            self.assertRegex(judge(cell, rep, audit(rep, reads=0, writes=1)),
                             r"^INCONCLUSIVE\(the module pinned through", path)
        rep = self.writable(query_registered=None)
        self.assertRegex(judge(cell, rep, audit(rep, reads=0, writes=1)), "^INCONCLUSIVE")

    def test_register_options_must_match_the_cell(self) -> None:
        cell = Cell("6.12", "pin", "anon", "dma-write", "fast")
        for opts in ({"readonly": False, "fast": False}, {"readonly": True, "fast": True},
                     {"fast": True}, None):
            rep = self.writable(opts=opts) if opts is not None else self.writable(
                register_options=None)
            self.assertRegex(judge(cell, rep, audit(rep, reads=0, writes=1)),
                             r"^INCONCLUSIVE\(register options", str(opts))

    def test_refusal_needs_no_query(self) -> None:
        cell = Cell("6.12", "longterm", "ext4", "dma-write", "fast")
        rep = {"errno": 14, "errno_name": "EFAULT", "step": "register", "mode": "longterm",
               "register_options": {"readonly": False, "fast": True}}
        self.assertEqual(judge(cell, rep, {}), "PIN_REFUSED(EFAULT)")

    def test_slow_cells_without_options_are_not_checked(self) -> None:
        cell = Cell("6.12", "pin", "anon", "dma-write")
        rep = self.writable(path=None, opts={})
        self.assertEqual(judge(cell, rep, audit(rep, reads=0, writes=1)), "COHERENT")

    def test_read_only_by_nature_event_with_fast(self) -> None:
        # cpu-write is read-only by nature (Event.readonly): +fast must show readonly True
        cell = Cell("6.12", "pin", "anon", "cpu-write", "fast")
        rep = ro_report(fast=True, after=NEW, device_after=NEW, crc_new=crc(NEW),
                        steps=[{"step": "dma_read_before", "errno": 0},
                               {"step": "cpu_write", "errno": 0},
                               {"step": "dma_read_after", "errno": 0}])
        self.assertEqual(judge(cell, rep), "COHERENT")
        rep["register_options"] = {"readonly": False, "fast": True}
        self.assertRegex(judge(cell, rep), r"^INCONCLUSIVE\(register options")


class ReadOnlyFlowTest(unittest.TestCase):
    def test_baseline_coherent(self) -> None:
        self.assertEqual(judge(Cell("6.12", "pin", "anon", "dma-write", "readonly"),
                               ro_report()), "COHERENT")
        self.assertEqual(judge(Cell("6.12", "longterm", "ext4", "dma-write", "readonly"),
                               ro_report("longterm", file_after=OLD)), "COHERENT")

    def test_truncate_stale_and_revoked(self) -> None:
        cell = Cell("6.12", "pin", "ext4", "truncate", "readonly")
        rep = ro_report(after=ZEROED, device_after=OLD, file_after=ZEROED)
        self.assertEqual(judge(cell, rep), "DEVICE_READS_STALE")
        odp = Cell("6.12", "odp", "ext4", "truncate", "readonly")
        rep = ro_report("odp", after=ZEROED, device_after=ZEROED, file_after=ZEROED)
        self.assertEqual(judge(odp, rep, audit(rep, acks=1)), "REVOKED_IN_TIME")
        self.assertEqual(judge(odp, rep, audit(rep, acks=0)), "COHERENT")

    def test_missing_evidence_is_inconclusive(self) -> None:
        cell = Cell("6.12", "pin", "ext4", "truncate", "readonly")
        good = {"after": ZEROED, "device_after": OLD, "file_after": ZEROED}
        cases: dict[str, dict[str, Any]] = {
            "readonly_flow": {"readonly_flow": None},
            "crc_old": {"crc_old": None},
            "crc_map_after": {"crc_map_after": "x"},
            "crc_expected_after": {"crc_expected_after": None},
            "device_crc_after": {"device_crc_after": None},
            "crc_file_after": {"crc_file_after": None},
            "device read wrong before": {"device_crc_before": crc(NEW)},
            "mapping not what the event leaves": {"crc_map_after": crc(OLD)},
            "file differs from the mapping": {"crc_file_after": crc(OLD)},
            "device read something else": {"device_crc_after": crc(NEW)},
            "no steps": {"steps": []},
            "step without errno": {"steps": [{"step": "dma_read_before", "errno": 0},
                                             {"step": "dma_read_after"}]},
        }
        for what, kw in cases.items():
            rep = ro_report(**good, **kw)
            self.assertRegex(judge(cell, rep), r"^INCONCLUSIVE", what)
        rep = ro_report(**good)
        self.assertRegex(judge(cell, rep, audit(rep, reads=0)),
                         r"^INCONCLUSIVE\(audit shows 0 pages read")
        self.assertRegex(judge(cell, rep, {"unavailable": "x"}), r"^INCONCLUSIVE")

    def test_fork_stale_needs_the_child(self) -> None:
        cell = Cell("6.12", "gup", "anon", "fork", "readonly")
        rep = ro_report("gup", after=NEW, device_after=OLD, child={"crc_child_after": 1},
                        child_status=0)
        self.assertEqual(judge(cell, rep), "DEVICE_READS_STALE")
        rep["child_status"] = 256
        self.assertRegex(judge(cell, rep), r"^INCONCLUSIVE\(child exited")
        # the parent's mapping without its write: the event did not happen as recorded
        rep = ro_report("gup", after=NEW, device_after=OLD, crc_map_after=crc(OLD),
                        child={"crc_child_after": 1}, child_status=0)
        self.assertRegex(judge(cell, rep), r"^INCONCLUSIVE\(after the event the mapping")

    def test_dma_read_failures(self) -> None:
        cell = Cell("6.12", "odp", "ext4", "punch-hole", "readonly")
        rep = ro_report("odp", after=ZEROED, file_after=ZEROED, steps=[
            {"step": "dma_read_before", "errno": 0},
            {"step": "dma_read_after", "errno": 14, "errno_name": "EFAULT"}],
            device_crc_after=None)
        self.assertEqual(judge(cell, rep, audit(rep, acks=1)), "REVOKED_IN_TIME")
        self.assertEqual(judge(cell, rep, audit(rep, acks=0)), "DMA_FAILED(EFAULT)")
        rep["steps"][0] = {"step": "dma_read_before", "errno": 5, "errno_name": "EIO"}
        self.assertEqual(judge(cell, rep, audit(rep, acks=1)), "DMA_FAILED(EIO)")

    def test_pageout_of_anon_needs_swap_reached(self) -> None:
        cell = Cell("6.12", "pin", "anon", "pageout", "readonly")
        rep = ro_report(control_pages=4, control_pagemap_after_event=["swap", 1, 2, 3],
                        pagemap_after_event=PFNS, vmstat_event={"pswpout": 1},
                        control_intact=4)
        self.assertEqual(judge(cell, rep), "COHERENT")
        rep["control_pagemap_after_event"] = [0, 1, 2, 3]
        self.assertRegex(judge(cell, rep), r"^INCONCLUSIVE\(reclaim did not reach")

    def test_readonly_needs_the_read_only_registration(self) -> None:
        cell = Cell("6.12", "pin", "anon", "dma-write", "readonly")
        rep = ro_report(register_options={"readonly": False, "fast": False})
        self.assertRegex(judge(cell, rep), r"^INCONCLUSIVE\(register options")
        rep = ro_report(path="fast")
        self.assertRegex(judge(cell, rep), r"^INCONCLUSIVE\(the module pinned through the "
                                           r"fast path")


if __name__ == "__main__":
    unittest.main()
