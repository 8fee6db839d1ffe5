"""Event ``punch-hole``: the guest's steps.

FALLOC_FL_PUNCH_HOLE over whole pages (a huge page for hugetlb), then generation 2. On
fsdax the punch may wait for the driver's pins (Cell.layout_step): a helper deregisters,
and the event ends there. With the option ``readonly`` (run_readonly, not fsdax): the punch
between the device's two reads.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_punch_hole.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import HPAGE, PAGE, timed
from pinlab.guest.pinlab_mm import punch_hole
from pinlab.guest.pinlab_readonly import old_contents, with_zeros

NAME = "punch-hole"


def hole(m):
    """The hole: (first page, pages): the second huge page for hugetlb, else pages 4-7."""
    unit = HPAGE if m.kind == "hugetlb" else 4 * PAGE
    return unit // PAGE, unit // PAGE


def run_readonly(c):
    """The read-only flow (guest/pinlab_readonly.py): the hole punch between the device's
    two reads. Returns what the process sees then: zeros in the hole."""
    m, rep = c.m, c.rep
    first, count = hole(m)
    rep[Key.HOLE_PAGES] = [first, count]
    timed(rep, "punch_hole", punch_hole, m.fd, first * PAGE, count * PAGE)
    return with_zeros(old_contents(m.size), first, count)


def run(c):
    m, rep = c.m, c.rep
    unit = HPAGE if m.kind == "hugetlb" else 4 * PAGE
    first, count = hole(m)
    rep[Key.HOLE_PAGES] = [first, count]
    if not c.punch(unit, unit):
        return   # fsdax: the region is gone (Cell.layout_step)
    rep[Key.MAP_AFTER_PUNCH] = c.scan_map()
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
