"""The matrix cell list, its Avocado tests (made from the registry by the pinlab-matrix
resolver, orchestrator/celltest.py), and its expectations stay in step."""

from __future__ import annotations

import importlib.util
import unittest

from avocado.core.resolver import ReferenceResolutionResult
from avocado.core.tags import filter_tags_on_runnables

from pinlab.images.kernel import KERNELS
from pinlab.orchestrator.cells import all_cells, cell_tags, parse_cell, select, smoke
from pinlab.orchestrator.celltest import (
    CELL_TESTS,
    CellResolver,
    cell_runnables,
    judge,
    method_name,
    tag_map,
)
from pinlab.orchestrator.expectations import Cell, expect, load


class CellsTest(unittest.TestCase):
    def test_resolver_gives_every_cell_once_with_its_name_and_tags(self) -> None:
        res = CellResolver().resolve(str(CELL_TESTS))
        self.assertEqual(res.result, ReferenceResolutionResult.SUCCESS)
        want = []
        for k in KERNELS:
            cells = all_cells(k)
            s = smoke(cells)
            want += [(f"{CELL_TESTS}:{method_name(c)}", cell_tags(c, s)) for c in cells]
        got = [(r.uri, r.tags) for r in res.resolutions]
        self.assertEqual([u for u, _ in got], [u for u, _ in want])
        for (uri, tags), (_, names) in zip(got, want, strict=True):
            self.assertEqual(tags, tag_map(names), uri)
        self.assertEqual(len({u for u, _ in got}), len(got))

    def test_resolver_pattern_and_other_files(self) -> None:
        rs = cell_runnables(str(CELL_TESTS), r"^Kernel6_1\.test_pin__ext4__")
        self.assertTrue(rs)
        self.assertTrue(all(":Kernel6_1.test_pin__ext4__" in r.uri for r in rs))
        none = CellResolver().resolve(f"{CELL_TESTS}:^NoSuchClass$")
        self.assertEqual(none.result, ReferenceResolutionResult.NOTFOUND)
        other = CellResolver().resolve(str(CELL_TESTS.parent.parent / "unit" / "test_cells.py"))
        self.assertEqual(other.result, ReferenceResolutionResult.NOTFOUND)

    def test_tag_filters_select_what_select_selects(self) -> None:
        res = CellResolver().resolve(str(CELL_TESTS))
        for filters in (["kernel:6.1,event:fork"], ["mode:odp", "event:truncate"],
                        ["smoke,-kernel:6.12"], ["backing:btrfs,-mode:gup"]):
            with self.subTest(filters=filters):
                kept = filter_tags_on_runnables([res], filters)
                every = [c for k in KERNELS for c in all_cells(k)]
                self.assertEqual([r.uri.rsplit(":", 1)[1] for r in kept],
                                 [method_name(c) for c in select(every, filters)])

    def test_the_test_module_has_a_method_per_cell(self) -> None:
        spec = importlib.util.spec_from_file_location("test_cells", CELL_TESTS)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for k in KERNELS:
            for c in all_cells(k):
                klass, meth = method_name(c).split(".")
                cls = getattr(mod, klass)
                self.assertEqual(cls.__module__, "test_cells")
                self.assertTrue(callable(getattr(cls, meth)), c.name)

    def test_every_cell_has_an_expectation(self) -> None:
        rules = load()
        for k in KERNELS:
            for c in all_cells(k):
                self.assertIsNotNone(expect(c, rules), f"no expectation for {c.name}")

    def test_smoke_has_one_cell_per_event_variant(self) -> None:
        cells = all_cells("6.12")
        s = smoke(cells)
        self.assertEqual({c.variant for c in s}, {c.variant for c in cells})
        self.assertEqual(len(s), len({c.variant for c in cells}))
        self.assertGreater(len(s), len({c.event for c in cells}))  # cpu-write+fast

    def test_options_make_cells_of_their_own(self) -> None:
        from pinlab.orchestrator import events
        cells = all_cells("6.12")
        fast = [c for c in cells if c.options == "fast"]
        self.assertTrue(fast)
        for c in fast:
            ev = events.event(c.event)
            assert ev is not None
            self.assertIn("fast", ev.variants)
            self.assertNotEqual(c.mode, "odp", "odp takes no pages: no fast path")
            self.assertIn("option:fast", cell_tags(c, set()))
            self.assertTrue(method_name(c).endswith("__fast"), method_name(c))
            self.assertEqual(Cell.parse(c.name), c)
            self.assertEqual(parse_cell(c.name), c)
            self.assertEqual(parse_cell(f"{CELL_TESTS}:{method_name(c)}"), c)
        plain = Cell("6.12", "pin", "anon", "cpu-write")
        self.assertEqual(plain.name, "6.12/pin/anon/cpu-write")
        self.assertEqual(Cell.parse(plain.name), plain)
        self.assertIn(plain, cells)
        self.assertNotIn("option:fast", cell_tags(plain, set()))
        self.assertEqual(select(cells, ["-option"]), [c for c in cells if not c.options])
        self.assertEqual(select(cells, ["option:fast"]), fast)
        for bad in ("6.12/pin/anon/cpu-write+turbo", "6.12/pin/anon/cpu-write+fast+readonly",
                    "6.12/pin/anon"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                parse_cell(bad)
        with self.assertRaises(ValueError):   # an option the event does not run with
            parse_cell("6.12/pin/anon/truncate+fast")

    def test_main_slice_leaves_out_option_cells_but_their_smoke_cells(self) -> None:
        from pinlab.orchestrator.cells import DEFAULT_FILTERS
        for k in KERNELS:
            every = all_cells(k)
            main = set(select(every, DEFAULT_FILTERS))
            smokes = smoke(every)
            opt = [c for c in every if c.options]
            self.assertEqual({c.options for c in opt}, {"readonly", "fast", "cpu-write-after"})
            self.assertEqual({c for c in opt if c in main}, {c for c in opt if c in smokes})
            self.assertEqual({c for c in every if not c.options},
                             {c for c in main if not c.options})
            # every event variant is in the main job at least once
            self.assertEqual({c.variant for c in main}, {c.variant for c in every})

    def test_readonly_cells_skip_fsdax_and_fast_skips_odp(self) -> None:
        for c in all_cells("6.12"):
            if "readonly" in c.option_names:
                self.assertNotIn(c.backing, ("ext4-dax", "xfs-dax"), c.name)
            if "fast" in c.option_names:
                self.assertNotEqual(c.mode, "odp", c.name)

    def test_rules_match_options(self) -> None:
        rules = [{"event": "x", "options": "fast", "expected": "A", "source": "s"},
                 {"event": "x", "expected": "B", "source": "s"}]
        self.assertEqual(expect(Cell("6.1", "pin", "anon", "x", "fast"), rules).expected, "A")
        self.assertEqual(expect(Cell("6.1", "pin", "anon", "x"), rules).expected, "B")
        self.assertEqual(expect(Cell("6.1", "pin", "anon", "x", "readonly"), rules).expected,
                         "B")

    def test_an_event_that_names_its_smoke_cell_gets_it(self) -> None:
        from pinlab.orchestrator import events
        cells = all_cells("6.1")
        s = smoke(cells)
        named = [e for e in events.events() if e.smoke]
        self.assertTrue(named)
        for e in named:
            mode, backing = e.smoke   # type: ignore[misc]
            self.assertIn(Cell("6.1", mode, backing, e.name), s, e.name)

    def test_judge(self) -> None:
        c = Cell("6.12", "pin", "anon", "dma-write")
        self.assertEqual(judge(c, {"observed": "COHERENT"})["verdict"], "match")
        self.assertEqual(judge(c, {"observed": "WRITES_LOST_SILENTLY"})["verdict"], "mismatch")
        self.assertEqual(judge(c, {"observed": "ERROR"})["verdict"], "error")
        f = judge(Cell("6.1", "longterm", "private-file", "cpu-write", "fast"),
                  {"observed": "DEVICE_READS_STALE"})
        self.assertEqual((f["options"], f["verdict"]), ("fast", "match"))
        from pinlab.orchestrator.verdicts import cell_of
        self.assertEqual(cell_of(f), Cell("6.1", "longterm", "private-file", "cpu-write", "fast"))
        del f["options"]   # a verdict written before cells had options
        self.assertEqual(cell_of(f).options, "")


if __name__ == "__main__":
    unittest.main()
