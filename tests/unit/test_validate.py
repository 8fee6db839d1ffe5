"""`pinlab validate`'s comparison, flake policy, exit codes and reports, on verdicts recorded
from real runs (tests/data/validate/README.md says how each file was recorded)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
from kcidb_io.schema import LATEST

from pinlab.orchestrator import compare
from pinlab.orchestrator.cells import all_cells, select
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.harm import UnknownClass, load
from pinlab.orchestrator.validate_report import junit, kcidb, ktap, markdown, write_all

DATA = Path(__file__).resolve().parents[1] / "data" / "validate"
TABLE = load()


def matrix(kernel: str) -> dict[str, dict[str, Any]]:
    """A recorded `pinlab matrix --tags mode:longterm` run: cell id -> first attempt."""
    rows = json.loads((DATA / f"matrix-{kernel}-longterm.json").read_text())
    return {f"{r['mode']}/{r['backing']}/{r['event']}": {**r, "n": 1, "why": "first",
                                                          "fresh": False} for r in rows}


def validate_doc(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def again(a: dict[str, Any], n: int, **changes: Any) -> dict[str, Any]:
    """A recorded attempt as attempt ``n`` of a rerun (real record, renumbered)."""
    return {**copy.deepcopy(a), "n": n, "why": "rerun", "fresh": True, **changes}


class RecordedMatrices(unittest.TestCase):
    """Debian 6.1 vs 6.12, longterm slice, first attempts as `pinlab matrix` recorded them."""

    def setUp(self) -> None:
        self.m61, self.m612 = matrix("6.1"), matrix("6.12")
        self.assertEqual(set(self.m61), set(self.m612))
        self.assertEqual(len(self.m61), 60)

    def test_the_6_5_check_fixes_data_loss_and_changes_the_rest(self) -> None:
        """6.1 -> 6.12: longterm ext4/xfs cells that lose data (or write back stale data) on
        6.1 become PIN_REFUSED(EFAULT): fix; the other ext4/xfs cells: changed; every other
        backing: unchanged."""
        seen = {}
        for cid, b in self.m61.items():
            c = self.m612[cid]
            d = compare.decide([b], [c], TABLE)
            seen[cid] = d["result"]
            if c["backing"] in ("ext4", "xfs"):
                self.assertEqual(c["observed"], "PIN_REFUSED(EFAULT)", cid)
                want = "fix" if TABLE.harm(b["observed"]) > 0 else "changed"
            else:
                want = "unchanged"
            self.assertEqual(d["result"], want, (cid, b["observed"], c["observed"], d))
            self.assertTrue(compare.differs([b], [c], TABLE) == (want != "unchanged"))
        self.assertEqual(sum(r == "fix" for r in seen.values()), 9)
        self.assertEqual(sum(r == "changed" for r in seen.values()), 13)
        self.assertEqual(compare.exit_code(seen.values()), 0)

    def test_reverting_the_check_is_a_regression_where_data_is_lost(self) -> None:
        """6.12 -> 6.1 (what a patch dropping the 6.5 check does): the cells that now lose
        data are regressions, the rest changed; the run exits 1."""
        results = {cid: compare.decide([self.m612[cid]], [b], TABLE)["result"]
                   for cid, b in self.m61.items()}
        lost = {cid for cid, b in self.m61.items()
                if b["backing"] in ("ext4", "xfs") and TABLE.harm(b["observed"]) > 0}
        self.assertEqual({c for c, r in results.items() if r == "regression"}, lost)
        self.assertIn("longterm/ext4/truncate", lost)
        self.assertEqual(compare.exit_code(results.values()), 1)

    def test_a_difference_that_does_not_reproduce_is_flaky(self) -> None:
        cid = "longterm/ext4/truncate"
        b, c = self.m61[cid], self.m612[cid]
        coherent = self.m61["longterm/ext4/dma-write"]      # a real COHERENT record
        base = [b] + [again(b, n) for n in (2, 3, 4)]
        cand = [c, again(c, 2), again(coherent, 3), again(c, 4)]
        d = compare.decide(base, cand, TABLE)
        self.assertEqual(d["result"], "flaky", d)
        self.assertIn("PIN_REFUSED(EFAULT) 3/4", d["reason"])
        # the same on the base side
        d = compare.decide([b, again(b, 2), again(coherent, 3)], [c] * 3, TABLE)
        self.assertEqual(d["result"], "flaky", d)
        # and every attempt agreeing: a fix
        d = compare.decide(base, [c] + [again(c, n) for n in (2, 3, 4)], TABLE)
        self.assertEqual(d["result"], "fix", d)
        self.assertEqual(compare.exit_code(["flaky", "fix", "unchanged"]), 0)

    def test_infrastructure_is_never_a_regression(self) -> None:
        cid = "longterm/memfd/truncate"
        b = self.m612[cid]
        broken = [again(b, n, observed=o, why="infra-retry" if n > 1 else "first")
                  for n, o in ((1, "ERROR"), (2, "INCONCLUSIVE(no audit records)"),
                               (3, "QEMU_CRASHED"))]
        self.assertTrue(compare.needs_infra_retry(broken[:1], TABLE))
        self.assertTrue(compare.needs_infra_retry(broken[:2], TABLE))
        self.assertFalse(compare.needs_infra_retry(broken, TABLE), "only two retries")
        d = compare.decide([b], broken, TABLE)
        self.assertEqual(d["result"], "infra-error", d)
        self.assertFalse(compare.differs([b], broken, TABLE))
        self.assertEqual(compare.exit_code(["fix", d["result"]]), 2)
        # a retry that worked: compared on the usable attempt only
        fixed = [*broken[:2], again(b, 3, why="infra-retry")]
        self.assertEqual(compare.decide([b], fixed, TABLE)["result"], "unchanged")
        # a regression elsewhere wins over incomplete
        self.assertEqual(compare.exit_code(["infra-error", "regression"]), 1)

    def test_unranked_class_is_an_error_not_harmless(self) -> None:
        b = self.m61["longterm/anon/dma-write"]
        with self.assertRaises(UnknownClass):
            compare.decide([b], [again(b, 1, observed="SOMETHING_NEW")], TABLE)


class RecordedLongtermRun(unittest.TestCase):
    """The whole longterm slice through `pinlab validate`, 6.1 -> 6.12 (--reruns 1)."""

    def test_results_and_every_class_agree_with_the_matrix(self) -> None:
        from pinlab.orchestrator.expectations import Cell, expect
        from pinlab.orchestrator.expectations import load as load_rules

        doc = validate_doc("validate-6.1-to-6.12-longterm-all.json")
        rules = load_rules()
        m61, m612 = matrix("6.1"), matrix("6.12")
        counts: dict[str, int] = {}
        for r in doc["results"]:
            d = compare.decide(r["attempts"]["base"], r["attempts"]["candidate"], TABLE)
            self.assertEqual(d["result"], r["result"], r["cell"])
            counts[r["result"]] = counts.get(r["result"], 0) + 1
            mode, backing, event = r["cell"].split("/")
            for role, kernel, m in (("base", "6.1", m61), ("candidate", "6.12", m612)):
                exp = expect(Cell(kernel, mode, backing, event), rules)
                assert exp is not None
                for a in r["attempts"][role]:
                    self.assertEqual(a["observed"], exp.expected, (r["cell"], role))
                    # and with the kernel's own matrix run
                    self.assertEqual(a["observed"], m[r["cell"]]["observed"], r["cell"])
            if r["result"] == "fix":
                self.assertIn(r["base"], ("WRITES_LOST_SILENTLY", "WRITEBACK_STALE"))
        self.assertEqual(counts, {"fix": 9, "changed": 13, "unchanged": 38})
        self.assertEqual(doc["exit_code"], 0)


def without_base_warn(doc: dict[str, Any]) -> dict[str, Any]:
    """The recorded gup/ext4 run with the base's one WARN attempt left out (real records,
    one dropped): the candidate's WARN is then new, and the run a regression."""
    doc = copy.deepcopy(doc)
    for r in doc["results"]:
        if r["cell"] == "gup/ext4/memcg-reclaim":
            r["attempts"]["base"] = [a for a in r["attempts"]["base"]
                                     if not a["error_signatures"]]
            r.update(compare.decide(r["attempts"]["base"], r["attempts"]["candidate"], TABLE))
    doc["exit_code"] = compare.exit_code(r["result"] for r in doc["results"])
    return doc


class RecordedSignatures(unittest.TestCase):
    """Real WARNs: Debian 6.12 as base, 6.1 as candidate, gup on ext4. On 6.1
    memory.reclaim strips the buffers of the pinned page every time (WARN in
    ext4_dirty_folio, data lost); on 6.12 it did so in 1 of 4 fresh runs."""

    def setUp(self) -> None:
        self.doc = validate_doc("validate-6.12-to-6.1-gup-ext4.json")
        self.by = {r["cell"]: r for r in self.doc["results"]}

    def test_recorded_results_follow_from_the_recorded_attempts(self) -> None:
        for r in self.doc["results"]:
            d = compare.decide(r["attempts"]["base"], r["attempts"]["candidate"], TABLE)
            self.assertEqual(d["result"], r["result"], r["cell"])
        self.assertEqual(compare.exit_code(r["result"] for r in self.doc["results"]),
                         self.doc["exit_code"])

    def test_a_warn_the_base_also_showed_is_not_new_and_the_cell_is_flaky(self) -> None:
        r = self.by["gup/ext4/memcg-reclaim"]
        self.assertEqual(r["result"], "flaky", r["reason"])
        self.assertEqual(r["new_signatures"], [])
        base = [a["observed"] for a in r["attempts"]["base"]]
        self.assertEqual(base.count("COHERENT"), 3)
        self.assertEqual(base.count("EXT4_WARN_DATA_LOST"), 1)
        self.assertEqual(self.doc["exit_code"], 0)

    def test_new_warn_is_a_regression_even_once(self) -> None:
        r = self.by["gup/ext4/memcg-reclaim"]
        clean = [a for a in r["attempts"]["base"] if not a["error_signatures"]]
        warn = r["attempts"]["candidate"]
        d = compare.decide(clean, warn, TABLE)
        self.assertEqual(d["result"], "regression", d)
        self.assertIn("WARNING:at_fs/ext4/inode.c:#ext4_dirty_folio", d["new_signatures"])
        # once among clean, coherent attempts: still a regression
        cand = [again(clean[0], 1), again(warn[1], 2), again(clean[1], 3)]
        d = compare.decide(clean, cand, TABLE)
        self.assertEqual(d["result"], "regression", d)
        self.assertIn("1/3 attempts", d["reason"])
        # the other way round (6.1 -> 6.12 without the flake): a fix
        d = compare.decide(warn, clean, TABLE)
        self.assertEqual(d["result"], "fix", d)
        # same class, and a signature the base logged every time is gone: a fix
        same = [again(a, a["n"], error_signatures=[], signatures={}) for a in warn]
        d = compare.decide(warn, same, TABLE)
        self.assertEqual(d["result"], "fix", d)
        self.assertIn("no longer logs", d["reason"])

    def test_signatures_are_the_same_across_kernel_versions(self) -> None:
        r = self.by["gup/ext4/2018"]
        self.assertEqual(r["result"], "unchanged", r["reason"])
        b = r["attempts"]["base"][0]["error_signatures"]
        c = r["attempts"]["candidate"][0]["error_signatures"]
        self.assertIn("WARNING:at_fs/ext4/inode.c:#ext4_dirty_folio", b)
        self.assertEqual(b, c)      # 6.12's and 6.1's line numbers differ; signatures do not

    def test_signature_of_recorded_lines(self) -> None:
        for a in (a for r in self.doc["results"] for role in ("base", "candidate")
                  for a in r["attempts"][role]):
            dm = Path(a["artifacts"]) / "dmesg.txt"
            if not dm.exists():      # artifacts live outside the repository
                continue
            self.assertEqual(sorted(classify(dm.read_text()).signatures(
                TABLE.regression_dmesg)), a["error_signatures"])
        rep = classify("[ 1.0] WARNING: CPU: 1 PID: 9 at fs/ext4/inode.c:3937 "
                       "ext4_dirty_folio+0x4b/0x60 [ext4]\n"
                       "[ 1.1] RIP: 0010:ext4_dirty_folio+0x28/0x30 [ext4]\n"
                       "[ 1.2]  ext4_dirty_folio+0x4b/0x60 [ext4]\n"
                       "[ 2.0] WARNING: fs/ext4/inode.c:3912 at ext4_dirty_folio+0x4b/0x60, "
                       "CPU#0: python3/77\n")
        self.assertEqual(rep.signatures(), {"WARNING:at_fs/ext4/inode.c:#ext4_dirty_folio": 2})
        # a pfn is printed in hex without 0x: every pfn gives the same signature
        pfns = classify("[ 3.0] migrating pfn 10003e failed ret:1\n"
                        "[ 3.1] migrating pfn 1000fb failed ret:1\n"
                        "[ 3.2] migrating pfn 1034560 failed ret:16\n")
        self.assertEqual(pfns.signatures(), {"migrating_pfn_#_failed_ret:#": 3})


class Reports(unittest.TestCase):
    """Every report is written from a recorded validate.json."""

    def setUp(self) -> None:
        gup = validate_doc("validate-6.12-to-6.1-gup-ext4.json")
        self.docs = [validate_doc("validate-6.1-to-6.12-longterm.json"), gup,
                     without_base_warn(gup)]

    def test_kcidb_validates_and_validation_can_fail(self) -> None:
        want = {"regression": "FAIL", "fix": "PASS", "changed": "PASS", "unchanged": "PASS",
                "flaky": "DONE", "infra-error": "MISS"}
        for doc in self.docs:
            data = kcidb(doc, "validate-test")
            LATEST.validate(data)
            self.assertEqual(len(data["tests"]), 2 * len(doc["results"]))
            statuses = sorted(t["status"] for t in data["tests"] if ":candidate:" in t["id"])
            self.assertEqual(statuses, sorted(want[r["result"]] for r in doc["results"]))
            bad = copy.deepcopy(data)
            bad["tests"][0]["status"] = "REGRESSION"
            with self.assertRaises(jsonschema.ValidationError):
                LATEST.validate(bad)
            bad = copy.deepcopy(data)
            bad["tests"][0]["path"] = "pinlab longterm"
            with self.assertRaises(jsonschema.ValidationError):
                LATEST.validate(bad)

    def test_flaky_and_regression_in_junit_ktap_markdown(self) -> None:
        flaky, regression = self.docs[1], self.docs[2]
        suite = ET.fromstring(junit(flaky))
        self.assertEqual((suite.get("failures"), suite.get("skipped")), ("0", "1"))
        self.assertEqual(len(suite.findall("testcase/skipped")), 1)
        self.assertIn("ok 1 pinlab.gup.ext4.memcg-reclaim # SKIP flaky",
                      ktap(flaky).splitlines())
        md = markdown(flaky)
        self.assertIn("no regression (exit 0)", md)
        self.assertIn("### flaky: gup/ext4/memcg-reclaim", md)
        # base: the flaky WARN once plus 2018; candidate: every attempt
        self.assertIn("| `WARNING:at_fs/ext4/inode.c:#ext4_dirty_folio` | 2/5 | 5/5 |", md)

        self.assertEqual(regression["exit_code"], 1)
        suite = ET.fromstring(junit(regression))
        self.assertEqual(suite.get("failures"), "1")
        self.assertEqual(len(suite.findall("testcase/failure")), 1)
        self.assertEqual(len(suite.findall("testcase")), 2)
        lines = ktap(regression).splitlines()
        self.assertEqual(lines[:1] + lines[2:3], ["KTAP version 1", "1..2"])
        self.assertIn("not ok 1 pinlab.gup.ext4.memcg-reclaim", lines)
        self.assertIn("ok 2 pinlab.gup.ext4.2018", lines)
        md = markdown(regression)
        self.assertIn("REGRESSION (exit 1)", md)
        self.assertIn("### regression: gup/ext4/memcg-reclaim", md)

    def test_write_all(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            paths = write_all(self.docs[0], Path(d))
            for p in paths.values():
                self.assertTrue(p.stat().st_size > 0, p)
            self.assertEqual(json.loads(paths["json"].read_text()), self.docs[0])
            self.assertIn("<table", paths["html"].read_text())


class Replay:
    """Answers a Validation's requests with a recorded run's attempts, in their order, and
    notes what was asked (role, cell, fresh)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.queue = {(role, r["cell"]): list(r["attempts"][role])
                      for r in doc["results"] for role in ("base", "candidate")}
        self.asked: list[tuple[str, str, bool]] = []

    def __call__(self, subject: Any, cell: Any, art: Path,
                 fresh: bool) -> tuple[dict[str, Any] | None, str | None]:
        cid = f"{cell.mode}/{cell.backing}/{cell.event}"
        self.asked.append((subject.role, cid, fresh))
        a = self.queue[(subject.role, cid)].pop(0)
        if a.get("pool_error"):
            return None, a["pool_error"]
        return {"observed": a["observed"], "evidence": {"dmesg": a["dmesg"]},
                "boot": a.get("boot"), "release": a.get("release"), "seconds": 1.0}, None


class Scheduling(unittest.TestCase):
    """The runner asks for exactly the attempts the recorded run made: a first pass, an
    infrastructure retry on a fresh guest, and reruns on fresh guests on both kernels of
    the cells that differ."""

    def test_replay_of_a_recorded_run(self) -> None:
        from pinlab.orchestrator.cells import all_cells, select
        from pinlab.orchestrator.validate import Plan, Validation, prebuilt

        doc = validate_doc("validate-6.1-to-6.12-longterm.json")
        replay = Replay(doc)
        # the cells the recorded run had (option cells came later)
        had = {r["cell"] for r in doc["results"]}
        cells = [c for c in select(all_cells("6.1"), doc["tags"])
                 if f"{c.mode}/{c.backing}/{c.variant}" in had]
        plan = Plan(prebuilt("base", "6.1"), prebuilt("candidate", "6.12"), cells,
                    doc["tags"], reruns=3)
        with tempfile.TemporaryDirectory() as d:
            results = Validation(plan, Path(d), TABLE, runner=replay).run()
        self.assertEqual({r["cell"]: r["result"] for r in results},
                         {r["cell"]: r["result"] for r in doc["results"]})
        self.assertEqual([q for q in replay.queue.values() if q], [], "attempts left over")
        recorded = {(role, r["cell"]): [(a["why"], a["fresh"]) for a in r["attempts"][role]]
                    for r in doc["results"] for role in ("base", "candidate")}
        for r in results:
            for role in ("base", "candidate"):
                self.assertEqual([(a["why"], a["fresh"]) for a in r["attempts"][role]],
                                 recorded[(role, r["cell"])], (role, r["cell"]))
        infra = [a for r in results for a in r["attempts"]["candidate"] if a["infra"]]
        self.assertTrue(infra, "the recorded run had a boot that timed out")
        self.assertIn("READY marker", infra[0]["pool_error"])
        # unchanged cells are not re-run; differing ones 3 times on each side
        unchanged = [r for r in results if r["result"] == "unchanged"]
        self.assertTrue(unchanged)
        for r in unchanged:
            self.assertEqual(len(r["attempts"]["base"]), 1)


class CommandLine(unittest.TestCase):
    """Bad input ends with exit 2 before anything boots."""

    def test_bad_input_exits_2(self) -> None:
        from pinlab.cli import main

        for argv in (["--base-kernel", "6.1"],
                     ["--base-kernel", "6.1", "--candidate-kernel", "9.9"],
                     ["--base-kernel", "6.12", "--candidate-kernel", "6.12"],
                     ["--base-kernel", "6.1", "--candidate-kernel", "6.12",
                      "--tags", "mode:none"],
                     ["--base-kernel", "6.1", "--candidate-kernel", "6.12",
                      "--tags", "mode:gup,,event:fork"],
                     ["--base-kernel", "6.1", "--candidate-kernel", "6.12", "--reruns", "0"],
                     ["--base-kernel", "6.1", "--candidate-kernel", "6.12", "--no-base-cache",
                      "--tags", "mode:none"],
                     ["--base-kernel", "6.1", "--candidate-kernel", "6.12", "--shard", "4/3"],
                     ["--base-kernel", "6.1", "--candidate-kernel", "6.12", "--shard", "x"],
                     ["--base", "debian:6.12"],                        # no candidate
                     ["--base", "debian:6.12", "--candidate", "HEAD"],  # a REV needs --tree
                     ["--base", "debian:6.12", "--candidate", "HEAD", "--patch", "x.patch"],
                     ["--base-image", "/nonexistent/bzImage"]):
            with self.subTest(argv=argv):
                self.assertEqual(main(["validate", *argv]), 2)

    def test_shard_of_the_selection(self) -> None:
        """--shard splits the selected cells as `pinlab matrix --shard` does; a shard left
        with no cell has nothing to validate and says so without booting (exit 0)."""
        from pinlab.cli import main
        from pinlab.orchestrator.cells import all_cells, select
        from pinlab.orchestrator.shard import split

        one = select(all_cells("6.1"), ["mode:longterm,backing:ext4,event:truncate,-option"])
        self.assertEqual(len(one), 1)
        self.assertEqual([len(p) for p in split(one, 2)], [1, 0])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["validate", "--base-kernel", "6.1", "--candidate-kernel", "6.12",
                         "--tags", "mode:longterm,backing:ext4,event:truncate,-option",
                         "--shard", "2/2"])
        self.assertEqual(code, 0)
        self.assertIn("shard 2/2: 0 of 1 selected cells", out.getvalue())


class TagSelection(unittest.TestCase):
    def test_avocado_semantics(self) -> None:
        cells = all_cells("6.1")
        lt = select(cells, ["mode:longterm"])
        self.assertEqual(len(lt), len([c for c in cells if c.mode == "longterm"]))
        self.assertGreaterEqual(len(lt), 60)
        both = select(cells, ["mode:longterm,backing:ext4,event:truncate,-option",
                              "mode:pin,backing:xfs,event:dma-write,-option"])
        self.assertEqual([c.name for c in both],
                         ["6.1/pin/xfs/dma-write", "6.1/longterm/ext4/truncate"])
        # negation as Avocado does it: a plain tag can be negated ("-smoke"); a key:value
        # one ("-backing:anon") is not, so validate selects what `avocado run` would run
        from pinlab.orchestrator.cells import smoke
        no_smoke = select(cells, ["mode:gup,-smoke"])
        self.assertTrue(no_smoke)
        self.assertFalse(any(c in smoke(cells) or c.mode != "gup" for c in no_smoke))
        self.assertEqual(select(cells, ["mode:none"]), [])
        with self.assertRaises(ValueError):
            select(cells, ["mode:gup,,event:fork"])
        # a built kernel's version is not known: it gets every backing, as 6.12 has them
        self.assertEqual(len(all_cells("build:abc", known_only=False)),
                         len(all_cells("6.12")))


if __name__ == "__main__":
    unittest.main()
