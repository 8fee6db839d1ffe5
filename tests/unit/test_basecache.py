"""The base kernel's cached first pass (orchestrator/basecache.py): what changes its key,
and a second `pinlab validate` against the same base reusing it, replayed from a recorded
run (tests/data/validate/), while the reruns of differing cells still run on both kernels."""

from __future__ import annotations

import json
import tempfile
import unittest
from pathlib import Path
from typing import Any

from pinlab.orchestrator.basecache import (
    REPO,
    BaseCache,
    cache_key,
    code_digest,
    key_parts,
)
from pinlab.orchestrator.cells import all_cells, select
from pinlab.orchestrator.harm import load
from pinlab.orchestrator.validate import Plan, Validation, cell_id, prebuilt

DATA = Path(__file__).resolve().parents[1] / "data" / "validate"
TABLE = load()


def parts(**changes: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "kernel": {"id": "build:746aee5c06adc2e0", "release": "6.12.117-pinlab-746aee5c",
                   "build": "746aee5c06adc2e0", "image": "e02d3e85fe5b93a1",
                   "rootfs": "cadc2157ca16e219", "qemu": "b109c06ef92e9974",
                   "qemu_version": "QEMU emulator version 11.1.3"},
        "kmod": "a" * 64, "expectations": {"table": "b" * 64, "kernel": "6.12"},
        "harm": "c" * 64, "code": {"version": "0.1.0", "sha256": "d" * 64},
        "accel": "tcg", "cells": ["longterm/ext4/truncate", "longterm/xfs/truncate"],
        "infra_retries": 2}
    p.update(changes)
    return key_parts(**p)


class Key(unittest.TestCase):
    def test_same_inputs_same_key(self) -> None:
        self.assertEqual(cache_key(parts()), cache_key(parts()))
        self.assertEqual(len(cache_key(parts())), 24)

    def test_everything_that_can_change_a_verdict_changes_the_key(self) -> None:
        k0 = cache_key(parts())
        base = parts()
        variants = {
            "another kernel": {"kernel": {**base["kernel"], "id": "build:2530a6bdb81497b7"}},
            "rebuilt initramfs": {"kernel": {**base["kernel"], "image": "0" * 16}},
            "another rootfs": {"kernel": {**base["kernel"], "rootfs": "0" * 16}},
            "another QEMU": {"kernel": {**base["kernel"], "qemu": "0" * 16}},
            "PINLAB_QEMU's QEMU": {"kernel": {**base["kernel"],
                                              "qemu_version": "QEMU emulator version 10.2.0"}},
            "another pinlab.ko": {"kmod": "e" * 64},
            "another expectations table": {"expectations": {"table": "f" * 64,
                                                            "kernel": "6.12"}},
            "other expectation rows": {"expectations": {"table": "b" * 64, "kernel": None}},
            "another harm table": {"harm": "0" * 64},
            "other cell code": {"code": {"version": "0.1.0", "sha256": "1" * 64}},
            "another version": {"code": {"version": "0.2.0", "sha256": "d" * 64}},
            "kvm": {"accel": "kvm"},
            "cells in another order": {"cells": ["longterm/xfs/truncate",
                                                 "longterm/ext4/truncate"]},
            "fewer cells": {"cells": ["longterm/ext4/truncate"]},
            "fewer infra retries": {"infra_retries": 1},
        }
        keys = {name: cache_key(parts(**ch)) for name, ch in variants.items()}
        for name, k in keys.items():
            self.assertNotEqual(k, k0, name)
        self.assertEqual(len(set(keys.values())), len(keys), "two variants share a key")

    def test_code_digest_follows_the_cell_code_only(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            (root / "orchestrator").mkdir()
            (root / "guest").mkdir(parents=True)
            (root / "orchestrator" / "classify.py").write_text("X = 1\n")
            (root / "guest" / "pinlab_cell.py").write_text("Y = 1\n")
            d0 = code_digest(root)
            (root / "README.md").write_text("measured figures\n")
            (root / "orchestrator" / "__pycache__").mkdir()
            (root / "orchestrator" / "__pycache__" / "classify.cpython-311.pyc").write_bytes(
                b"\0")
            self.assertEqual(code_digest(root), d0, "docs or bytecode changed the key")
            (root / "guest" / "pinlab_cell.py").write_text("Y = 2\n")
            d1 = code_digest(root)
            self.assertNotEqual(d1, d0)
            (root / "orchestrator" / "classify.py").rename(root / "orchestrator" / "c.py")
            self.assertNotEqual(code_digest(root), d1, "a rename kept the key")
        with tempfile.TemporaryDirectory() as d, self.assertRaises(FileNotFoundError):
            code_digest(Path(d))
        self.assertRegex(code_digest(REPO), "^[0-9a-f]{64}$")


class Replay:
    """Answers a Validation's requests with a recorded run's attempts (skipping, per role,
    those whose ``why`` is in ``skip``) and notes what was asked (role, cell, fresh)."""

    def __init__(self, doc: dict[str, Any], skip: dict[str, set[str]] | None = None) -> None:
        skip = skip or {}
        self.queue = {(role, r["cell"]): [a for a in r["attempts"][role]
                                          if a["why"] not in skip.get(role, set())]
                      for r in doc["results"] for role in ("base", "candidate")}
        self.asked: list[tuple[str, str, bool]] = []

    def __call__(self, subject: Any, cell: Any, art: Path,
                 fresh: bool) -> tuple[dict[str, Any] | None, str | None]:
        cid = cell_id(cell)
        self.asked.append((subject.role, cid, fresh))
        a = self.queue[(subject.role, cid)].pop(0)
        (art / "dmesg.txt").write_text("")
        if a.get("pool_error"):
            return None, a["pool_error"]
        return {"observed": a["observed"], "evidence": {"dmesg": a["dmesg"]},
                "boot": a.get("boot"), "release": a.get("release"), "seconds": 1.0}, None


class Reuse(unittest.TestCase):
    """A recorded 6.1 -> 6.12 longterm validation, replayed twice with a cache between."""

    def setUp(self) -> None:
        self.doc = json.loads((DATA / "validate-6.1-to-6.12-longterm.json").read_text())
        # the cells the recorded run had (option cells came later)
        had = {r["cell"] for r in self.doc["results"]}
        self.cells = [c for c in select(all_cells("6.1"), self.doc["tags"])
                      if f"{c.mode}/{c.backing}/{c.variant}" in had]
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.root = Path(self.tmp.name)

    def validation(self, name: str, runner: Replay, cells: list[Any] | None = None,
                   cache: bool = True) -> Validation:
        cells = cells or self.cells
        plan = Plan(prebuilt("base", "6.1"), prebuilt("candidate", "6.12"), cells,
                    self.doc["tags"], reruns=3)
        bc = BaseCache.for_parts(parts(cells=[cell_id(c) for c in cells]),
                                 self.root / "cache") if cache else None
        return Validation(plan, self.root / name, TABLE, runner=runner, base_cache=bc)

    def test_second_run_reuses_the_base_and_reruns_still_run_on_both(self) -> None:
        recorded = {r["cell"]: r["result"] for r in self.doc["results"]}
        first = self.validation("run-1", Replay(self.doc))
        r1 = first.run()
        self.assertEqual({r["cell"]: r["result"] for r in r1}, recorded)
        self.assertEqual(first.cache_state["stored"], True)
        self.assertFalse(first.cache_state["used"])
        entry = json.loads((Path(first.cache_state["path"]) / "base.json").read_text())
        self.assertEqual(set(entry["cells"]), set(recorded))
        # only the first pass is kept: no rerun, every cell's first attempt
        for cid, recs in entry["cells"].items():
            self.assertEqual([a["why"] for a in recs][:1], ["first"], cid)
            self.assertNotIn("rerun", [a["why"] for a in recs], cid)

        replay = Replay(self.doc, skip={"base": {"first", "infra-retry"}})
        second = self.validation("run-2", replay)
        r2 = second.run()
        self.assertTrue(second.cache_state["used"])
        self.assertEqual(second.cache_state["run"], str(self.root / "run-1"))
        self.assertEqual({r["cell"]: r["result"] for r in r2}, recorded)
        self.assertEqual([q for q in replay.queue.values() if q], [], "attempts left over")
        base_asked = [(cid, fresh) for role, cid, fresh in replay.asked if role == "base"]
        differ = {r["cell"] for r in r1 if len(r["attempts"]["base"]) > 1}
        self.assertTrue(differ)
        # the base is asked only for reruns of the cells that differ, on fresh guests
        self.assertEqual({cid for cid, _ in base_asked}, differ)
        self.assertTrue(all(fresh for _, fresh in base_asked))
        self.assertEqual(len(base_asked), 3 * len(differ))
        # and the candidate ran its whole first pass plus those reruns
        cand = [cid for role, cid, _ in replay.asked if role == "candidate"]
        self.assertEqual(set(cand), set(recorded))
        for r in r2:
            a = r["attempts"]["base"][0]
            self.assertEqual(a["cached"]["key"], second.cache_state["key"], r["cell"])
            self.assertTrue(Path(a["artifacts"]).is_dir())
            self.assertTrue(a["artifacts"].startswith(str(self.root / "run-2")))
            for rerun in r["attempts"]["base"][1:]:
                self.assertNotIn("cached", rerun)
                self.assertTrue(rerun["fresh"])

    def test_another_selection_or_no_cache_runs_the_base(self) -> None:
        self.validation("run-1", Replay(self.doc)).run()
        fewer = self.cells[:2]
        replay = Replay(self.doc)
        v = self.validation("run-2", replay, cells=fewer)
        self.assertIsNone(v.base_cache.load())
        v.run()
        self.assertFalse(v.cache_state["used"])
        self.assertIn(("base", cell_id(fewer[0]), False), replay.asked)
        replay = Replay(self.doc)
        v = self.validation("run-3", replay, cache=False)
        v.run()
        self.assertIsNone(v.cache_state)
        self.assertEqual(sum(1 for role, _, fresh in replay.asked
                             if role == "base" and not fresh), len(self.cells))

    def test_a_base_without_a_usable_attempt_is_not_stored(self) -> None:
        bc = BaseCache.for_parts(parts(), self.root / "cache")
        art = self.root / "a"
        art.mkdir()
        ok = {"n": 1, "why": "first", "observed": "PIN_REFUSED(EFAULT)", "artifacts": str(art)}
        bad = [{**ok, "observed": "ERROR"}, {**ok, "n": 2, "why": "infra-retry",
                                             "observed": "INCONCLUSIVE(no audit)"}]
        self.assertFalse(bc.store({"longterm/ext4/truncate": [ok],
                                   "longterm/xfs/truncate": bad}, self.root, TABLE.is_infra))
        self.assertFalse(bc.path.exists())
        self.assertIsNone(bc.load())
        self.assertTrue(bc.store({"longterm/ext4/truncate": [ok],
                                  "longterm/xfs/truncate": [*bad, {**ok, "n": 3}]},
                                 self.root, TABLE.is_infra))
        self.assertEqual(len(bc.load()["cells"]["longterm/xfs/truncate"]), 3)
        # an entry whose recorded parts are not the key's is never used
        other = BaseCache(bc.root, bc.key, parts(accel="kvm"))
        self.assertIsNone(other.load())


if __name__ == "__main__":
    unittest.main()
