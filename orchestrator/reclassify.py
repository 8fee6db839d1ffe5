"""Re-judge a finished matrix run from its kept artifacts, with the current classifier.

Every cell test directory keeps what the classifier read: ``cell.json`` (the cell),
``cell/workload.json`` (the guest report), ``cell/dmesg.txt`` and ``cell/audit.jsonl``
(the device's audit records since the cell's mark). This module recomputes the audit
facts and the outcome class from those files, so a classifier change can be compared with
a run without booting anything, and it builds the classifier corpus the unit tests keep
(``tests/data/classifier-corpus.json.gz``).

    python -m pinlab.orchestrator.reclassify RUN_DIR [--diff] [--corpus OUT]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .classify import audit_facts, classify_cell
from .dmesg import classify
from .expectations import Cell

AUDIT_LIMIT = 100_000


def cell_dirs(run: Path) -> Iterator[Path]:
    """Every cell test directory under a matrix run (or a single Avocado job)."""
    for vfile in sorted(run.rglob("verdict.json")):
        if (vfile.parent / "cell.json").exists():
            yield vfile.parent


def inputs(d: Path) -> dict[str, Any]:
    """The classifier's inputs kept in one cell test directory.

    Returns ``{"cell", "rep", "dmesg", "audit", "verdict"}``; ``audit`` holds the facts
    recomputed from ``cell/audit.jsonl`` (the mark is the record before the first one,
    as the run's query started there), or ``{"unavailable": ...}`` when the extract is
    missing. Raises OSError / ValueError for an unreadable directory."""
    cell = Cell(**json.loads((d / "cell.json").read_text()))
    verdict = json.loads((d / "verdict.json").read_text())
    art = d / "cell"
    rep = json.loads((art / "workload.json").read_text())
    dmesg = (art / "dmesg.txt").read_text(errors="replace")
    apath = art / "audit.jsonl"
    audit: dict[str, Any]
    if apath.exists():
        records = [json.loads(ln) for ln in apath.read_text().splitlines() if ln.strip()]
        since = int(records[0]["seq"]) - 1 if records else 0
        audit = audit_facts(rep, records, [], since, AUDIT_LIMIT)
        victim = rep.get("victim")
        if isinstance(victim, dict) and victim.get("region") is not None:
            audit["victim"] = audit_facts({"mode": cell.mode, "pfns_before": victim.get("pfns")},
                                          records, [], since, AUDIT_LIMIT,
                                          region=victim["region"])
    else:
        audit = {"unavailable": "no audit.jsonl kept"}
    return {"cell": cell, "rep": rep, "dmesg": dmesg, "audit": audit, "verdict": verdict}


def judge_again(d: Path) -> tuple[Cell, str, str, dict[str, Any]]:
    """(cell, class the run recorded, class the current classifier gives, its facts)."""
    i = inputs(d)
    observed, facts = classify_cell(i["cell"], i["rep"], classify(i["dmesg"]), i["audit"])
    return i["cell"], str(i["verdict"].get("observed")), observed, facts


def _trim_dmesg(text: str) -> str:
    """Only the kernel log lines the classifier looks at (keeps the corpus small)."""
    dm = classify(text)
    keep = {ln for lines in dm.lines.values() for ln in lines} | set(dm.pinlab_lines)
    return "\n".join(ln for ln in text.splitlines() if ln in keep)


def corpus_entry(d: Path) -> dict[str, Any]:
    """One recorded cell for the classifier corpus: its inputs and the class it got."""
    i = inputs(d)
    observed, _ = classify_cell(i["cell"], i["rep"], classify(i["dmesg"]), i["audit"])
    return {"cell": i["cell"].__dict__, "rep": i["rep"], "dmesg": _trim_dmesg(i["dmesg"]),
            "audit": i["audit"], "observed": observed,
            "expected": i["verdict"].get("expected")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pinlab.orchestrator.reclassify",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a matrix run directory")
    p.add_argument("--diff", action="store_true", help="print only cells whose class moved")
    p.add_argument("--corpus", type=Path, help="write the classifier corpus (.json.gz) here")
    args = p.parse_args(argv)
    moved = 0
    entries = []
    for d in cell_dirs(args.run):
        cell, before, after, facts = judge_again(d)
        if before != after:
            moved += 1
        if before != after or not args.diff:
            print(f"{cell.name:45} {before:28} -> {after}")
        if args.corpus:
            entries.append(corpus_entry(d))
    if args.corpus:
        with gzip.open(args.corpus, "wt") as fh:
            json.dump(entries, fh, separators=(",", ":"), sort_keys=True, default=str)
        print(f"corpus: {len(entries)} cells in {args.corpus}")
    print(f"{moved} cells moved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
