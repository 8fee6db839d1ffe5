"""Event ``mprotect``: the guest's steps (module ``ev_mprotect``).

mprotect(PROT_READ) of the whole registered range, then mprotect(PROT_READ|PROT_WRITE):
the range is write-protected and made writable again, so the next CPU write (the cell
option ``cpu-write-after``) or the device's re-fault (odp) goes through the write-fault
path. Recorded: both steps, the PFNs after the cycle; then generation 2, the mapping's
scan and the PFNs after it.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_mprotect.py.
"""
import mmap

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import timed
from pinlab.guest.pinlab_mm import mprotect

NAME = "mprotect"


def run(c):
    m, rep = c.m, c.rep
    timed(rep, "mprotect_read", mprotect, m.addr, m.size, mmap.PROT_READ)
    timed(rep, "mprotect_read_write", mprotect, m.addr, m.size,
          mmap.PROT_READ | mmap.PROT_WRITE)
    rep[Key.PFNS_AFTER_EVENT] = m.pfns()
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    rep[Key.PFNS_AFTER_TOUCH] = m.pfns()
