"""Event ``drop-caches``: the guest's steps.

drop_caches without a sync first.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_drop_caches.py.
"""
from pinlab.guest.pinlab_cell import timed
from pinlab.guest.pinlab_mm import drop_caches

NAME = "drop-caches"


def run(c):
    # no sync first: writeback would itself be an event (PROTECTION_PAGE for odp)
    timed(c.rep, "drop_caches", drop_caches, False)
    c.after_reclaim()
