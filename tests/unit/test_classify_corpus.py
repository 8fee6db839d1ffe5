"""The classifier on cells recorded from a real three-kernel matrix run.

``tests/data/classifier-corpus.json.gz`` keeps, per cell, exactly what the classifier
read: the guest workload's report, the kernel log lines it classifies, and the facts of
the device's audit extract (written by ``python -m pinlab.orchestrator.reclassify RUN
--corpus FILE``). Two properties:

* every recorded cell still gets the class it got in the run;
* removing or corrupting any single piece of the evidence its class needs (as the
  expectations header defines it, listed independently here) never yields that class: the
  cell becomes INCONCLUSIVE or another class. This is what keeps a step that silently
  fails on a candidate kernel from passing as the expected outcome.
"""

from __future__ import annotations

import gzip
import json
import unittest
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pinlab.common.vocab import FILE_SHARED
from pinlab.orchestrator.classify import (
    DAX_BACKINGS,
    FILE_BACKINGS,
    base_class,
    classify_cell,
)
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.expectations import Cell

CORPUS = Path(__file__).resolve().parents[1] / "data" / "classifier-corpus.json.gz"
# the cells with options (the read-only flow, +fast) from a three-kernel run of their own
OPTIONS_CORPUS = CORPUS.with_name("classifier-corpus-options.json.gz")
Entry = dict[str, Any]
Mutation = tuple[str, Callable[[Entry], None]]
# classes that need the device's write of a generation (the "gen N written" evidence)
WROTE = {"COHERENT", "WRITES_LOST_SILENTLY", "REVOKED_IN_TIME", "WRITEBACK_STALE",
         "EXT4_WARN_DATA_LOST", "MIGRATION_FAILS", "PARENT_LOSES_WRITES",
         "CHILD_SEES_WRITES", "OFFLINE_BLOCKED", "OFFLINE_SUCCEEDS", "DIRTY_FOLIO_REJECTED"}
NO_AUDIT = {"PIN_REFUSED", "KERNEL_ERROR", "ERROR", "DEVICE_NOT_REMOVED", "SEAL_REFUSED"}
# the page scans each event's outcome is judged on (file backings add the file read-back)
VIEWS = {"dma-write": ["map_g1"], "punch-hole": ["map_g2"], "punch-hole-partial": ["map_g2"],
         "pageout": ["map_g2"], "memcg-reclaim": ["map_g2"], "drop-caches": ["map_g2"],
         "dontneed": ["map_g2"], "writeback": ["disk_registered", "disk_released"],
         "2018": ["file_after"], "migrate": ["map_g2"], "fork": ["map_parent_g2"],
         "fork-dontfork": ["map_parent_g2"], "odirect-write": ["map_g2", "file_after"],
         "mem-offline": ["map_g2"], "no-ack": ["map_g2"], "exit": [], "oom": [],
         "seal-write": [], "hot-unplug": [], "pci-remove": []}


def load_corpus(path: Path = CORPUS) -> list[Entry]:
    with gzip.open(path, "rt") as fh:
        return list(json.load(fh))


def clone(e: Entry) -> Entry:
    """A copy deep enough for any mutation below (the report's big PFN lists are shared)."""
    rep = dict(e["rep"])
    rep["steps"] = [dict(st) for st in rep.get("steps", [])]
    if isinstance(rep.get("child"), dict):
        rep["child"] = dict(rep["child"])
    audit = dict(e["audit"])
    if isinstance(audit.get("kinds"), dict):
        audit["kinds"] = dict(audit["kinds"])
    if isinstance(audit.get("victim"), dict):
        audit["victim"] = dict(audit["victim"])
        if isinstance(audit["victim"].get("kinds"), dict):
            audit["victim"]["kinds"] = dict(audit["victim"]["kinds"])
    return {**e, "rep": rep, "audit": audit}


def run(e: Entry) -> str:
    return classify_cell(Cell(**e["cell"]), e["rep"], classify(e["dmesg"]), e["audit"])[0]


def _step(e: Entry, name: str) -> dict[str, Any] | None:
    for st in reversed(e["rep"].get("steps", [])):
        if st.get("step") == name:
            return st
    return None


def _drop_step(name: str) -> Callable[[Entry], None]:
    def f(e: Entry) -> None:
        e["rep"]["steps"] = [s for s in e["rep"].get("steps", []) if s.get("step") != name]
    return f


def _errno_none(name: str) -> Callable[[Entry], None]:
    def f(e: Entry) -> None:
        st = _step(e, name)
        if st is not None:
            st["errno"] = None
    return f


def _rep(key: str, value: Any = KeyError) -> Callable[[Entry], None]:
    def f(e: Entry) -> None:
        if value is KeyError:
            e["rep"].pop(key, None)
        else:
            e["rep"][key] = value
    return f


def _audit(key: str, value: Any = KeyError, where: str = "") -> Callable[[Entry], None]:
    def f(e: Entry) -> None:
        a = e["audit"][where] if where else e["audit"]
        if value is KeyError:
            a.pop(key, None)
        else:
            a[key] = value
    return f


def scan_mutations(key: str) -> Iterator[Mutation]:
    yield f"remove {key}", _rep(key)
    yield f"empty {key}", _rep(key, [])
    yield f"{key} of the wrong type", _rep(key, "g2")


def step_mutations(name: str) -> Iterator[Mutation]:
    yield f"remove step {name}", _drop_step(name)
    yield f"step {name} without errno", _errno_none(name)


def audit_mutations(where: str = "") -> Iterator[Mutation]:
    label = f"audit[{where}]" if where else "audit"

    def unavailable(e: Entry) -> None:
        if where:
            e["audit"][where] = {"unavailable": "x"}
        else:
            e["audit"] = {"unavailable": "x"}
    yield f"{label} unavailable", unavailable
    yield f"{label} incomplete", _audit("complete", False, where)
    yield f"{label} without the create record", _audit("region_found", False, where)
    yield f"{label} without violation count", _audit("violations", where=where)


def _dax(key: str, value: Any) -> Callable[[Entry], None]:
    def f(e: Entry) -> None:
        e["rep"]["dax"] = {**e["rep"]["dax"], key: value}
    return f


def _blocked(**kw: Any) -> Callable[[Entry], None]:
    def f(e: Entry) -> None:
        e["rep"]["blocked"] = {**e["rep"]["blocked"], **kw}
    return f


def dax_mutations() -> Iterator[Mutation]:
    """The DAX evidence every fsdax cell needs (classify.DAX_EVIDENCE)."""
    yield "remove dax evidence", _rep("dax")
    yield "STATX_ATTR_DAX not set", _dax("statx_dax", False)
    yield "no dax mount option", _dax("mount_options", "rw,relatime")
    yield "no pmem range", _dax("pmem_ranges", [])
    yield "remove pfns_before", _rep("pfns_before")


def truncate_blocked_mutations(e: Entry) -> Iterator[Mutation]:
    """TRUNCATE_BLOCKED: the wait in a layout-break function, the release (or the watch
    deadline and the kill), generation 1 written, the region destroyed."""
    b = e["rep"]["blocked"]
    yield "remove blocked", _rep("blocked")
    yield "wait not recorded", _blocked(wait=None)
    yield "wait outside the layout break", _blocked(
        wait={"state": "S", "wchan": "do_select", "stack": ["do_select+0x1/0x2"]})
    if b.get("never"):
        yield "returned before the watch deadline", _blocked(still_blocked_at_ms=None,
                                                             returned_ms=5.0)
        yield "watched shorter than the deadline", _blocked(still_blocked_at_ms=10.0)
        yield "neither killed nor stuck", _blocked(killed_signal=None, stuck=False)
    else:
        yield "never released", _blocked(released_at_ms=None)
        yield "returned before the release", _blocked(returned_after_release=False)
        yield "release failed", _blocked(release_errno=5)
        yield from step_mutations(str(b.get("step")))
    yield from step_mutations("dma_write_g1")
    yield "audit without gen1 pages", _audit("gen_pages", {})
    yield "audit without the destroy", lambda x: x["audit"]["kinds"].pop("destroy", None)


def mutations(e: Entry, cls: str) -> Iterator[Mutation]:
    """Each single piece of evidence ``cls`` needs for this cell, removed or corrupted."""
    cell = Cell(**e["cell"])
    rep = e["rep"]
    if cell.backing in DAX_BACKINGS and cls not in ("KERNEL_ERROR", "ERROR"):
        yield from dax_mutations()
    if cls == "PIN_REFUSED":
        yield "remove errno", _rep("errno")
        yield "errno 0", _rep("errno", 0)
        return
    if cls == "KERNEL_ERROR":
        yield "no kernel log", lambda x: x.__setitem__("dmesg", "")
        return
    if cls == "SEAL_REFUSED":
        yield from step_mutations("seal_write")
        return
    if cls not in NO_AUDIT:
        yield from audit_mutations()
        if cell.mode in ("pin", "longterm"):
            yield "remove vmstat_before", _rep("vmstat_before")
            yield "remove vmstat_end", _rep("vmstat_end")
            yield "vmstat_end without counters", _rep("vmstat_end", {})
    if cell.options and cls not in ("KERNEL_ERROR", "ERROR"):
        yield from registration_mutations(e)
    if "readonly" in cell.option_names and cls not in NO_AUDIT:
        yield from readonly_mutations(e, cls)
        return
    if cls == "SEAL_APPLIED":
        yield from step_mutations("seal_write")
        yield "remove seals", _rep("seals")
        yield "seals without F_SEAL_WRITE", _rep("seals", 0)
        return
    if cls == "DEVICE_GONE_CLEAN":
        yield "remove gone", _rep("gone")
        yield "gone empty", _rep("gone", None)

        def no_reset(x: Entry) -> None:
            x["audit"]["resets"] = 0
            x["audit"].get("kinds", {}).pop("destroy", None)
        yield "neither reset nor destroy in the audit", no_reset
        return
    if cls == "ESCALATED_RESET":
        yield "no escalation lines", lambda x: x.__setitem__("dmesg", "")
        yield "no reset in the audit", _audit("resets", 0)
        return
    if cls == "TRUNCATE_BLOCKED":
        yield from truncate_blocked_mutations(e)
        return
    if cell.event in ("exit", "oom"):
        yield "remove victim", _rep("victim")
        yield "victim error", _rep("victim", {"error": "x"})
        yield "remove victim_status", _rep("victim_status")
        yield from audit_mutations("victim")
        if cell.event == "oom":
            yield "remove oom_events", _rep("oom_events")
        if cell.mode in ("pin", "longterm"):
            for k in ("vmstat_before_victim", "vmstat_victim_registered", "vmstat_victim_gone"):
                yield f"remove {k}", _rep(k)
        if cls == "RELEASED_AT_EXIT":
            yield "victim audit without destroy", lambda x: x["audit"]["victim"]["kinds"].pop(
                "destroy", None)
        if cls == "REVOKED_IN_TIME":
            yield "victim audit without ack", lambda x: x["audit"]["victim"]["kinds"].pop(
                "invalidate_ack", None)
        return
    if cell.event == "cpu-write-fork-unmap":
        yield from fork_unmap_mutations(e, cls)
        return
    if cell.event in ("cpu-write", "cpu-write-fork"):
        yield from cpu_write_mutations(e, cls)
        return
    g2 = _step(e, "dma_write_g2")
    failed = bool(g2 and g2.get("errno"))
    gen = 1 if cell.event == "dma-write" else 2
    if failed:
        yield from step_mutations("dma_write_g2")
        if cls == "REVOKED_IN_TIME":
            yield "no event acks", _audit("event_acks", 0)
            yield "event acks missing", _audit("event_acks")
        if cell.event in ("truncate", "truncate-never-unpin") and cell.mode == "odp":
            yield from scan_mutations("map_kept_g2")
            if cell.backing in DAX_BACKINGS:   # the whole file revoked: nothing written
                yield "audit with gen2 pages", lambda x: x["audit"].__setitem__(
                    "gen_pages", {**x["audit"]["gen_pages"], "2": 16})
        return
    if cls in WROTE:
        yield from step_mutations(f"dma_write_g{gen}")
        yield f"audit without gen{gen} pages", _audit("gen_pages", {})
        yield "remove npages", _rep("npages")
    if cls == "REVOKED_IN_TIME":
        yield "no event acks", _audit("event_acks", 0)
        yield "event acks missing", _audit("event_acks")
    if cls == "CSUM_FAILED":
        yield "no kernel log", lambda x: x.__setitem__("dmesg", "")
        return
    if cls == "DIRTY_FOLIO_REJECTED":
        def no_errors(x: Entry) -> None:
            for st in x["rep"]["steps"]:
                if str(st.get("step", "")).startswith(("fsync", "sync")):
                    st["errno"], st["errno_name"] = 0, None
            for k in [k for k in x["rep"] if k.endswith("_error")]:
                del x["rep"][k]
        yield "no fsync, sync or read error", no_errors
        return
    if cls == "EXT4_WARN_DATA_LOST":
        yield "no kernel log", lambda x: x.__setitem__("dmesg", "")
        yield from scan_mutations("file_after")
        return
    views = list(VIEWS.get(cell.event, []))
    if cell.event in ("truncate", "truncate-never-unpin"):
        views = ["map_kept_g2", "map_after_extend"]
        yield "remove kept_pages", _rep("kept_pages")
    if cell.event in ("dma-write", "punch-hole", "punch-hole-partial", "pageout",
                      "memcg-reclaim", "drop-caches", "dontneed") \
            and cell.backing in FILE_BACKINGS:
        views.append("file_after")
    if cell.event == "munmap":
        yield from step_mutations("munmap")
        if cell.backing != "anon":
            views.append("remap_g2")
    if cell.event == "odirect-write":
        yield from step_mutations("odirect_write")
    if cell.event == "migrate":
        yield "remove pinned_moved", _rep("pinned_moved")
        yield "remove control_moved", _rep("control_moved")
    if cell.event in ("fork", "fork-dontfork"):
        yield "remove child", _rep("child")
        yield "empty child report", _rep("child", {})
        yield "child failed", _rep("child_status", 256)
        if rep.get("child", {}).get("mapped"):
            yield "child scan missing", lambda x: x["rep"]["child"].pop("map", None)
    if cell.event in ("pageout", "memcg-reclaim") and cell.backing in ("anon", "private-file"):
        # the SWAP-REACHED evidence: an unregistered control page of the mapping swapped
        yield "remove control_pages", _rep("control_pages")
        yield "remove control pagemap", _rep("control_pagemap_after_event")
        yield "no control page swapped", lambda x: x["rep"].__setitem__(
            "control_pagemap_after_event",
            [0 if p == "swap" else p for p in x["rep"]["control_pagemap_after_event"]])
        yield "remove pswpout", lambda x: x["rep"].__setitem__(
            "vmstat_event", {k: v for k, v in (x["rep"].get("vmstat_event") or {}).items()
                             if k != "pswpout"})
        yield "control pages not intact", lambda x: x["rep"].__setitem__(
            "control_intact", 0)
        yield "remove pagemap after the event", _rep("pagemap_after_event")
    if cell.event == "mem-offline":
        yield "remove offline", _rep("offline")
        yield "no offline results", _rep("offline", [])
    for v in views:
        yield from scan_mutations(v)


def registration_mutations(e: Entry) -> Iterator[Mutation]:
    """A cell with options: the register options and the module's gup_path
    (classify.Judge.registration), for every class after the registration."""
    rep = e["rep"]
    if rep.get("step") == "register":
        return
    opts = rep["register_options"]
    yield "remove register_options", _rep("register_options")
    yield "register options: the other path", _rep(
        "register_options", {**opts, "fast": not opts["fast"]})
    yield "register options: the other readonly", _rep(
        "register_options", {**opts, "readonly": not opts["readonly"]})
    yield "remove query_registered", _rep("query_registered")
    q = rep["query_registered"]
    yield "query without gup_path", _rep(
        "query_registered", {k: v for k, v in q.items() if k != "gup_path_name"})
    other = {"fast": "slow", "slow": "fast", "none": "slow"}[q["gup_path_name"]]
    yield f"gup_path {other}", _rep("query_registered", {**q, "gup_path_name": other})


RO_KEYS = ("crc_old", "crc_map_before", "device_crc_before", "crc_expected_after",
           "crc_map_after", "device_crc_after")


def readonly_mutations(e: Entry, cls: str) -> Iterator[Mutation]:
    """The read-only flow's evidence (orchestrator/readonly.py): the flow marker, both
    device reads and their CRC-32s, what the process sees (mapping; MAP_SHARED files: the
    file too) equal to what the event leaves, the audit's reads of every page, the child
    after a fork, SWAP-REACHED for pageout of anon/private-file."""
    cell = Cell(**e["cell"])
    rep = e["rep"]
    yield "remove readonly_flow", _rep("readonly_flow")
    for name in ("dma_read_before", "dma_read_after"):
        yield from step_mutations(name)
    failed = bool((_step(e, "dma_read_after") or {}).get("errno"))
    for k in RO_KEYS:
        if k == "device_crc_after" and failed:
            continue
        yield f"remove {k}", _rep(k)
        yield f"{k} of the wrong type", _rep(k, str(rep.get(k)))
    yield "device read something else before", _rep("device_crc_before",
                                                    rep["crc_old"] ^ 1)
    yield "the mapping not what the event leaves", _rep("crc_map_after",
                                                         rep["crc_map_after"] ^ 1)
    if cell.backing in FILE_SHARED:
        yield "remove crc_file_after", _rep("crc_file_after")
        yield "the file differs from the mapping", _rep("crc_file_after",
                                                         rep["crc_map_after"] ^ 1)
    if not failed:
        yield "the device read something else after", _rep("device_crc_after",
                                                           rep["device_crc_after"] ^ 1)
        yield "audit without reads", _audit("read_pages", 0)
        yield "audit read count missing", _audit("read_pages")
        yield "remove npages", _rep("npages")
    if cell.event == "fork":
        yield "child failed", _rep("child_status", 256)
        yield "child error", _rep("child", {"error": "x"})
    if cell.event == "pageout" and cell.backing in ("anon", "private-file"):
        yield "remove control_pages", _rep("control_pages")
        yield "remove control pagemap", _rep("control_pagemap_after_event")
        yield "control pages not intact", _rep("control_intact", 0)
    if cls == "REVOKED_IN_TIME":
        yield "no event acks", _audit("event_acks", 0)
        yield "event acks missing", _audit("event_acks")


CRC_KEYS = ("crc_old", "crc_new", "crc_map_before", "crc_map_after", "device_crc_before",
            "device_crc_after")


def cpu_write_mutations(e: Entry, cls: str) -> Iterator[Mutation]:
    """A read-only registration's evidence (the header's COHERENT / REVOKED_IN_TIME for
    cpu-write, and DEVICE_READS_STALE): the register options and the module's gup_path,
    both device reads and the CPU write, the six CRC-32s, the audit's reads of every
    page; and the device's read after the write showing the other contents. The fork
    variant: the child's report and status, the child's view, the device showing the
    parent's write."""
    rep = e["rep"]
    for k in CRC_KEYS:
        yield f"remove {k}", _rep(k)
        yield f"{k} of the wrong type", _rep(k, str(rep.get(k)))
    for name in ("dma_read_before", "cpu_write", "dma_read_after"):
        yield from step_mutations(name)
    yield "remove register_options", _rep("register_options")
    yield "registration not read-only", _rep(
        "register_options", {**rep["register_options"], "readonly": False})
    yield "the other gup path", _rep(
        "register_options", {**rep["register_options"],
                             "fast": not rep["register_options"]["fast"]})
    yield "remove query_registered", _rep("query_registered")
    yield "query without gup_path", _rep(
        "query_registered", {k: v for k, v in rep["query_registered"].items()
                             if k != "gup_path_name"})
    yield "audit without reads", _audit("read_pages", 0)
    yield "audit read count missing", _audit("read_pages")
    yield "remove npages", _rep("npages")
    yield "device read the mapping wrong before the write", _rep(
        "device_crc_before", rep["crc_new"])
    yield "the mapping without the process's write", _rep("crc_map_after", rep["crc_old"])
    if Cell(**e["cell"]).event == "cpu-write-fork":
        # the device must read the child's view (old), never the parent's write
        yield "remove crc_child_after", _rep("crc_child_after")
        yield "the child's view changed", _rep("crc_child_after", rep["crc_new"])
        yield "device read the parent's write", _rep("device_crc_after", rep["crc_new"])
        yield "remove child", _rep("child")
        yield "empty child report", _rep("child", {})
        yield "child failed", _rep("child_status", 256)
    elif cls == "DEVICE_READS_STALE":
        yield "device read the new contents", _rep("device_crc_after", rep["crc_new"])
    else:
        yield "device read the old contents", _rep("device_crc_after", rep["crc_old"])
    if cls == "REVOKED_IN_TIME":
        yield "no event acks", _audit("event_acks", 0)
        yield "event acks missing", _audit("event_acks")


def fork_unmap_mutations(e: Entry, cls: str) -> Iterator[Mutation]:
    """cpu-write-fork-unmap: the child's report (status, mapped false), the steps; COHERENT:
    the CRC-32s and the audit's reads as cpu-write-fork (no child view); REVOKED_IN_TIME:
    the failed read after the child's munmap and an acknowledged invalidate."""
    rep = e["rep"]
    yield "remove child", _rep("child")
    yield "empty child report", _rep("child", {})
    yield "child failed", _rep("child_status", 256)
    yield "the child still mapped", lambda x: x["rep"]["child"].__setitem__("mapped", True)
    yield "child without mapped", lambda x: x["rep"]["child"].pop("mapped", None)
    for name in ("dma_read_before", "cpu_write", "dma_read_after"):
        yield from step_mutations(name)
    yield "remove register_options", _rep("register_options")
    if cls == "REVOKED_IN_TIME":
        yield "no event acks", _audit("event_acks", 0)
        yield "event acks missing", _audit("event_acks")
        return
    for k in ("crc_old", "crc_new", "crc_map_before", "crc_map_after", "device_crc_before",
              "device_crc_after"):
        yield f"remove {k}", _rep(k)
    yield "audit without reads", _audit("read_pages", 0)
    yield "the mapping without the process's write", _rep("crc_map_after", rep["crc_old"])
    yield "device read the parent's write", _rep("device_crc_after", rep["crc_new"])


class CorpusTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.corpus = load_corpus() + load_corpus(OPTIONS_CORPUS)

    def test_corpus_spans_the_matrix(self) -> None:
        kernels = {e["cell"]["kernel"] for e in self.corpus}
        classes = {base_class(e["observed"]) for e in self.corpus}
        self.assertEqual(kernels, {"6.1", "6.12", "7"})
        self.assertGreaterEqual(len(self.corpus), 600)
        self.assertGreaterEqual(len(classes), 12, classes)

    def test_options_corpus_spans_both_options_on_every_kernel(self) -> None:
        opts = load_corpus(OPTIONS_CORPUS)
        for option in ("readonly", "fast"):
            got = {e["cell"]["kernel"] for e in opts if option in e["cell"]["options"]}
            self.assertEqual(got, {"6.1", "6.12", "7"}, option)
        classes = {base_class(e["observed"]) for e in opts
                   if "readonly" in e["cell"]["options"]}
        self.assertLessEqual({"COHERENT", "DEVICE_READS_STALE", "REVOKED_IN_TIME"}, classes)

    def test_recorded_cells_keep_their_class(self) -> None:
        moved = [(e["cell"], e["observed"], run(e)) for e in self.corpus
                 if run(e) != e["observed"]]
        self.assertEqual(moved, [])

    def test_no_single_evidence_loss_yields_the_class(self) -> None:
        tried = 0
        bad = []
        for e in self.corpus:
            cls = e["observed"]
            if cls.startswith(("INCONCLUSIVE", "ERROR")):
                continue
            for what, mutate in mutations(e, base_class(cls)):
                m = clone(e)
                mutate(m)
                got = run(m)
                tried += 1
                if got == cls:
                    bad.append(f"{Cell(**e['cell']).name}: {what} still gives {cls}")
        self.assertGreater(tried, 5000)
        self.assertEqual(bad[:20], [], f"{len(bad)} mutations kept the class")

    def test_no_evidence_loss_turns_a_mismatch_into_the_expected_class(self) -> None:
        for e in self.corpus:
            if e["observed"] == e["expected"] or not e["expected"]:
                continue
            for what, mutate in mutations(e, base_class(e["observed"])):
                m = clone(e)
                mutate(m)
                self.assertNotEqual(run(m), e["expected"], f"{e['cell']}: {what}")


if __name__ == "__main__":
    unittest.main()
