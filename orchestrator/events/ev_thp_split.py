"""Event ``thp-split``.

MADV_DONTNEED of the upper half of a registered large folio, on every THP backing
(anon-thp, memfd-thp, anon-mthp): the kernel splits the PMD (or zaps half the folio's
PTEs) while the driver holds the folio. Anonymous memory: the upper half's pages leave
the process (it faults new zero pages there), so the device's later writes into the pages
the driver still holds are lost to it; shmem: the pages stay in the file and a new fault
maps them again. odp is revoked by the zap's notifier
(docs/pinning-semantics.md row 54). Records the split counters and whether the registered
PFNs are still one large folio afterwards.
"""

from __future__ import annotations

from pinlab.common.vocab import Key

from ..classify import (
    PMD_MAPPED,
    Judge,
    all_gen,
    step,
    step_errno,
    summarize_pagemap,
    thp_folio_missing,
)
from . import Event


def classify(j: Judge) -> str:
    rep, n = j.rep, j.npages()
    step_errno(rep, "madv_dontneed_half")
    ev = rep.get(Key.VMSTAT_EVENT)
    j.f["split"] = {
        "vmstat": {k: v for k, v in ev.items() if k.startswith("thp")}
        if isinstance(ev, dict) else None,
        "pagemap_after_event": summarize_pagemap(rep.get(Key.PAGEMAP_AFTER_EVENT)),
        "still_one_folio": thp_folio_missing(rep.get(Key.THP_AFTER_EVENT), n, None) is None,
        "pmd_field": PMD_MAPPED.get(j.cell.backing)}
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    good = j.views_g(j.file_views(Key.MAP_G2))
    j.f["kept_half_g2"] = all_gen(rep.get(Key.MAP_G2), 2, 0, n // 2)
    return j.outcome(good)


EVENT = Event(
    "thp-split",
    order=41,
    backings=("anon-thp", "memfd-thp", "anon-mthp"),
    classify=classify,
    variants=("", "fast"),   # GUP-fast takes a large folio's subpages too (row 63)
)
