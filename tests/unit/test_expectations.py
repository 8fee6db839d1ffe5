"""The expectations table is data; these tests keep it loadable and unambiguous."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

from pinlab.orchestrator.expectations import Cell, expect, load


class ExpectationsTest(unittest.TestCase):
    def test_shipped_table_loads_and_covers_baseline(self) -> None:
        rules = load()
        self.assertTrue(rules)
        for mode in ("gup", "pin", "longterm", "odp"):
            e = expect(Cell("6.12", mode, "anon", "dma-write"), rules)
            self.assertIsNotNone(e, mode)
            assert e is not None
            self.assertEqual(e.expected, "COHERENT")
            self.assertTrue(e.source)

    def test_first_match_wins_and_lists(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d, "t.toml")
            p.write_text('[[rule]]\nkernel = ["6.12", "7"]\nmode = "longterm"\nbacking = "ext4"\n'
                         'event = "*"\nexpected = "PIN_REFUSED(EFAULT)"\nsource = "6.5 rule"\n'
                         '[[rule]]\nexpected = "COHERENT"\nsource = "default"\n')
            rules = load(p)
            self.assertEqual(expect(Cell("6.12", "longterm", "ext4", "x"), rules).expected,
                             "PIN_REFUSED(EFAULT)")
            self.assertEqual(expect(Cell("6.1", "longterm", "ext4", "x"), rules).expected,
                             "COHERENT")

    def test_rule_without_source_is_rejected(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d, "t.toml")
            p.write_text('[[rule]]\nexpected = "COHERENT"\n')
            with self.assertRaises(ValueError):
                load(p)


if __name__ == "__main__":
    unittest.main()
