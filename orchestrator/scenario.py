"""One cell of the matrix: run its experiment in a warm guest, classify what happened.

A scenario returns an ``Observation``: the outcome class it saw and the evidence behind it
(workload report, dmesg classes, audit-log facts). It never decides pass/fail; the verdict
layer compares the class with the expectations table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dmesg import classify
from .expectations import Cell
from .session import GuestSession

PAGE = 4096
DEFAULT_PAGES = 64


@dataclass
class Observation:
    observed: str
    evidence: dict[str, Any] = field(default_factory=dict)


def _audit_pages(s: GuestSession, region: int) -> tuple[set[int], list[Any]]:
    records = s.audit(region=region, kind="access")
    pages = {int(r["gpa"]) // PAGE for r in records if r.get("dir") == "w"}
    return pages, s.violations()


def dma_write(s: GuestSession, cell: Cell, art: Path) -> Observation:
    dmesg_before = s.guest.ssh.run("dmesg | wc -l", check=True).out.strip()
    rep = s.workload("dma-write", "--mode", cell.mode, "--backing", cell.backing,
                     "--pages", str(DEFAULT_PAGES), "--generation", "7")
    (art / "workload.json").write_text(json.dumps(rep, indent=2))
    ev: dict[str, Any] = {"workload": {k: rep.get(k) for k in (
        "errno", "errno_name", "step", "bytes_written", "mismatches", "region", "error")}}
    dm_text = s.guest.ssh.run(f"dmesg | tail -n +{int(dmesg_before) + 1}", check=True).out
    (art / "dmesg.txt").write_text(dm_text)
    dm = classify(dm_text)
    ev["dmesg"] = dm.summary()
    if "error" in rep:
        return Observation("ERROR", ev)
    if rep["errno"] and rep.get("step") == "register":
        return Observation(f"PIN_REFUSED({rep.get('errno_name', rep['errno'])})", ev)
    pages, violations = _audit_pages(s, int(rep["region"]))
    (art / "audit-extract.json").write_text(json.dumps(sorted(pages)))
    ev["audit"] = {"pages_written": len(pages),
                   "outside_registration": len(pages - set(rep["pfns"])),
                   "violations": len(violations)}
    coherent = (rep["errno"] == 0 and rep["mismatches"] == 0 and not dm.severe()
                and pages == set(rep["pfns"]) and not violations)
    return Observation("COHERENT" if coherent else "WRITES_LOST_SILENTLY", ev)


SCENARIOS: dict[str, Callable[[GuestSession, Cell, Path], Observation]] = {
    "dma-write": dma_write,
}
