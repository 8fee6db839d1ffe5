"""Event ``madv-collapse`` (module ``ev_madv_collapse``): the guest's steps.

The registered range was faulted as 4 KiB pages (``SMALL_FOLIOS``: MADV_NOHUGEPAGE while
faulting, MADV_HUGEPAGE after; the registration's proof records small pages). An
unregistered control range of the same backing, faulted the same way, is collapsed first
with MADV_COLLAPSE (it must become one THP: the proof that MADV_COLLAPSE works in this
guest), then MADV_COLLAPSE on the registered range: its errno, the PFNs before and after,
the registered PFNs' kpageflags after. Then generation 2 and the mapping scanned.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_madv_collapse.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest import pinlab_thp
from pinlab.guest.pinlab_cell import Mapping, timed
from pinlab.guest.pinlab_mm import MADV_COLLAPSE, delta, madvise, vmstat

NAME = "madv-collapse"
#: the mapping is faulted as 4 KiB pages (pinlab_cell.Mapping ``small``)
SMALL_FOLIOS = True


def run(c):
    rep, kind = c.rep, c.m.kind
    ctl = Mapping(c.stack, kind, rep, tag="control", npages=c.m.npages, small=True)
    ctl_pfns = ctl.pfns()
    rep[Key.THP_CONTROL] = pinlab_thp.evidence(kind, ctl.addr, ctl_pfns)
    timed(rep, "collapse_control", madvise, ctl.addr, ctl.size, MADV_COLLAPSE)
    rep[Key.THP_CONTROL_AFTER] = pinlab_thp.evidence(kind, ctl.addr, ctl.pfns())
    v0 = vmstat()
    timed(rep, "collapse", madvise, c.m.addr, c.m.size, MADV_COLLAPSE)
    rep[Key.VMSTAT_EVENT] = delta(v0, vmstat())
    pa = c.m.pfns()
    rep[Key.PFNS_AFTER_EVENT] = pa
    rep[Key.THP_AFTER_EVENT] = pinlab_thp.evidence(kind, c.m.addr, pa)
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    rep[Key.PFNS_AFTER_TOUCH] = c.m.pfns()
