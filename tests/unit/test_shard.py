"""Cell selection and sharding: a partition, the same in every process, grouped by kernel,
with Avocado's tag semantics and references that resolve to exactly the chosen tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest

from pinlab.images.kernel import KERNELS
from pinlab.orchestrator.cells import select
from pinlab.orchestrator.celltest import method_name
from pinlab.orchestrator.expectations import load
from pinlab.orchestrator.matrix import CELL_TESTS, references
from pinlab.orchestrator.shard import (
    BOOT_COST,
    CELL_COST,
    Shard,
    order,
    reboots,
    select_cells,
    split,
)

ALL = list(KERNELS)


def avocado_list(*args: str) -> list[str]:
    """``Class.method`` of the tests ``avocado list`` resolves (Avocado decides, not us)."""
    out = subprocess.run([sys.executable, "-m", "avocado", "list", *args],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    return sorted(ln.split(":", 1)[1].strip() for ln in out.splitlines()
                  if ln.startswith("avocado-instrumented"))


class ShardSpecTest(unittest.TestCase):
    def test_parse(self) -> None:
        self.assertEqual(Shard.parse("2/3"), Shard(2, 3))
        for bad in ("0/3", "4/3", "3", "a/b", "1/0", "-1/3", ""):
            with self.assertRaises(ValueError, msg=bad):
                Shard.parse(bad)

    def test_from_env(self) -> None:
        self.assertIsNone(Shard.from_env({}))
        self.assertEqual(Shard.from_env({"PINLAB_SHARD": "3/4"}), Shard(3, 4))
        # GitLab parallel: 1-based
        self.assertEqual(Shard.from_env({"CI_NODE_INDEX": "1", "CI_NODE_TOTAL": "5"}),
                         Shard(1, 5))
        # Kubernetes Indexed Job: 0-based index, total from the manifest
        self.assertEqual(Shard.from_env({"JOB_COMPLETION_INDEX": "0",
                                         "PINLAB_SHARD_TOTAL": "3"}), Shard(1, 3))
        self.assertEqual(Shard.from_env({"JOB_COMPLETION_INDEX": "2",
                                         "PINLAB_SHARD_TOTAL": "3"}), Shard(3, 3))
        with self.assertRaisesRegex(ValueError, "PINLAB_SHARD_TOTAL"):
            Shard.from_env({"JOB_COMPLETION_INDEX": "1"})
        with self.assertRaisesRegex(ValueError, "CI_NODE_TOTAL"):
            Shard.from_env({"CI_NODE_INDEX": "1"})
        with self.assertRaises(ValueError):   # index past the total
            Shard.from_env({"JOB_COMPLETION_INDEX": "3", "PINLAB_SHARD_TOTAL": "3"})
        # the explicit variable wins over an engine's
        self.assertEqual(Shard.from_env({"PINLAB_SHARD": "1/2", "CI_NODE_INDEX": "2",
                                         "CI_NODE_TOTAL": "2"}), Shard(1, 2))


class SplitTest(unittest.TestCase):
    def setUp(self) -> None:
        self.rules = load()
        self.cells = list(select_cells(ALL).cells)

    def test_partition(self) -> None:
        for n in (1, 2, 3, 4, 5, 7, 16):
            pieces = split(self.cells, n, self.rules)
            self.assertEqual(len(pieces), n)
            flat = [c for p in pieces for c in p]
            self.assertEqual(flat, order(self.cells, self.rules), f"N={n}")
            self.assertEqual(len(set(flat)), len(self.cells))

    def test_more_pieces_than_cells(self) -> None:
        cells = self.cells[:2]
        pieces = split(cells, 5, self.rules)
        self.assertEqual(sum(map(len, pieces)), 2)
        self.assertEqual(sum(1 for p in pieces if p), 2)

    def test_grouped_by_kernel(self) -> None:
        # each kernel boundary puts at most one extra kernel into a shard
        for n in (2, 3, 4, 5, 8):
            pieces = split(self.cells, n, self.rules)
            spans = sum(len({c.kernel for c in p}) for p in pieces)
            self.assertLessEqual(spans, n + len(KERNELS) - 1, f"N={n}")
        # as many shards as kernels: each kernel's cells in at most two neighbouring shards
        # (the kernels' matrices differ in size: 6.1 has no anon-mthp cells)
        pieces = split(self.cells, len(KERNELS), self.rules)
        for k in KERNELS:
            holding = [i for i, p in enumerate(pieces) if any(c.kernel == k for c in p)]
            self.assertLessEqual(len(holding), 2, k)
            self.assertEqual(holding, list(range(holding[0], holding[-1] + 1)), k)

    def test_rebooting_cells_stay_together(self) -> None:
        for k in KERNELS:
            flags = [reboots(c, self.rules) for c in order(self.cells, self.rules)
                     if c.kernel == k]
            self.assertTrue(any(flags), k)
            first = flags.index(True)
            self.assertTrue(all(flags[first:]), f"{k}: rebooting cells not contiguous")

    def test_balanced(self) -> None:
        def cost(p: list) -> int:
            return (sum(CELL_COST + (BOOT_COST if reboots(c, self.rules) else 0) for c in p)
                    + BOOT_COST * len({c.kernel for c in p}))

        for n in (2, 3, 4, 6):
            costs = [cost(p) for p in split(self.cells, n, self.rules)]
            ideal = sum(costs) / n
            # no shard above the ideal by more than one rebooting cell and a boot
            self.assertLessEqual(max(costs), ideal + CELL_COST + 2 * BOOT_COST, costs)
        sizes = [len(p) for p in split(list(select_cells(["6.12"], ["event:dma-write"]).cells),
                                       3, self.rules)]
        self.assertLessEqual(max(sizes) - min(sizes), 2, sizes)

    def test_same_in_every_process(self) -> None:
        code = ("import json,sys;from pinlab.orchestrator.shard import select_cells, Shard;"
                "print(json.dumps([[c.name for c in select_cells(['6.12','6.1','7'], None,"
                " Shard(i,4)).cells] for i in range(1,5)]))")
        here = [[c.name for c in select_cells(ALL, None, Shard(i, 4)).cells]
                for i in range(1, 5)]
        for seed in ("1", "4242"):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            self.assertEqual(json.loads(out), here, f"PYTHONHASHSEED={seed}")

    def test_selection_and_shards_add_up(self) -> None:
        whole = select_cells(["6.12"], ["mode:odp", "event:truncate"])
        parts = [select_cells(["6.12"], ["mode:odp", "event:truncate"], Shard(i, 3))
                 for i in range(1, 4)]
        self.assertEqual([c for p in parts for c in p.cells], list(whole.cells))
        self.assertTrue(all(p.selected == whole.selected for p in parts))
        with self.assertRaisesRegex(ValueError, "unknown kernel"):
            select_cells(["5.4"])


class AvocadoAgreesTest(unittest.TestCase):
    """The Python-side filter and references give exactly what Avocado runs."""

    def test_tag_filter_matches_avocado(self) -> None:
        for tags in (["kernel:6.12,mode:odp,-backing:ext4", "kernel:6.12,event:punch-hole"],
                     ["smoke"]):
            mine = sorted(method_name(c) for c in select(
                [c for k in KERNELS for c in select_cells([k]).cells], tags))
            theirs = avocado_list(*[f"--filter-by-tags={t}" for t in tags], str(CELL_TESTS))
            self.assertEqual(mine, theirs, tags)

    def test_references_resolve_exactly(self) -> None:
        # punch-hole and punch-hole-partial share a prefix: the regex must be anchored
        cells = [c for c in select_cells(["6.1"], ["event:punch-hole"]).cells][:3]
        self.assertEqual(avocado_list(*references(cells)),
                         sorted(method_name(c) for c in cells))


if __name__ == "__main__":
    unittest.main()
