"""Event ``ksm``: KSM merging over the registered range and an identical twin
(guest/events/ev_ksm.py).

Anonymous memory only: KSM merges only anonymous pages of MADV_MERGEABLE VMAs
(Documentation/admin-guide/mm/ksm.rst). All four modes, and with ``cpu-write-after``.
A page with an extra reference is never merged: ``write_protect_page()`` in mm/ksm.c
gives up when the page count is above the mapcount plus KSM's own reference, so a gup,
pin or longterm page stays the process's own and the device's write stays visible; odp
holds no reference, so KSM merges the registered pages (the notifier runs for the write
protection), and the device's re-fault for writing breaks the KSM page's COW
(docs/pinning-semantics.md rows 71 and 72).
"""

from __future__ import annotations

from typing import Any

from pinlab.common.vocab import CPU_WRITE_OPTION, Key

from ..classify import Inconclusive, Judge, changed, step, step_errno
from . import Event

STEPS = ("madv_mergeable_registered", "madv_mergeable_twin", "madv_mergeable_control_a",
         "madv_mergeable_control_b", "ksm_run")


def _int(d: dict[str, Any], k: str) -> int | None:
    v = d.get(k)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def ksm_ran(j: Judge) -> dict[str, Any]:
    """ksmd ran over the cell's ranges and could merge (the KSM-RAN evidence): every
    MADV_MERGEABLE step and ``run=1`` returned 0, the unregistered control pair was merged
    (the two control mappings share every PFN) and ksmd finished two more full scans after
    that, so the registered range had its chances. Records ``ksm`` (what was merged) in the
    facts. Raises :class:`Inconclusive` naming what is missing."""
    k = j.rep.get(Key.KSM)
    if not isinstance(k, dict):
        raise Inconclusive("ksm observations missing")
    for name in STEPS:
        if step_errno(j.rep, name):
            raise Inconclusive(f"{name} failed ({step(j.rep, name).get('errno_name')})")
    j.f["ksm"] = {x: k.get(x) for x in (
        "registered_merged", "registered_ksm_flag", "twin_ksm_flag", "control_merged",
        "control_ksm_flag", "full_scans_start", "full_scans_at_control", "full_scans_end",
        "wait_ms", "pages_shared", "pages_sharing", "ksm_merging_pages")}
    ctl, merged = _int(k, "control_pages"), _int(k, "control_merged")
    if not ctl or merged != ctl:
        raise Inconclusive(f"ksmd merged {merged} of {ctl} control pages")
    at, end = _int(k, "full_scans_at_control"), _int(k, "full_scans_end")
    if at is None or end is None or end < at + 2:
        raise Inconclusive("ksmd did not finish two full scans after merging the control")
    if _int(k, "registered_merged") is None:
        raise Inconclusive("registered pages' merge count missing")
    return k


def classify(j: Judge) -> str:
    rep = j.rep
    ksm_ran(j)
    j.f["pfns_changed"] = changed(rep.get(Key.PFNS_REGISTERED), rep.get(Key.PFNS_AFTER_TOUCH))
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    if not j.views_g([Key.MAP_TWIN_G2], 1):
        # the device's write reached a page the twin maps: a pinned page KSM shared
        raise Inconclusive("the twin lost generation 1: the device wrote into a page the "
                           "twin maps (not seen yet)")
    return j.outcome(j.views_g([Key.MAP_G2]))


EVENT = Event(
    "ksm",
    order=36,
    backings=("anon",),
    classify=classify,
    variants=("", CPU_WRITE_OPTION),
)
