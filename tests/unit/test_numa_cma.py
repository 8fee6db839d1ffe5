"""numa-hint and movable-pin-race on the host: each class on its positive evidence,
INCONCLUSIVE without it (no hinting fault, pages not on the remote node, no page in a
Movable block), PINNED_IN_MOVABLE only with a pinned PFN; and the two-node guest's QEMU
options (node 0 keeps the one-node guest's RAM and CPUs)."""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
import unittest
from pathlib import Path
from typing import Any
from unittest import mock

from pinlab.orchestrator import guestenv
from pinlab.orchestrator.expectations import Cell
from pinlab.orchestrator.vm import Guest, GuestConfig

sys.path.insert(0, str(Path(__file__).parent))   # the report builders of test_classify
from test_classify import G2, PFNS, classify_cell, report, written  # noqa: E402


def numa_report(mode: str = "pin", **numa: Any) -> dict[str, Any]:
    """A numa-hint report as guest/events/ev_numa_hint.py writes it: 16 registered and
    16 control pages on node 1, hinting faults taken, the control moved, gen 2 seen."""
    facts: dict[str, Any] = {
        "nodes_before": [1] * 16, "control_nodes_before": [1] * 16,
        "nodes_after": [1] * 16, "control_nodes_after": [0] * 16,
        "nodes_after_write": [1] * 16, "polls": 12, "ms": 900.0,
        "vmstat_event": {"numa_pte_updates": 48, "numa_hint_faults": 40,
                         "numa_pages_migrated": 16, "pgmigrate_fail": 16}}
    facts.update(numa)
    rep = report(mode=mode, numa=facts, map_g2=G2, pfns_after_event=PFNS)
    rep["steps"].insert(1, {"step": "cpu_write", "errno": 0})
    return rep


def race_report(rounds: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    """A movable-pin-race report: 50 rounds faulted in Movable and 50 in CMA, both pins
    0, nothing left in Movable or CMA, the Movable block offlined."""
    one = {"faulted_in_movable": 16, "faulted_in_cma": 0, "errnos": [0, 0],
           "pinned_in_movable": [], "pinned_in_cma": [], "blocks": [40], "phase": "movable"}
    cma = {**one, "faulted_in_movable": 0, "faulted_in_cma": 16, "phase": "cma"}
    race = {"rounds": rounds if rounds is not None else
            [dict(one) for _ in range(50)] + [dict(cma) for _ in range(50)],
            "movable_blocks": [40, 41, 42, 43], "block_bytes": 128 << 20,
            "cma_ranges": [[250000, 266384]], "cma": {"CmaTotal": 65536},
            "cell_pinned_in_movable": [], "cell_pinned_in_cma": [], "ms": 5000.0}
    race.update(kw)
    return report(mode="longterm", race=race, map_g2=G2,
                  offline=[{"block": 40, "result": "ok", "ms": 30.0, "state": "offline"}])


class NumaHintTest(unittest.TestCase):
    cell = Cell("7", "pin", "anon", "numa-hint")

    def test_coherent_with_hinting_evidence(self) -> None:
        self.assertEqual(classify_cell(self.cell, numa_report()), "COHERENT")

    def test_lost_writes_when_the_map_misses_gen2(self) -> None:
        rep = numa_report(map_g2=None)
        rep["map_g2"] = [["cpu", 0, 16]]
        self.assertEqual(classify_cell(self.cell, rep), "WRITES_LOST_SILENTLY")

    def test_odp_revoked_with_an_acknowledged_invalidate(self) -> None:
        cell = Cell("7", "odp", "memfd", "numa-hint")
        self.assertEqual(classify_cell(cell, numa_report("odp"), audit=written(acks=1)),
                         "REVOKED_IN_TIME")

    def test_no_memfd_cells_on_6_1(self) -> None:
        from pinlab.orchestrator.cells import all_cells
        cells = {k: {(c.mode, c.backing) for c in all_cells(k) if c.event == "numa-hint"}
                 for k in ("6.1", "6.12", "7")}
        self.assertEqual({b for _, b in cells["6.1"]}, {"anon"})
        for k in ("6.12", "7"):
            self.assertEqual({b for _, b in cells[k]}, {"anon", "memfd"})
            self.assertEqual(len(cells[k]), 8)

    def test_no_hinting_is_inconclusive(self) -> None:
        for vm in ({"numa_pte_updates": 0, "numa_hint_faults": 0},
                   {"numa_pte_updates": 48, "numa_hint_faults": 0},
                   {"numa_pte_updates": 0, "numa_hint_faults": 5}, {}, None):
            with self.subTest(vm=vm):
                out = classify_cell(self.cell, numa_report(vmstat_event=vm))
                self.assertTrue(out.startswith("INCONCLUSIVE"), out)

    def test_control_not_migrated_is_inconclusive(self) -> None:
        out = classify_cell(self.cell, numa_report(control_nodes_after=[1] * 16))
        self.assertTrue(out.startswith("INCONCLUSIVE"), out)
        rep = numa_report(control_nodes_after=[1] * 15 + [0])
        self.assertEqual(classify_cell(self.cell, rep), "COHERENT")

    def test_pages_not_on_the_remote_node_is_inconclusive(self) -> None:
        for key in ("nodes_before", "control_nodes_before"):
            with self.subTest(key=key):
                out = classify_cell(self.cell, numa_report(**{key: [1] * 15 + [0]}))
                self.assertTrue(out.startswith("INCONCLUSIVE"), out)

    def test_each_missing_piece_is_inconclusive(self) -> None:
        base = numa_report()
        for key in ("nodes_before", "control_nodes_before", "nodes_after",
                    "control_nodes_after", "vmstat_event"):
            with self.subTest(key=key):
                rep = copy.deepcopy(base)
                del rep["numa"][key]
                out = classify_cell(self.cell, rep)
                self.assertTrue(out.startswith("INCONCLUSIVE"), out)
        rep = copy.deepcopy(base)
        del rep["numa"]
        self.assertTrue(classify_cell(self.cell, rep).startswith("INCONCLUSIVE"))


class MovablePinRaceTest(unittest.TestCase):
    cell = Cell("7", "longterm", "anon", "movable-pin-race")

    def test_offline_succeeds_when_nothing_is_left_in_movable(self) -> None:
        self.assertEqual(classify_cell(self.cell, race_report()), "OFFLINE_SUCCEEDS")

    def test_a_pinned_pfn_in_movable_or_cma_is_the_class(self) -> None:
        for key in ("pinned_in_movable", "pinned_in_cma"):
            with self.subTest(key=key):
                rep = race_report()
                rep["race"]["rounds"][7][key] = [5300000]
                self.assertEqual(classify_cell(self.cell, rep), "PINNED_IN_MOVABLE")
        rep = race_report(cell_pinned_in_movable=[5300001])
        self.assertEqual(classify_cell(self.cell, rep), "PINNED_IN_MOVABLE")

    def test_a_refused_registration(self) -> None:
        rep = race_report()
        rep["race"]["rounds"][3]["errnos"] = [0, "ENOMEM"]
        self.assertEqual(classify_cell(self.cell, rep), "PIN_REFUSED(ENOMEM)")

    def test_no_page_in_movable_or_cma_is_inconclusive(self) -> None:
        rep = race_report()
        for r in rep["race"]["rounds"]:
            r["faulted_in_movable"] = 0
        self.assertTrue(classify_cell(self.cell, rep).startswith("INCONCLUSIVE"))

    def test_a_cma_area_without_a_page_in_it_is_inconclusive(self) -> None:
        rep = race_report()
        for r in rep["race"]["rounds"]:
            r["faulted_in_cma"] = 0
        self.assertTrue(classify_cell(self.cell, rep).startswith("INCONCLUSIVE"))
        rep["race"]["rounds"][60]["faulted_in_cma"] = 3
        self.assertEqual(classify_cell(self.cell, rep), "OFFLINE_SUCCEEDS")
        rep = race_report(cma_ranges=[])     # no CMA area: the Movable rounds suffice
        self.assertEqual(classify_cell(self.cell, rep), "OFFLINE_SUCCEEDS")

    def test_missing_or_malformed_rounds_are_inconclusive(self) -> None:
        for rounds in ([], [{"errnos": [0, 0]}]):
            with self.subTest(rounds=rounds):
                out = classify_cell(self.cell, race_report(rounds=rounds))
                self.assertTrue(out.startswith("INCONCLUSIVE"), out)
        rep = race_report()
        del rep["race"]
        self.assertTrue(classify_cell(self.cell, rep).startswith("INCONCLUSIVE"))

    def test_a_pinner_without_a_result_is_inconclusive(self) -> None:
        rep = race_report()
        rep["race"]["rounds"][3]["errnos"] = [0, "no result"]
        self.assertTrue(classify_cell(self.cell, rep).startswith("INCONCLUSIVE"))

    def test_a_blocked_offline(self) -> None:
        rep = race_report()
        rep["offline"][0]["result"] = "timeout"
        self.assertEqual(classify_cell(self.cell, rep), "OFFLINE_BLOCKED")


class TwoNodeGuestTest(unittest.TestCase):
    """QEMU options of a matrix guest: a CPU-less node 1 beside an unchanged node 0."""

    def args(self, cfg: GuestConfig) -> list[str]:
        images = mock.MagicMock()   # only paths are read from it: nothing is booted
        with tempfile.TemporaryDirectory() as d:
            g = Guest(images, Path(d), cfg)
            try:
                return g.qemu_args()
            finally:
                shutil.rmtree(g.rundir, ignore_errors=True)   # the sparse scratch disks

    def test_one_node_guest_is_as_before(self) -> None:
        a = self.args(GuestConfig(memory_mb=1024))
        self.assertIn("q35,memory-backend=mem", a)
        self.assertEqual(a[a.index("-m") + 1], "1024M")
        self.assertNotIn("-numa", a)

    def test_matrix_guest_has_a_cpu_less_second_node(self) -> None:
        cfg = guestenv.guest_config()
        a = self.args(cfg)
        total = cfg.memory_mb + guestenv.NUMA_MB
        self.assertEqual(a[a.index("-m") + 1],
                         f"{total}M,slots=2,maxmem={total + guestenv.HOTPLUG_MB}M")
        numa = [a[i + 1] for i, x in enumerate(a) if x == "-numa"]
        self.assertEqual(numa, [f"node,nodeid=0,cpus=0-{cfg.cpus - 1},memdev=mem",
                                "node,nodeid=1,memdev=mem1"])
        objs = [a[i + 1] for i, x in enumerate(a) if x == "-object"]
        self.assertIn(f"memory-backend-memfd,id=mem,size={guestenv.MEMORY_MB}M,share=on", objs)
        self.assertIn(f"memory-backend-memfd,id=mem1,size={guestenv.NUMA_MB}M,share=on", objs)
        self.assertIn("q35", a)   # memory-backend= and -numa memdev= exclude each other

    def test_numa_balancing_is_off_at_boot_and_cma_asked_for(self) -> None:
        words = guestenv.CMDLINE.split()
        self.assertIn("numa_balancing=disable", words)
        self.assertIn(f"cma={guestenv.CMA_MB}M", words)


if __name__ == "__main__":
    unittest.main()
