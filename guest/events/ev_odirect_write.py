"""Event ``odirect-write``: the guest's steps.

An O_DIRECT write over part of the registered, cached, mapped range: the kernel
writes back and invalidates the page cache there (invalidate_inode_pages2), pin or
no pin (docs/pinning-semantics.md row 13). Then the device writes generation 2 over
everything.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_odirect_write.py.
"""
import mmap
import os

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import PAGE, timed

NAME = "odirect-write"


def run(c):
    m, rep = c.m, c.rep
    first, count = 4, 4
    rep[Key.ODIRECT_PAGES] = [first, count]
    buf = mmap.mmap(-1, count * PAGE)          # page aligned, zero filled
    fd = os.open(m.path, os.O_WRONLY | os.O_DIRECT)
    try:
        timed(rep, "odirect_write", os.pwritev, fd, [buf], first * PAGE)
    finally:
        os.close(fd)
        buf.close()
    rep[Key.PAGEMAP_AFTER_EVENT] = m.pfns()
    rep[Key.MAP_AFTER_ODIRECT] = c.scan_map()
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    rep[Key.PFNS_AFTER_TOUCH] = m.pfns()
