"""The matrix cell list, its generated Avocado tests, and its expectations stay in step."""

from __future__ import annotations

import unittest

from pinlab.images.kernel import KERNELS
from pinlab.orchestrator.cells import all_cells, smoke
from pinlab.orchestrator.celltest import GENERATED, judge, render
from pinlab.orchestrator.expectations import Cell, expect, load


class CellsTest(unittest.TestCase):
    def test_generated_tests_are_current(self) -> None:
        self.assertEqual(GENERATED.read_text(), render(),
                         "tests/matrix/test_cells.py is stale: run "
                         "`python -m pinlab.orchestrator.celltest --write`")

    def test_every_cell_has_an_expectation(self) -> None:
        rules = load()
        for k in KERNELS:
            for c in all_cells(k):
                self.assertIsNotNone(expect(c, rules), f"no expectation for {c.name}")

    def test_smoke_has_one_cell_per_event(self) -> None:
        cells = all_cells("6.12")
        s = smoke(cells)
        self.assertEqual({c.event for c in s}, {c.event for c in cells})
        self.assertEqual(len(s), len({c.event for c in cells}))

    def test_judge(self) -> None:
        c = Cell("6.12", "pin", "anon", "dma-write")
        self.assertEqual(judge(c, {"observed": "COHERENT"})["verdict"], "match")
        self.assertEqual(judge(c, {"observed": "WRITES_LOST_SILENTLY"})["verdict"], "mismatch")
        self.assertEqual(judge(c, {"observed": "ERROR"})["verdict"], "error")


if __name__ == "__main__":
    unittest.main()
