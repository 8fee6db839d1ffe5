"""Event ``no-ack``: the guest's steps.

odp: the host made the device never acknowledge INVALIDATE; revoke by DONTNEED.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_no_ack.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import timed
from pinlab.guest.pinlab_mm import MADV_DONTNEED

NAME = "no-ack"


def run(c):
    rep = c.rep
    timed(rep, "madv_dontneed", c.m.mm.madvise, MADV_DONTNEED)
    rep[Key.QUERY_AFTER_EVENT] = timed(rep, "query_event", c.dev.query, c.rid)
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
