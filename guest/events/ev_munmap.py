"""Event ``munmap``: the guest's steps.

munmap the registered range, the device writes; files are mapped again and scanned.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_munmap.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import scan, timed

NAME = "munmap"


def run(c):
    m, rep = c.m, c.rep
    timed(rep, "munmap", m.unmap)
    c.dma(2)
    if m.fd is not None:
        mm = c.remap()
        rep[Key.REMAP_G2] = scan(mm, c.rid, m.npages)
        mm.close()
