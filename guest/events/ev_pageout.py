"""Event ``pageout``: the guest's steps.

MADV_PAGEOUT of the mapping (with control pages where SWAP_CONTROL says).

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_pageout.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import timed
from pinlab.guest.pinlab_mm import MADV_PAGEOUT, delta, vmstat

NAME = "pageout"
#: backings whose mapping gets unregistered control pages that must reach swap
SWAP_CONTROL = ("anon", "private-file")


def run(c):
    v0 = vmstat()
    timed(c.rep, "madv_pageout", c.m.mm.madvise, MADV_PAGEOUT)
    c.rep[Key.VMSTAT_EVENT] = delta(v0, vmstat())
    c.after_reclaim()
