"""Event ``madv-collapse`` (module ``ev_madv_collapse``): the guest's steps.

The registered range was faulted as 4 KiB pages and kept under MADV_NOHUGEPAGE
(``SMALL_FOLIOS``; the registration's proof records small pages), so that khugepaged
cannot collapse it before the event (a run where it did so between registration and
generation 1 was COHERENT instead of REVOKED_IN_TIME under odp). An unregistered control
range of the same backing, made the same way, gets MADV_HUGEPAGE and MADV_COLLAPSE first
(it must become one THP: the proof that MADV_COLLAPSE works in this guest), then the
registered range gets them: the collapse's errno, the PFNs before and after, the
registered PFNs' kpageflags and the VMA's flags after. Then generation 2 and the mapping
scanned.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_madv_collapse.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest import pinlab_thp
from pinlab.guest.pinlab_cell import Mapping, timed
from pinlab.guest.pinlab_mm import MADV_COLLAPSE, MADV_HUGEPAGE, delta, madvise, vmstat

NAME = "madv-collapse"
#: the mapping is faulted as 4 KiB pages (pinlab_cell.Mapping ``small``)
SMALL_FOLIOS = True


def run(c):
    rep, kind = c.rep, c.m.kind
    ctl = Mapping(c.stack, kind, rep, tag="control", npages=c.m.npages, small=True)
    ctl_pfns = ctl.pfns()
    rep[Key.THP_CONTROL] = pinlab_thp.evidence(kind, ctl.addr, ctl_pfns)
    timed(rep, "hugepage_control", madvise, ctl.addr, ctl.size, MADV_HUGEPAGE)
    timed(rep, "collapse_control", madvise, ctl.addr, ctl.size, MADV_COLLAPSE)
    rep[Key.THP_CONTROL_AFTER] = pinlab_thp.evidence(kind, ctl.addr, ctl.pfns())
    v0 = vmstat()
    timed(rep, "hugepage", madvise, c.m.addr, c.m.size, MADV_HUGEPAGE)
    timed(rep, "collapse", madvise, c.m.addr, c.m.size, MADV_COLLAPSE)
    rep[Key.VMSTAT_EVENT] = delta(v0, vmstat())
    pa = c.m.pfns()
    rep[Key.PFNS_AFTER_EVENT] = pa
    rep[Key.THP_AFTER_EVENT] = pinlab_thp.evidence(kind, c.m.addr, pa)
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    rep[Key.PFNS_AFTER_TOUCH] = c.m.pfns()
