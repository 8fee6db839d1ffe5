"""The matrix's HTML page: colour by harm with a legend, marks for mismatch, error and
flaky apart from the colour, modes in the order gup, pin, longterm, odp. Fed with recorded
verdicts (tests/data/validate/)."""

from __future__ import annotations

import json
import re
import tempfile
import unittest
from pathlib import Path
from typing import Any

from pinlab.orchestrator.harm import load
from pinlab.orchestrator.matrix import write_html

DATA = Path(__file__).resolve().parents[1] / "data" / "validate"


def recorded() -> list[dict[str, Any]]:
    out = []
    for k in ("6.12", "6.1"):
        for r in json.loads((DATA / f"matrix-{k}-longterm.json").read_text()):
            out.append({**r, "artifacts": f"/nonexistent/{k}", "evidence": {}, "source": "s"})
    return out


def page(verdicts: list[dict[str, Any]]) -> str:
    with tempfile.TemporaryDirectory() as d:
        return write_html(verdicts, Path(d)).read_text()


class MatrixPage(unittest.TestCase):
    def test_colour_is_the_harm_of_the_observed_class(self) -> None:
        table = load()
        text = page(recorded())
        lost = table.level("WRITES_LOST_SILENTLY").colour
        refused = table.level("PIN_REFUSED(EFAULT)").colour
        self.assertNotEqual(lost, refused)
        cells = re.findall(r'<td class="([^"]*)" style="background-color:(#\w+);[^>]*>'
                           r'<a [^>]*>([^<]*)', text)
        self.assertEqual(len(cells), 120)
        for marks, colour, observed in cells:
            self.assertEqual(colour, table.level(observed).colour, observed)
            self.assertEqual(marks, "")
        for lv in table.levels:              # the legend names every level
            self.assertIn(f"{lv.name}</td>", text.replace("&amp;", "&"))

    def test_mismatch_error_and_flaky_are_marked_apart_from_the_colour(self) -> None:
        vs = recorded()
        vs[0] = {**vs[0], "observed": "COHERENT", "verdict": "mismatch"}
        vs[1] = {**vs[1], "observed": "ERROR", "verdict": "error"}
        vs.append({**vs[2], "observed": "KERNEL_ERROR", "verdict": "mismatch"})
        text = page(vs)
        legend, grid = text.split("</table>", 1)
        for mark in ("mismatch", "error", "flaky"):
            self.assertIn(f'<td class="{mark}">', legend)
        self.assertEqual(grid.count('<td class="mismatch"'), 1)
        self.assertEqual(grid.count('<td class="error"'), 1)
        self.assertEqual(grid.count('class="mismatch flaky"'), 1)
        self.assertIn("<br>≈ KERNEL_ERROR", grid)     # both classes of the flaky cell
        self.assertIn(f"✗ expected {vs[0]['expected']}", text)

    def test_modes_in_story_order(self) -> None:
        vs = recorded()
        for mode in ("odp", "pin", "gup"):
            vs.append({**vs[0], "mode": mode})
        heads = re.findall(r"<th>(gup|pin|longterm|odp)<br>([\d.]+)</th>", page(vs))
        # vs[0] is a 6.12 cell: the other modes have a 6.12 column only
        self.assertEqual(heads, [("gup", "6.12"), ("pin", "6.12"), ("longterm", "6.12"),
                                 ("longterm", "6.1"), ("odp", "6.12")])


if __name__ == "__main__":
    unittest.main()
