"""Event ``cpu-write-fast``: the steps of ``cpu-write`` with the region pinned through
the fast path (get/pin_user_pages_fast(), PINLAB_REG_FAST; the query's ``gup_path``
records it). Host side: orchestrator/events/ev_cpu_write_fast.py.
"""

from pinlab.guest.events.ev_cpu_write import fill, run

NAME = "cpu-write-fast"
READONLY = True
FAST = True

__all__ = ["FAST", "NAME", "READONLY", "fill", "run"]
