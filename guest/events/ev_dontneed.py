"""Event ``dontneed``: the guest's steps.

MADV_DONTNEED over the registered range, then generation 2.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_dontneed.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import timed
from pinlab.guest.pinlab_mm import MADV_DONTNEED

NAME = "dontneed"


def run(c):
    rep = c.rep
    timed(rep, "madv_dontneed", c.m.mm.madvise, MADV_DONTNEED)
    rep[Key.PAGEMAP_AFTER_EVENT] = c.m.pfns()
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    rep[Key.PFNS_AFTER_TOUCH] = c.m.pfns()
