"""The THP backings: their cells per kernel (anon-mthp needs 6.8+) and the proof every
THP cell needs before any class (classify.py Judge.need_thp): a registered range that is
not shown to be one large folio is INCONCLUSIVE, never the expected class."""

from __future__ import annotations

import copy
import unittest
from typing import Any

from pinlab.common import vocab
from pinlab.orchestrator.cells import all_cells, backing_applies, kernel_version, parse_cell
from pinlab.orchestrator.expectations import Cell
from tests.unit.test_classify import Audit, classify_cell, report

N = 512                       # pages of a 2 MiB THP
PFNS = list(range(0x40000, 0x40000 + N))    # contiguous, aligned to 512


def thp_proof(n: int = N, pmd: dict[str, int] | None = None) -> dict[str, Any]:
    """What guest/pinlab_thp.py evidence records for one large folio of ``n`` pages."""
    return {"folio_pages": n, "settings": {"enabled": "madvise"},
            "kpageflags": {"thp": n, "heads": [0], "tails": n - 1, "missing": 0,
                           "contiguous": True, "first_aligned": True, "first_word": "0x400000"},
            "smaps": {"Rss": n * 4096, "AnonHugePages": 2 << 20, "ShmemPmdMapped": 0,
                      "THPeligible": 1, "VmFlags": ["rd", "wr", "hg"], **(pmd or {})}}


def small_proof(n: int = N) -> dict[str, Any]:
    """The proof of madv-collapse: small pages in a VM_HUGEPAGE VMA."""
    p = thp_proof(n)
    p["kpageflags"].update(thp=0, heads=[], tails=0, contiguous=False, first_aligned=False)
    p["smaps"]["AnonHugePages"] = 0
    return p


def written(n: int = N, acks: int = 0) -> Audit:
    a = Audit().add("create", region=1, inst=7, npages=n).add("map", region=1, inst=7)
    a.write(1, pages=PFNS[:n])
    for _ in range(acks):
        a.add("invalidate", region=1, inst=7).add("invalidate_ack", region=1, inst=7)
    a.write(2, pages=PFNS[:n])
    return a.add("destroy", region=1, inst=7)


def thp_report(proof: Any, n: int = N, **kw: Any) -> dict[str, Any]:
    rep = report(npages=n, pfns_before=PFNS[:n], pfns_registered=PFNS[:n],
                 map_g1=[["g1", 0, n]], **kw)
    if proof is not None:
        rep["thp"] = proof
    return rep


class THPCellsTest(unittest.TestCase):
    def test_anon_mthp_cells_only_where_the_kernel_has_mthp(self) -> None:
        for k, has in (("6.1", False), ("6.12", True), ("7", True)):
            cells = all_cells(k)
            mthp = [c for c in cells if c.backing == "anon-mthp"]
            self.assertEqual(bool(mthp), has, k)
            # the PMD-sized THP backings are on every kernel
            self.assertTrue(any(c.backing == "anon-thp" for c in cells), k)
            self.assertTrue(any(c.backing == "memfd-thp" for c in cells), k)
        self.assertEqual({c.event for c in all_cells("6.12") if c.backing == "anon-mthp"},
                         {"dma-write", "thp-split"})
        # a built kernel's version is unknown to the cell list: it gets every backing
        build = "build:" + "0" * 16
        self.assertTrue(any(c.backing == "anon-mthp" for c in all_cells(build)))
        with self.assertRaisesRegex(ValueError, "not a matrix cell"):
            parse_cell("6.1/pin/anon-mthp/dma-write")
        self.assertEqual(parse_cell("6.12/pin/anon-mthp/dma-write").backing, "anon-mthp")

    def test_kernel_versions_and_minimums(self) -> None:
        self.assertEqual(kernel_version("6.1"), (6, 1))
        self.assertEqual(kernel_version("6.12"), (6, 12))
        self.assertEqual(kernel_version("7"), (7, 0))
        self.assertIsNone(kernel_version("build:" + "a" * 16))
        self.assertFalse(backing_applies("anon-mthp", "6.1"))
        self.assertTrue(backing_applies("anon-mthp", "6.12"))
        for b in vocab.BACKINGS:
            if b not in vocab.BACKING_MIN_KERNEL:
                self.assertTrue(backing_applies(b, "6.1"), b)

    def test_thp_backings_are_not_in_the_read_only_events(self) -> None:
        for k in ("6.1", "6.12", "7"):
            self.assertFalse([c for c in all_cells(k) if c.backing in vocab.THP_BACKINGS
                              and c.event.startswith("cpu-write")])


class THPProofTest(unittest.TestCase):
    cell = Cell("6.12", "pin", "anon-thp", "dma-write")

    def classify(self, rep: dict[str, Any], cell: Cell | None = None, n: int = N) -> str:
        return classify_cell(cell or self.cell, rep, audit=written(n))

    def test_the_proof_gives_the_class(self) -> None:
        self.assertEqual(self.classify(thp_report(thp_proof())), "COHERENT")
        cell = Cell("6.12", "pin", "anon-mthp", "dma-write")
        proof = thp_proof(16, {"AnonHugePages": 0})
        self.assertEqual(self.classify(thp_report(proof, 16), cell, 16), "COHERENT")
        cell = Cell("6.12", "pin", "memfd-thp", "dma-write")
        proof = thp_proof(pmd={"AnonHugePages": 0, "ShmemPmdMapped": 2 << 20})
        self.assertEqual(self.classify(thp_report(proof, file_after=[["g1", 0, N]]), cell),
                         "COHERENT")

    def test_every_missing_or_wrong_piece_is_inconclusive(self) -> None:
        self.assertRegex(self.classify(thp_report(None)), r"^INCONCLUSIVE\(no THP proof\)")
        breaks = {
            "kpageflags unreadable": lambda p: p.update(kpageflags={"error": "EPERM"}),
            "one page not THP": lambda p: p["kpageflags"].update(thp=N - 1),
            "a second head": lambda p: p["kpageflags"].update(heads=[0, 256]),
            "head not first": lambda p: p["kpageflags"].update(heads=[1]),
            "missing pfn": lambda p: p["kpageflags"].update(missing=1),
            "not contiguous": lambda p: p["kpageflags"].update(contiguous=False),
            "not aligned": lambda p: p["kpageflags"].update(first_aligned=False),
            "smaller folio": lambda p: p.update(folio_pages=16),
            "not PMD-mapped": lambda p: p["smaps"].update(AnonHugePages=1 << 20),
            "no smaps": lambda p: p.pop("smaps"),
        }
        for name, brk in breaks.items():
            proof = thp_proof()
            brk(proof)
            obs = self.classify(thp_report(proof))
            self.assertRegex(obs, r"^INCONCLUSIVE\(THP not proven", name)

    def test_the_proof_comes_before_any_class(self) -> None:
        # lost writes would be the class (upper half zero), but the folio is not proven
        cell = Cell("6.12", "pin", "anon-thp", "thp-split")
        g2 = [["g2", 0, N // 2], ["zero", N // 2, N // 2]]
        steps = [{"step": "dma_write_g1", "errno": 0},
                 {"step": "madv_dontneed_half", "errno": 0},
                 {"step": "dma_write_g2", "errno": 0}]
        ok = thp_report(thp_proof(), map_g2=g2, steps=steps)
        self.assertEqual(self.classify(ok, cell), "WRITES_LOST_SILENTLY")
        bad = copy.deepcopy(ok)
        bad["thp"]["kpageflags"]["thp"] = 0
        self.assertTrue(self.classify(bad, cell).startswith("INCONCLUSIVE(THP not proven"))

    def test_madv_collapse_needs_small_pages_and_a_collapsed_control(self) -> None:
        cell = Cell("6.12", "pin", "anon-thp", "madv-collapse")
        steps = [{"step": "dma_write_g1", "errno": 0},
                 {"step": "hugepage_control", "errno": 0},
                 {"step": "collapse_control", "errno": 0},
                 {"step": "hugepage", "errno": 0},
                 {"step": "collapse", "errno": 11, "errno_name": "EAGAIN"},
                 {"step": "dma_write_g2", "errno": 0}]
        rep = thp_report(small_proof(), map_g2=[["g2", 0, N]], steps=steps,
                         thp_control=small_proof(), thp_control_after=thp_proof(),
                         thp_after_event=small_proof(), pfns_after_event=PFNS)
        self.assertEqual(self.classify(rep, cell), "COHERENT")
        # registered as a THP already: not the experiment
        bad = copy.deepcopy(rep)
        bad["thp"] = thp_proof()
        self.assertRegex(self.classify(bad, cell), r"INCONCLUSIVE\(THP not proven: 512 of")
        # the control did not collapse: no evidence MADV_COLLAPSE works here
        bad = copy.deepcopy(rep)
        bad["thp_control_after"] = small_proof()
        self.assertRegex(self.classify(bad, cell), r"INCONCLUSIVE\(MADV_COLLAPSE did not")
        bad = copy.deepcopy(rep)
        bad["steps"][2] = {"step": "collapse_control", "errno": 22, "errno_name": "EINVAL"}
        self.assertRegex(self.classify(bad, cell), r"INCONCLUSIVE\(MADV_COLLAPSE of the")
        bad = copy.deepcopy(rep)
        bad["thp_after_event"]["smaps"]["VmFlags"] = ["rd", "wr", "nh"]
        self.assertRegex(self.classify(bad, cell), r"VM_HUGEPAGE")


if __name__ == "__main__":
    unittest.main()
