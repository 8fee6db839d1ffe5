"""Event ``2018``: the guest's steps.

The 2018 recipe: fsync, MADV_PAGEOUT (ext4 strips the buffer_heads), the device writes,
the driver dirties the pages (DIRTY), release, sync.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_2018.py.
"""
import os

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import timed
from pinlab.guest.pinlab_mm import MADV_PAGEOUT

NAME = "2018"


def run(c):
    m, rep = c.m, c.rep
    timed(rep, "fsync", os.fsync, m.fd)
    timed(rep, "madv_pageout", m.mm.madvise, MADV_PAGEOUT)
    rep[Key.PAGEMAP_AFTER_EVENT] = m.pfns()
    c.dma(2)
    rep[Key.DIRTY_PAGES] = timed(rep, "dirty", c.dev.dirty, c.rid)
    c.deregister()
    timed(rep, "sync", os.sync)
