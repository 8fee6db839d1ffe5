"""Event ``madv-collapse``.

MADV_COLLAPSE (6.1+: 7d8faaf15545 anon, 34488399fa08 file and shmem) of a range the
driver registered while it was made of 4 KiB pages, on the two PMD-sized THP backings
(anon-thp, memfd-thp; anon-mthp has no MADV_COLLAPSE to 64 KiB). The collapse copies the
small pages into a new huge page and must give up when a page has references it cannot
account for (khugepaged's refcount check, SCAN_PAGE_COUNT -> EAGAIN), so a pinned range
keeps its PFNs; odp holds no reference and is revoked by the collapse's notifier. An
unregistered control range of the same backing is collapsed first and must become one THP,
or the cell is INCONCLUSIVE (no evidence that MADV_COLLAPSE works in the guest).
Background: 70cbc3cc78a9 "mm: gup: fix the fast GUP race against THP collapse"
(docs/pinning-semantics.md row 53).
"""

from __future__ import annotations

from pinlab.common.vocab import Key

from ..classify import (
    PMD_MAPPED,
    Inconclusive,
    Judge,
    changed,
    step,
    step_errno,
    thp_folio_missing,
    thp_small_missing,
)
from . import Event


def classify(j: Judge) -> str:
    rep, n = j.rep, j.npages()
    pmd = PMD_MAPPED.get(j.cell.backing)
    reg, ctl = step(rep, "collapse"), step(rep, "collapse_control")
    after = thp_folio_missing(rep.get(Key.THP_AFTER_EVENT), n, pmd)
    j.f["collapse"] = {"errno": reg.get(Key.ERRNO_NAME) or reg.get(Key.ERRNO),
                       "ms": reg.get(Key.MS),
                       "pfns_changed": changed(rep.get(Key.PFNS_REGISTERED),
                                               rep.get(Key.PFNS_AFTER_EVENT)),
                       "registered_range_now_thp": after is None,
                       "control_errno": ctl.get(Key.ERRNO_NAME) or ctl.get(Key.ERRNO)}
    step_errno(rep, "collapse")
    for name in ("hugepage_control", "hugepage"):
        if step_errno(rep, name):
            raise Inconclusive(f"MADV_HUGEPAGE failed ({name})")
    # MADV_COLLAPSE refuses a VM_NOHUGEPAGE VMA: the registered one must have had the
    # flag cleared when it was collapsed (smaps VmFlags "hg")
    sm = (rep.get(Key.THP_AFTER_EVENT) or {}).get(Key.SMAPS)
    if not isinstance(sm, dict) or "hg" not in (sm.get("VmFlags") or []):
        raise Inconclusive("the registered VMA has no VM_HUGEPAGE at the collapse")
    why = thp_small_missing(rep.get(Key.THP_CONTROL), n)
    if why:
        raise Inconclusive(f"control range before MADV_COLLAPSE: {why}")
    if step_errno(rep, "collapse_control"):
        raise Inconclusive(f"MADV_COLLAPSE of the unregistered control failed "
                           f"({j.f['collapse']['control_errno']})")
    why = thp_folio_missing(rep.get(Key.THP_CONTROL_AFTER), n, pmd)
    if why:
        raise Inconclusive(f"MADV_COLLAPSE did not make the control one THP: {why}")
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    return j.outcome(j.views_g(j.file_views(Key.MAP_G2)))


EVENT = Event(
    "madv-collapse",
    order=40,
    backings=("anon-thp", "memfd-thp"),
    classify=classify,
    thp_small=True,
    # and with the pages taken by pin/get_user_pages_fast(): the GUP-fast vs collapse race
    # of 70cbc3cc78a9 (docs/pinning-semantics.md row 53)
    variants=("", "fast"),
)
