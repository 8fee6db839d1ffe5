"""Cell classification from raw workload reports, and expectation coverage of the matrix."""

from __future__ import annotations

import unittest
from typing import Any

from pinlab.images.kernel import KERNELS
from pinlab.orchestrator.cells import all_cells
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.expectations import Cell, expect, load
from pinlab.orchestrator.scenario import SCENARIOS, all_gen, classify_cell, states

PINS = {"nr_foll_pin_acquired": 16, "nr_foll_pin_released": 16}


def report(**kw: Any) -> dict[str, Any]:
    rep: dict[str, Any] = {"errno": 0, "npages": 16, "region": 1, "steps": [],
                           "vmstat_before": PINS, "vmstat_end": PINS,
                           "pfns_before": list(range(100, 116))}
    rep.update(kw)
    return rep


class ClassifyTest(unittest.TestCase):
    def test_states_expand_rle(self) -> None:
        scan = [["g2", 0, 8], ["zero", 8, 8]]
        self.assertEqual(states(scan), ["g2"] * 8 + ["zero"] * 8)
        self.assertTrue(all_gen(scan, 2, 0, 8))
        self.assertFalse(all_gen(scan, 2))

    def test_register_refusal(self) -> None:
        obs, _ = classify_cell(Cell("6.12", "longterm", "ext4", "truncate"),
                               report(errno=14, errno_name="EFAULT", step="register"),
                               classify(""), {})
        self.assertEqual(obs, "PIN_REFUSED(EFAULT)")

    def test_truncate_lost_vs_revoked(self) -> None:
        rep = report(kept_pages=8, map_kept_g2=[["g2", 0, 8]],
                     map_after_extend=[["g2", 0, 8], ["zero", 8, 8]],
                     steps=[{"step": "dma_write_g2", "errno": 0}])
        obs, _ = classify_cell(Cell("6.12", "pin", "memfd", "truncate"), rep, classify(""), {})
        self.assertEqual(obs, "WRITES_LOST_SILENTLY")
        rep["steps"] = [{"step": "dma_write_g2", "errno": 14, "errno_name": "EFAULT"}]
        obs, _ = classify_cell(Cell("6.12", "odp", "memfd", "truncate"), rep, classify(""),
                               {"kinds": {"invalidate_ack": 1}})
        self.assertEqual(obs, "REVOKED_IN_TIME")

    def test_2018_warn_and_lost(self) -> None:
        dm = classify("WARNING: CPU: 1 PID: 5 at fs/ext4/inode.c:3587 ext4_dirty_folio+0x2c\n"
                      "EXT4-fs warning (device vdc): page 0 does not have buffers attached\n")
        rep = report(file_after=[["g1", 0, 16]])
        obs, _ = classify_cell(Cell("6.12", "gup", "ext4", "2018"), rep, dm, {})
        self.assertEqual(obs, "EXT4_WARN_DATA_LOST")

    def test_odirect_write(self) -> None:
        lost = report(map_g2=[["g2", 0, 4], ["zero", 4, 4], ["g2", 8, 8]],
                      file_after=[["g2", 0, 4], ["zero", 4, 4], ["g2", 8, 8]])
        obs, f = classify_cell(Cell("6.12", "pin", "ext4", "odirect-write"), lost,
                               classify(""), {})
        self.assertEqual(obs, "WRITES_LOST_SILENTLY")
        self.assertEqual(f["map_g2"], lost["map_g2"])
        ok = report(map_g2=[["g2", 0, 16]], file_after=[["g2", 0, 16]])
        obs, _ = classify_cell(Cell("6.12", "odp", "ext4", "odirect-write"), ok,
                               classify(""), {"kinds": {"invalidate_ack": 4}})
        self.assertEqual(obs, "REVOKED_IN_TIME")

    def test_victim_exit_and_oom(self) -> None:
        reg = {"nr_foll_pin_acquired": 32, "nr_foll_pin_released": 16}

        def victim(mode: str, event: str, kinds: dict[str, int], gone: dict[str, int],
                   **extra: Any) -> str:
            rep = report(victim={"region": 2, "pfns": [1, 2]}, victim_status=9,
                         victim_signal=9, vmstat_before_victim=PINS,
                         vmstat_victim_registered=reg, vmstat_victim_gone=gone, **extra)
            obs, _ = classify_cell(Cell("6.12", mode, "anon", event), rep, classify(""),
                                   {"victim": {"kinds": kinds, "violations": 0}})
            return obs

        done = {"create": 1, "access": 9, "destroy": 1}
        self.assertEqual(victim("pin", "exit", done, PINS), "RELEASED_AT_EXIT")
        self.assertEqual(victim("pin", "exit", done, reg), "PINS_LEAKED")
        self.assertEqual(victim("gup", "exit", {"create": 1}, PINS), "REGION_NOT_RELEASED")
        self.assertEqual(victim("odp", "exit", {**done, "invalidate_ack": 1}, PINS),
                         "REVOKED_IN_TIME")
        self.assertEqual(victim("odp", "oom", done, PINS, oom_events={"oom_kill": 0}),
                         "OOM_NOT_TRIGGERED")
        self.assertEqual(victim("pin", "oom", done, PINS, oom_events={"oom_kill": 1}),
                         "RELEASED_AT_EXIT")
        rep = report(victim={"region": 2}, victim_status=9)
        obs, _ = classify_cell(Cell("6.12", "odp", "anon", "exit"), rep, classify(""),
                               {"victim": {"violations": 1, "violation_samples": [{}]}})
        self.assertEqual(obs, "DMA_AFTER_REVOKE")
        obs, _ = classify_cell(Cell("6.12", "odp", "anon", "exit"),
                               report(victim={"error": "boom"}), classify(""), {})
        self.assertEqual(obs, "ERROR")

    def test_mem_offline(self) -> None:
        blocked = report(blocks={"32": "Movable"}, map_g2=[["g2", 0, 16]],
                         offline=[{"block": 32, "result": "timeout", "state": "online"}])
        dm = classify("[ 13.5] migrating pfn 1000fb failed ret:16\n"
                      "[ 13.6] page dumped because: migration failure\n")
        obs, f = classify_cell(Cell("6.12", "pin", "anon", "mem-offline"), blocked, dm, {})
        self.assertEqual(obs, "OFFLINE_BLOCKED")
        self.assertEqual(len(f["migration_failures"]), 2)
        self.assertFalse(dm.severe())
        done = dict(blocked, offline=[{"block": 32, "result": "ok", "state": "offline"}])
        obs, _ = classify_cell(Cell("6.12", "longterm", "anon", "mem-offline"), done,
                               classify(""), {})
        self.assertEqual(obs, "OFFLINE_SUCCEEDS")
        obs, _ = classify_cell(Cell("6.12", "odp", "anon", "mem-offline"), done, classify(""),
                               {"kinds": {"invalidate_ack": 16}})
        self.assertEqual(obs, "REVOKED_IN_TIME")
        obs, _ = classify_cell(Cell("6.12", "pin", "anon", "mem-offline"),
                               dict(blocked, offline=[]), classify(""), {})
        self.assertEqual(obs, "OFFLINE_INCONCLUSIVE")

    def test_violation_and_pin_leak_win(self) -> None:
        rep = report(map_g1=[["g1", 0, 16]])
        obs, _ = classify_cell(Cell("6.12", "odp", "anon", "dma-write"), rep, classify(""),
                               {"violations": 1, "violation_samples": [{}]})
        self.assertEqual(obs, "DMA_AFTER_REVOKE")
        rep["vmstat_end"] = {"nr_foll_pin_acquired": 32, "nr_foll_pin_released": 16}
        obs, _ = classify_cell(Cell("6.12", "pin", "anon", "dma-write"), rep, classify(""), {})
        self.assertEqual(obs, "PINS_LEAKED")

    def test_fork_parent_loses(self) -> None:
        rep = report(map_parent_g2=[["g1", 0, 16]],
                     child={"mapped": True, "map": [["g2", 0, 16]]})
        obs, _ = classify_cell(Cell("6.12", "gup", "anon", "fork"), rep, classify(""), {})
        self.assertEqual(obs, "PARENT_LOSES_WRITES")


class CoverageTest(unittest.TestCase):
    def test_every_cell_has_a_rule_and_a_scenario(self) -> None:
        rules = load()
        for k in KERNELS:
            for c in all_cells(k):
                self.assertIn(c.event, SCENARIOS, c.name)
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
