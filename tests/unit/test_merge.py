"""``pinlab merge``: shard directories in, one verdicts.json / junit.xml / HTML grid out, and
a clear refusal for shards that do not add up.

The shard directories are written with the same functions ``pinlab matrix`` uses
(``verdicts.document`` and ``write_all``); the guest test ``tests/functional/test_shards.py``
merges real shard runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pinlab.cli import main as cli_main
from pinlab.orchestrator.expectations import expect, load
from pinlab.orchestrator.merge import MergeError, merge
from pinlab.orchestrator.shard import Shard, select_cells
from pinlab.orchestrator.verdicts import FORMAT, cell_of, document, write_all

KERNELS = ["6.12", "6.1"]
TAGS = ["event:dma-write", "event:truncate"]
RULES = load()
IDENTITY = {"6.12": {"release": "6.12.0-test", "kernel": "k1", "kmod": "m1"},
            "6.1": {"release": "6.1.0-test", "kernel": "k2", "kmod": "m2"}}


def write_shard(d: Path, shard: Shard | None, *, wrong: str | None = None,
                kernels: dict[str, Any] | None = None, version: str = "0.1.0",
                expectations: str = "e" * 64, drop: int = 0) -> Path:
    """A shard's output directory: every cell judged as if it had observed its expectation
    (``wrong`` names one cell that observed something else)."""
    sel = select_cells(KERNELS, TAGS, shard)
    ran = {c.kernel for c in sel.cells}     # as pinlab matrix: only the kernels it ran
    kernels = {k: v for k, v in (kernels or IDENTITY).items() if k in ran}
    verdicts = []
    for c in sel.cells[drop:]:
        exp = expect(c, RULES)
        assert exp is not None
        observed = "SOMETHING_ELSE" if c.name == wrong else exp.expected
        v = {"kernel": c.kernel, "mode": c.mode, "backing": c.backing, "event": c.event,
             "options": c.options, "expected": exp.expected, "observed": observed,
             "source": exp.source,
             "verdict": "match" if observed == exp.expected else "mismatch",
             "evidence": {}, "seconds": 1.5}
        art = d / "kernel-x" / c.name.replace("/", "_") / "cell"
        art.mkdir(parents=True)
        (art / "workload.json").write_text("{}")
        v["artifacts"] = str(art)
        verdicts.append(v)
    doc = document(verdicts, list(sel.cells), sel.describe(), kernels,
                   d / "verdicts.json", pinlab={"version": version, "commit": "abc"},
                   expectations=expectations)
    write_all(doc, d)
    return d


class MergeTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pinlab-merge-test-"))
        self.addCleanup(shutil.rmtree, self.tmp)

    def shards(self, n: int = 3, **kw: Any) -> list[Path]:
        return [write_shard(self.tmp / f"shard-{i}-of-{n}", Shard(i, n), **kw)
                for i in range(1, n + 1)]

    def test_merge_equals_unsharded(self) -> None:
        whole = write_shard(self.tmp / "whole", None)
        out = self.tmp / "merged"
        doc = merge(list(reversed(self.shards())), out)   # order of arguments is free
        want = json.loads((whole / "verdicts.json").read_text())
        self.assertEqual(sorted(doc["cells"]), sorted(want["cells"]))
        pick = ("kernel", "mode", "backing", "event", "expected", "observed", "verdict")
        self.assertEqual(sorted(tuple(v[k] for k in pick) for v in doc["verdicts"]),
                         sorted(tuple(v[k] for k in pick) for v in want["verdicts"]))
        self.assertEqual(doc["format"], FORMAT)
        self.assertEqual([s["shard"]["index"] for s in doc["shards"]], [1, 2, 3])
        # artifact links point into the shard directories, relative to the merged one
        for v in doc["verdicts"]:
            self.assertTrue((out / v["artifacts"] / "workload.json").is_file(), v["artifacts"])
        junit = ET.parse(out / "junit.xml").getroot()
        self.assertEqual(int(junit.get("tests", -1)), len(want["cells"]))
        self.assertEqual(int(junit.get("failures", -1)), 0)
        page = (out / "html" / "index.html").read_text()
        self.assertIn(f"{len(want['cells'])} cells: match {len(want['cells'])}", page)

    def test_mismatch_is_kept_and_fails(self) -> None:
        wrong = select_cells(KERNELS, TAGS, Shard(2, 3)).cells[0].name
        dirs = [write_shard(self.tmp / f"s{i}", Shard(i, 3),
                            wrong=wrong if i == 2 else None) for i in (1, 2, 3)]
        out = self.tmp / "merged"
        self.assertEqual(cli_main(["merge", *map(str, dirs), "--out", str(out)]), 1)
        doc = json.loads((out / "verdicts.json").read_text())
        bad = [v for v in doc["verdicts"] if v["verdict"] != "match"]
        self.assertEqual([cell_of(v).name for v in bad], [wrong])
        junit = ET.parse(out / "junit.xml").getroot()
        self.assertEqual(int(junit.get("errors", 0)) + int(junit.get("failures", 0)), 1)
        self.assertEqual(cli_main(["merge", *map(str, self.shards(2)), "--out",
                                   str(self.tmp / "ok")]), 0)

    def refused(self, dirs: list[Path], *needles: str) -> str:
        with self.assertRaises(MergeError) as cm:
            merge(dirs, self.tmp / "merged")
        msg = str(cm.exception)
        for n in needles:
            self.assertIn(n, msg)
        self.assertEqual(cli_main(["merge", *map(str, dirs), "--out",
                                   str(self.tmp / "cli")]), 2)
        return msg

    def test_missing_shard(self) -> None:
        s = self.shards()
        self.refused([s[0], s[2]], "missing: 2/3")

    def test_duplicate_shard(self) -> None:
        s = self.shards()
        again = shutil.copytree(s[1], self.tmp / "again")
        self.refused([*s, again], "more than once", "2/3", str(s[1]), str(again))

    def test_different_versions(self) -> None:
        s = self.shards()
        other = write_shard(self.tmp / "other", Shard(3, 3), version="0.2.0")
        self.refused([s[0], s[1], other], "pinlab versions", "0.2.0", str(other))

    def test_different_expectations(self) -> None:
        s = self.shards()
        other = write_shard(self.tmp / "other", Shard(1, 3), expectations="f" * 64)
        self.refused([other, s[1], s[2]], "expectations", str(other))

    def test_different_kernels(self) -> None:
        s = self.shards()
        kernels = [{c.kernel for c in select_cells(KERNELS, TAGS, Shard(i, 3)).cells}
                   for i in (1, 2, 3)]
        self.assertEqual(kernels, [{"6.12"}, {"6.12", "6.1"}, {"6.1"}])
        changed = {**IDENTITY, "6.1": {**IDENTITY["6.1"], "kernel": "k2-rebuilt"}}
        other = write_shard(self.tmp / "other", Shard(3, 3), kernels=changed)
        self.refused([s[0], s[1], other], "kernel 6.1", "k2-rebuilt", str(other))
        # shard 1 ran no 6.1 cell, so it records no 6.1 build and cannot disagree
        doc = merge(s, self.tmp / "ok")
        self.assertEqual(doc["kernels"], IDENTITY)

    def test_different_totals(self) -> None:
        a, b = self.shards(2), self.shards(3)
        self.refused([a[0], b[1], b[2]], "shard total")

    def test_cells_of_another_split(self) -> None:
        s = self.shards()
        doc = json.loads((s[1] / "verdicts.json").read_text())
        doc["cells"], doc["verdicts"] = doc["cells"][1:], doc["verdicts"][1:]
        (s[1] / "verdicts.json").write_text(json.dumps(doc))
        self.refused(s, str(s[1]), "1 missing")

    def test_not_an_output_directory(self) -> None:
        s = self.shards()
        (self.tmp / "empty").mkdir()
        self.refused([s[0], s[1], self.tmp / "empty"], "no verdicts.json")
        (s[2] / "verdicts.json").write_text("[]")   # the old list format
        self.refused(s, "format")

    def test_cell_without_verdict_is_an_error(self) -> None:
        d = write_shard(self.tmp / "partial", Shard(1, 1), drop=1)
        doc = json.loads((d / "verdicts.json").read_text())
        self.assertEqual(doc["verdicts"][0]["observed"], "MISSING")
        self.assertEqual(doc["verdicts"][0]["verdict"], "error")
        self.assertEqual(len(doc["verdicts"]), len(doc["cells"]))


if __name__ == "__main__":
    unittest.main()
