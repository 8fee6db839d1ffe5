"""Event ``pageout``: the guest's steps.

MADV_PAGEOUT of the mapping (with control pages where SWAP_CONTROL says). With the option
``readonly`` (run_readonly) between the device's two reads.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_pageout.py.
"""
import os

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import timed
from pinlab.guest.pinlab_mm import MADV_PAGEOUT, delta, vmstat

NAME = "pageout"
#: backings whose mapping gets unregistered control pages that must reach swap
SWAP_CONTROL = ("anon", "private-file", "anon-thp")


def before_mapping(c):
    """Run the cell on one CPU. MADV_PAGEOUT drains only the calling CPU's LRU batches
    (mm/madvise.c: ``lru_add_drain()`` before the page walk); a page faulted on the other
    vCPU that still sits in that CPU's batch is not on an LRU list yet, cannot be isolated
    and is skipped. Seen once in a CI run (6.12 longterm anon: no control page swapped,
    INCONCLUSIVE). With the faults and the madvise on one CPU, the drain covers them all."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def run(c):
    pageout(c)
    c.after_reclaim()


def pageout(c):
    """MADV_PAGEOUT of the whole mapping (control pages included), with the vmstat delta."""
    v0 = vmstat()
    timed(c.rep, "madv_pageout", c.m.mm.madvise, MADV_PAGEOUT)
    c.rep[Key.VMSTAT_EVENT] = delta(v0, vmstat())


def run_readonly(c):
    """The read-only flow (guest/pinlab_readonly.py): MADV_PAGEOUT between the device's two
    reads; pagemap of the region and of the control pages after it, then the control pages
    read back (swap-in). The process keeps seeing the old contents (the flow reads the
    region back, which swaps it in)."""
    rep = c.rep
    pageout(c)
    rep[Key.PAGEMAP_AFTER_EVENT] = c.m.pfns()
    if c.control is not None:
        rep[Key.CONTROL_PAGEMAP_AFTER_EVENT] = c.control.pagemap()
        rep[Key.CONTROL_INTACT] = c.control.intact()
