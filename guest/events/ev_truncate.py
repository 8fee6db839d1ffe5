"""Event ``truncate``: the guest's steps.

ftruncate to half the size, the device writes generation 2, extend again. On fsdax the
shrink may wait for the driver's pins (Cell.layout_step): a helper deregisters after
pinlab_dax.HOLD_S and the event ends there; :func:`truncate` with ``never_unpin`` is the
truncate-never-unpin event (nobody deregisters). With the option ``readonly``
(run_readonly, not fsdax): shrink and extend between the device's two reads.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_truncate.py.
"""
import os

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import PAGE, timed
from pinlab.guest.pinlab_readonly import old_contents, with_zeros

NAME = "truncate"


def run(c):
    truncate(c)


def run_readonly(c):
    """The read-only flow (guest/pinlab_readonly.py): ftruncate to half the size, then
    extend again, between the device's two reads. Returns what the process sees then: the
    old contents in the kept half, zeros beyond it (the truncated pages left the file)."""
    m, rep = c.m, c.rep
    half = m.size // 2
    rep[Key.KEPT_PAGES] = half // PAGE
    timed(rep, "ftruncate_shrink", os.ftruncate, m.fd, half)
    rep[Key.PFNS_AFTER_EVENT] = m.pfns()[: half // PAGE]
    timed(rep, "ftruncate_extend", os.ftruncate, m.fd, m.size)
    return with_zeros(old_contents(m.size), half // PAGE, m.npages - half // PAGE)


def truncate(c, never_unpin=False):
    """The truncate's steps; ``never_unpin``: the registration is never released while the
    shrink waits (fsdax only: Cell.layout_step)."""
    m, rep = c.m, c.rep
    half = m.size // 2
    rep[Key.KEPT_PAGES] = half // PAGE
    if not c.layout_step("ftruncate_shrink", os.ftruncate, m.fd, half,
                         never_unpin=never_unpin):
        return
    c.dma(2)
    rep[Key.MAP_KEPT_G2] = c.scan_map(0, half // PAGE)
    rep[Key.PFNS_AFTER_EVENT] = m.pfns()[: half // PAGE]
    timed(rep, "ftruncate_extend", os.ftruncate, m.fd, m.size)
    rep[Key.MAP_AFTER_EXTEND] = c.scan_map()
