"""Event ``cpu-write-fast``: ``cpu-write`` with the pages taken by get/pin_user_pages_fast()
(PINLAB_REG_FAST), so the pinned modes only. The fast path walks the page tables without
mmap_lock and falls back to the slow path for a page it may not take; the classes are
those of ``cpu-write`` (docs/pinning-semantics.md row 50).
"""

from __future__ import annotations

from pinlab.common.vocab import BACKINGS, DAX_BACKINGS, PINNED_MODES, THP_BACKINGS

from ..classify import Judge
from . import Event
from .ev_cpu_write import judge


def classify(j: Judge) -> str:
    return judge(j, fast=True)


EVENT = Event(
    "cpu-write-fast",
    order=25,
    # not the fsdax backings yet: their read-only registrations were never observed
    backings=tuple(b for b in BACKINGS if b not in (*DAX_BACKINGS, *THP_BACKINGS)),
    modes=PINNED_MODES,
    classify=classify,
    last_gen=1,
    smoke=("longterm", "private-file"),   # the read-only cell that differs between kernels
)
