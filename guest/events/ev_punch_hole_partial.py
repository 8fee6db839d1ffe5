"""Event ``punch-hole-partial``: the guest's steps.

A hole of 2 KiB inside one page, then generation 2.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_punch_hole_partial.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import PAGE

NAME = "punch-hole-partial"


def run(c):
    rep = c.rep
    page = 9
    rep[Key.HOLE_BYTES] = [page * PAGE + 1024, 2048]
    if not c.punch(page * PAGE + 1024, 2048):
        return   # fsdax: the region is gone (Cell.layout_step)
    rep[Key.MAP_AFTER_PUNCH] = c.scan_map()
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
