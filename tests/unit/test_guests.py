"""How many warm guests: from cores and memory, at least one per kernel, ``--jobs`` wins."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

from pinlab.orchestrator.guests import (
    MIN_CELLS_PER_GUEST,
    guest_budget,
    guest_memory_mb,
    host_memory_mb,
    plan_guests,
)
from pinlab.orchestrator.shard import select_cells

ALL = ["6.12", "6.1", "7"]


class GuestPlanTest(unittest.TestCase):
    def test_budget(self) -> None:
        # this project's machine: 2 cores for a 2-vCPU guest -> one guest at full speed
        self.assertEqual(guest_budget(cores=2, memory_mb=24 * 1024), 1)
        self.assertEqual(guest_budget(cores=32, memory_mb=256 * 1024), 16)   # cores bound
        self.assertEqual(guest_budget(cores=64, memory_mb=8 * guest_memory_mb()), 8)  # memory
        self.assertEqual(guest_budget(cores=1, memory_mb=100), 1)            # never zero

    def test_meminfo(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix="meminfo") as f:
            f.write("MemTotal: 8000000 kB\nMemAvailable: 4194304 kB\n")
            f.flush()
            self.assertEqual(host_memory_mb(Path(f.name)), 4096)

    def test_small_host_is_todays_layout(self) -> None:
        """One guest per kernel, all kernels at once: what the matrix did before."""
        cells = list(select_cells(ALL).cells)
        plan = plan_guests(cells, budget=1)
        self.assertEqual(plan.per_kernel(), {k: 1 for k in ALL})
        self.assertEqual(plan.concurrent, 3)
        self.assertEqual(sorted(c for s in plan.slots for c in s.cells), sorted(cells))

    def test_big_host_more_guests_per_kernel(self) -> None:
        cells = list(select_cells(ALL).cells)
        plan = plan_guests(cells, budget=12)
        self.assertEqual(sum(plan.per_kernel().values()), 12)
        self.assertEqual(plan.concurrent, 12)
        self.assertEqual(plan.per_kernel(), {k: 4 for k in ALL})
        self.assertEqual(sorted(c for s in plan.slots for c in s.cells), sorted(cells))
        self.assertEqual({s.name for s in plan.slots if s.kernel == "7"},
                         {"7", "7+2", "7+3", "7+4"})

    def test_small_slice_keeps_one_guest(self) -> None:
        cells = list(select_cells(["6.12"], ["event:dma-write,mode:pin,-option"]).cells)
        self.assertLess(len(cells), MIN_CELLS_PER_GUEST)
        self.assertEqual(plan_guests(cells, budget=16).per_kernel(), {"6.12": 1})
        # unless --jobs asks for more
        plan = plan_guests(cells, jobs=2)
        self.assertEqual(plan.per_kernel(), {"6.12": 2})
        self.assertEqual(sorted(c for s in plan.slots for c in s.cells), sorted(cells))

    def test_jobs_below_kernels_runs_in_waves(self) -> None:
        cells = list(select_cells(ALL, ["smoke"]).cells)
        plan = plan_guests(cells, jobs=1)
        self.assertEqual(plan.per_kernel(), {k: 1 for k in ALL})
        self.assertEqual(plan.concurrent, 1)
        with self.assertRaises(ValueError):
            plan_guests(cells, jobs=0)

    def test_uneven_kernels(self) -> None:
        cells = (list(select_cells(["6.12"]).cells)
                 + list(select_cells(["6.1"], ["smoke"]).cells))
        plan = plan_guests(cells, jobs=5)
        self.assertEqual(plan.per_kernel(), {"6.12": 4, "6.1": 1})

    def test_no_cells(self) -> None:
        self.assertEqual(plan_guests([]).slots, ())


if __name__ == "__main__":
    unittest.main()
