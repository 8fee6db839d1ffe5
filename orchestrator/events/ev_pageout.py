"""Event ``pageout``.

MADV_PAGEOUT. hugetlb pages are never reclaimed (MADV_PAGEOUT gives EINVAL on
VM_HUGETLB); tmpfs behaves as memfd (both shmem). anon and private-file (its pinned
pages are anon COW copies, in a file-backed VMA) reclaim to swap and must show that an
unregistered control page of the mapping was swapped (swap_reached, below). anon-thp
(one registered THP, its 4 control pages small pages after it) must show the same;
memfd-thp is shmem as memfd (docs/pinning-semantics.md row 57).
"""

from __future__ import annotations

from pinlab.common.vocab import CPU_WRITE_OPTION, PRIVATE_BACKINGS, Key

from ..classify import Inconclusive, Judge, changed, step, summarize_pagemap
from . import Event


def reclaim(j: Judge, swap_control: tuple[str, ...] = ()) -> str:
    """The DMA after a reclaim-like event (pageout, memcg-reclaim, drop-caches,
    dontneed): the views hold generation 2, or odp revoked; cells of a backing in
    ``swap_control`` must show that reclaim reached the mapping (swap_reached)."""
    rep = j.rep
    j.f["pagemap_after_event"] = summarize_pagemap(rep.get(Key.PAGEMAP_AFTER_EVENT))
    j.f["vmstat_event"] = rep.get(Key.VMSTAT_EVENT)
    for k in ("memcg_before", "memcg_registered", "memcg_after_reclaim"):
        if rep.get(k) is not None:
            j.f[k] = rep[k]
    j.f["pfns_changed"] = changed(rep.get(Key.PFNS_BEFORE), rep.get(Key.PFNS_AFTER_TOUCH))
    if j.cell.backing in swap_control:
        swap_reached(j)
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    return j.outcome(j.views_g(j.file_views(Key.MAP_G2)))


def swap_reached(j: Judge) -> None:
    """Reclaim of anonymous memory reached the mapping: at least one of its
    unregistered control pages is a swap entry in pagemap after the event
    (Documentation/admin-guide/mm/pagemap.rst, bit 62), /proc/vmstat pswpout grew by at
    least that many pages, and every control page reads back its own words after
    swap-in. Without that a COHERENT cell proves nothing (nothing was reclaimed), so
    :class:`Inconclusive` names what is missing. Records ``swapped`` (registered and
    control pages that were swap entries) and ``pswpout`` in the facts."""
    rep = j.rep
    n = rep.get(Key.CONTROL_PAGES)
    ctl = rep.get(Key.CONTROL_PAGEMAP_AFTER_EVENT)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise Inconclusive("control_pages missing")
    if not isinstance(ctl, list) or len(ctl) != n:
        raise Inconclusive("control pagemap missing")
    reg = summarize_pagemap(rep.get(Key.PAGEMAP_AFTER_EVENT))
    if reg is None:
        raise Inconclusive("pagemap after the event missing")
    ctl_swapped = sum(1 for p in ctl if p == "swap")
    ev = rep.get(Key.VMSTAT_EVENT)
    pswpout = ev.get("pswpout", 0) if isinstance(ev, dict) else None
    j.f["swapped"] = {"registered": reg["swap"], "control": ctl_swapped,
                      "control_pages": n, "pswpout": pswpout}
    if not ctl_swapped:
        raise Inconclusive("reclaim did not reach the mapping: no control page swapped")
    if not isinstance(pswpout, int) or pswpout < ctl_swapped:
        raise Inconclusive(f"pswpout {pswpout} below the {ctl_swapped} swapped "
                           "control pages")
    intact = rep.get(Key.CONTROL_INTACT)
    if intact != n:
        raise Inconclusive(f"control pages intact after swap-in: {intact} of {n}")


def classify(j: Judge) -> str:
    return reclaim(j, EVENT.swap_control)


EVENT = Event(
    "pageout",
    order=5,
    backings=("anon", "memfd", "ext4", "xfs", "btrfs", "private-file", "anon-thp",
              "memfd-thp"),
    classify=classify,
    swap_control=(*PRIVATE_BACKINGS, "anon-thp"),
    # the read-only flow (orchestrator/readonly.py), and the CPU write after the event
    # (README "Cell options"; its private backings only, vocab.OPTION_BACKINGS)
    variants=("", "readonly", CPU_WRITE_OPTION),
)
