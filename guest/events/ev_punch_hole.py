"""Event ``punch-hole``: the guest's steps.

FALLOC_FL_PUNCH_HOLE over whole pages (a huge page for hugetlb), then generation 2. On
fsdax the punch may wait for the driver's pins (Cell.layout_step): a helper deregisters,
and the event ends there.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_punch_hole.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import HPAGE, PAGE

NAME = "punch-hole"


def run(c):
    m, rep = c.m, c.rep
    unit = HPAGE if m.kind == "hugetlb" else 4 * PAGE
    first, count = unit // PAGE, unit // PAGE
    rep[Key.HOLE_PAGES] = [first, count]
    if not c.punch(unit, unit):
        return   # fsdax: the region is gone (Cell.layout_step)
    rep[Key.MAP_AFTER_PUNCH] = c.scan_map()
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
