"""The ``cpu-write-after`` cell option, the ``ksm`` and ``mprotect`` events: which cells
exist, the guest's CPU pattern, and the classes on their positive evidence (a missing or
contradicting piece gives INCONCLUSIVE)."""

from __future__ import annotations

import struct
import unittest
from typing import Any

from pinlab.common.vocab import CPU_WRITE_OPTION, PRIVATE_BACKINGS, Key, split_options
from pinlab.guest import pinlab_cell
from pinlab.orchestrator import events
from pinlab.orchestrator.cells import all_cells
from pinlab.orchestrator.classify import classify_cell as classify_cell_
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.expectations import Cell
from tests.unit.test_classify import PFNS, Audit, classify_cell, report, written

MOVED = list(range(200, 216))          # the PFNs after a write fault copied every page
CPU = [["cpu", 0, 16]]
G1, G2 = [["g1", 0, 16]], [["g2", 0, 16]]
OPTIONED = ("pageout", "memcg-reclaim", "migrate", "fork", "fork-dontfork", "mem-offline",
            "ksm", "mprotect")


def cpu_report(event_steps: list[str], after: list[Any] = PFNS, **kw: Any) -> dict[str, Any]:
    """A workload report of a cpu-write-after cell: the event's steps (errno 0), the CPU
    write, the PFNs around it and the mapping after it."""
    steps = ([{"step": "dma_write_g1", "errno": 0}]
             + [{"step": s, "errno": 0} for s in event_steps]
             + [{"step": "cpu_write_after", "errno": 0}, {"step": "dma_write_g2", "errno": 0}])
    rep = report(steps=steps, pfns_before_cpu_write=PFNS, pfns_after_cpu_write=after,
                 map_cpu=CPU)
    # a writable registration through the slow path, or odp's none (classify.Judge.
    # registration: every cell with options must show it)
    rep[Key.REGISTER_OPTIONS] = {Key.READONLY: False, Key.FAST: False}
    rep[Key.QUERY_REGISTERED] = {"gup_path_name": "none" if kw.get("mode") == "odp" else "slow"}
    rep.update(kw)
    return rep


MPROTECT = ["mprotect_read", "mprotect_read_write"]


class CellsTest(unittest.TestCase):
    def test_option_is_canonical_and_last(self) -> None:
        self.assertEqual(split_options("fast+cpu-write-after"), ("fast", CPU_WRITE_OPTION))
        with self.assertRaises(ValueError):
            split_options("cpu-write-after+fast")
        c = Cell.parse("6.12/pin/anon/pageout+cpu-write-after")
        self.assertEqual((c.event, c.option_names), ("pageout", (CPU_WRITE_OPTION,)))

    def test_option_cells_only_where_a_write_fault_can_copy(self) -> None:
        cells = [c for c in all_cells("6.12") if CPU_WRITE_OPTION in c.option_names]
        self.assertEqual({c.event for c in cells}, set(OPTIONED))
        self.assertTrue(all(c.backing in PRIVATE_BACKINGS for c in cells))
        self.assertEqual(len(cells), 48)
        # the events' own backings that are MAP_SHARED keep their plain cells
        self.assertIn(Cell("6.12", "pin", "memfd", "pageout"), all_cells("6.12"))
        self.assertEqual(events.event("ksm").backings, ("anon",))
        plain = [c for c in all_cells("6.12") if c.event in ("ksm", "mprotect")
                 and not c.options]
        self.assertEqual(len(plain), 16)


class GuestPatternTest(unittest.TestCase):
    def test_cpu_pattern_is_its_own_page_state(self) -> None:
        pages = b"".join(struct.pack("<Q", pinlab_cell.cpu_word(i)) * 512 for i in range(3))
        self.assertEqual(pinlab_cell.scan(pages, 1, 3), [["cpu", 0, 3]])
        # page 1's word at page 0 is not the CPU write of page 0
        swapped = pages[4096:8192] + pages[4096:]
        self.assertEqual(pinlab_cell.scan(swapped, 1, 3)[0], ["other", 0, 1])
        self.assertNotEqual(pinlab_cell.cpu_word(0) >> 48, 1)


class ClassifyTest(unittest.TestCase):
    def test_coherent_needs_the_cpu_write(self) -> None:
        cell = Cell("6.12", "pin", "anon", "mprotect", CPU_WRITE_OPTION)
        self.assertEqual(classify_cell(cell, cpu_report(MPROTECT, map_g2=G2)), "COHERENT")
        for key, bad in (("map_cpu", None), ("map_cpu", [["cpu", 0, 15], ["g1", 15, 1]]),
                         ("pfns_before_cpu_write", None), ("pfns_after_cpu_write", None),
                         ("pfns_after_cpu_write", PFNS[:15] + ["swap"])):
            rep = cpu_report(MPROTECT, map_g2=G2)
            rep[key] = bad
            self.assertRegex(classify_cell(cell, rep), r"^INCONCLUSIVE", (key, bad))
        rep = cpu_report(MPROTECT, map_g2=G2)
        rep["steps"] = [s for s in rep["steps"] if s["step"] != "cpu_write_after"]
        self.assertRegex(classify_cell(cell, rep), r"INCONCLUSIVE\(step cpu_write_after")
        # without the option the same report needs none of it
        rep = report(steps=cpu_report(MPROTECT)["steps"], map_g2=G2)
        self.assertEqual(classify_cell(Cell("6.12", "pin", "anon", "mprotect"), rep),
                         "COHERENT")

    def test_coherent_with_gen2_outside_the_mapping_is_a_contradiction(self) -> None:
        cell = Cell("6.12", "pin", "anon", "mprotect", CPU_WRITE_OPTION)
        rep = cpu_report(MPROTECT, after=MOVED, map_g2=G2)
        self.assertRegex(classify_cell(cell, rep), r"INCONCLUSIVE\(COHERENT, but the audit")

    def test_fork_gup_loses_the_device_write_to_the_copied_page(self) -> None:
        cell = Cell("6.12", "gup", "anon", "fork", CPU_WRITE_OPTION)
        child = {"mapped": True, "map": G2}
        rep = cpu_report([], after=MOVED, map_parent_g2=CPU, child_status=0, child=child)
        self.assertEqual(classify_cell(cell, rep), "PARENT_LOSES_WRITES")
        # the audit must say where generation 2 went: into pages the parent still maps
        # contradicts the lost write
        rep = cpu_report([], after=PFNS, map_parent_g2=CPU, child_status=0, child=child)
        self.assertRegex(classify_cell(cell, rep), r"INCONCLUSIVE\(PARENT_LOSES_WRITES")
        # and the parent must see its own write where the device's is missing
        rep = cpu_report([], after=MOVED, map_parent_g2=[["zero", 0, 16]], child_status=0,
                         child=child)
        self.assertRegex(classify_cell(cell, rep), r"INCONCLUSIVE\(.*shows the CPU write")
        # the audit facts without gen2_pfns (an older device extract)
        facts = written().facts(cpu_report([], after=MOVED))
        del facts["gen2_pfns"]
        rep = cpu_report([], after=MOVED, map_parent_g2=CPU, child_status=0, child=child)
        self.assertRegex(classify_cell(cell, rep, audit=facts),
                         r"INCONCLUSIVE\(audit PFNs of generation 2")

    def test_facts_tell_a_copy_from_a_swap_in(self) -> None:
        cell = Cell("6.12", "odp", "anon", "mprotect", CPU_WRITE_OPTION)
        rep = cpu_report(MPROTECT, after=MOVED, map_g2=G2, mode="odp",
                         pfns_before_cpu_write=["swap"] * 4 + PFNS[4:])
        a = Audit().add("create", region=1, inst=7).add("map", region=1, inst=7).write(1)
        a.add("invalidate", region=1, inst=7).add("invalidate_ack", region=1, inst=7)
        facts = a.write(2, MOVED).add("destroy", region=1, inst=7).facts(rep)
        cls, f = classify_cell_(cell, rep, classify(""), facts)
        self.assertEqual(cls, "REVOKED_IN_TIME")
        self.assertEqual((f["cpu_write"]["moved_by_cpu_write"],
                          f["cpu_write"]["faulted_in_by_cpu_write"]), (12, 4))

    def test_audit_records_where_gen2_went(self) -> None:
        facts = written().facts(report())
        self.assertEqual(facts["gen2_pfns"], PFNS)
        self.assertEqual(written(gen2=False).facts(report())["gen2_pfns"], [])


def ksm_report(mode: str = "pin", merged: int = 0, control: int = 4, scans: tuple = (3, 5),
               **kw: Any) -> dict[str, Any]:
    steps = ["madv_mergeable_registered", "madv_mergeable_twin", "madv_mergeable_control_a",
             "madv_mergeable_control_b", "ksm_run", "ksm_stop"]
    rep = report(mode=mode, steps=[{"step": "dma_write_g1", "errno": 0}]
                 + [{"step": s, "errno": 0} for s in steps]
                 + [{"step": "dma_write_g2", "errno": 0}],
                 map_g2=G2, map_twin_g2=G1, pfns_after_touch=PFNS,
                 ksm={"registered_merged": merged, "control_merged": control,
                      "control_pages": 4, "full_scans_at_control": scans[0],
                      "full_scans_end": scans[1]})
    rep.update(kw)
    return rep


class KsmTest(unittest.TestCase):
    def test_pinned_pages_unmerged_coherent(self) -> None:
        self.assertEqual(classify_cell(Cell("6.12", "pin", "anon", "ksm"), ksm_report()),
                         "COHERENT")

    def test_odp_merged_and_refaulted(self) -> None:
        rep = ksm_report("odp", merged=16)
        self.assertEqual(classify_cell(Cell("6.12", "odp", "anon", "ksm"), rep,
                                       audit=written(acks=1)), "REVOKED_IN_TIME")

    def test_ksmd_must_have_merged_the_control_and_scanned_twice(self) -> None:
        cell = Cell("6.12", "pin", "anon", "ksm")
        for rep in (ksm_report(control=3), ksm_report(scans=(3, 4)), ksm_report(ksm=None)):
            self.assertRegex(classify_cell(cell, rep), r"^INCONCLUSIVE")
        rep = ksm_report()
        rep["steps"][2]["errno"] = 22
        self.assertRegex(classify_cell(cell, rep), r"INCONCLUSIVE\(madv_mergeable_twin")

    def test_twin_must_keep_generation_1(self) -> None:
        rep = ksm_report(map_twin_g2=G2)
        self.assertRegex(classify_cell(Cell("6.12", "pin", "anon", "ksm"), rep),
                         r"INCONCLUSIVE\(the twin lost generation 1")

    def test_lost_writes_when_the_mapping_lacks_gen2(self) -> None:
        rep = ksm_report(map_g2=G1)
        self.assertEqual(classify_cell(Cell("6.12", "gup", "anon", "ksm"), rep),
                         "WRITES_LOST_SILENTLY")


class MprotectTest(unittest.TestCase):
    def test_steps_must_succeed(self) -> None:
        cell = Cell("6.12", "longterm", "memfd", "mprotect")
        rep = report(steps=[{"step": "dma_write_g1", "errno": 0},
                            {"step": "mprotect_read", "errno": 0},
                            {"step": "mprotect_read_write", "errno": 0},
                            {"step": "dma_write_g2", "errno": 0}],
                     map_g2=G2, file_after=G2)
        self.assertEqual(classify_cell(cell, rep), "COHERENT")
        rep["steps"][2]["errno"] = 12
        self.assertRegex(classify_cell(cell, rep), r"INCONCLUSIVE\(mprotect_read_write")
        rep["steps"][2]["errno"] = 0
        del rep["file_after"]
        self.assertRegex(classify_cell(cell, rep), r"INCONCLUSIVE\(file_after")


if __name__ == "__main__":
    unittest.main()
