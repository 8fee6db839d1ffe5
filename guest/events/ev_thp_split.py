"""Event ``thp-split`` (module ``ev_thp_split``): the guest's steps.

MADV_DONTNEED of the upper half of the registered large folio (one THP, or one 64 KiB
mTHP folio): the kernel must split the PMD (or zap half the PTEs of the folio) while the
driver holds the folio. Records the pagemap and the registered PFNs' kpageflags after the
event and the THP split counters; then generation 2 and the mapping scanned.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_thp_split.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest import pinlab_thp
from pinlab.guest.pinlab_cell import PAGE, timed
from pinlab.guest.pinlab_mm import MADV_DONTNEED, delta, madvise, vmstat

NAME = "thp-split"


def run(c):
    rep, m = c.rep, c.m
    half = m.npages // 2
    rep[Key.SPLIT_PAGES] = [half, m.npages - half]
    v0 = vmstat()
    timed(rep, "madv_dontneed_half", madvise, m.addr + half * PAGE, (m.npages - half) * PAGE,
          MADV_DONTNEED)
    rep[Key.VMSTAT_EVENT] = delta(v0, vmstat())
    rep[Key.PAGEMAP_AFTER_EVENT] = m.pfns()
    # the folio the driver holds, by its registered PFNs (the upper half is unmapped now)
    rep[Key.THP_AFTER_EVENT] = pinlab_thp.evidence(m.kind, m.addr, rep[Key.PFNS_REGISTERED])
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    rep[Key.PFNS_AFTER_TOUCH] = m.pfns()
