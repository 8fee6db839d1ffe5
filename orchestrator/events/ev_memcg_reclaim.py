"""Event ``memcg-reclaim``.

memory.reclaim of the cell's cgroup; the backings of pageout but btrfs. btrfs
memcg-reclaim is left out until it is deterministic: 6.12 gup gave DIRTY_FOLIO_REJECTED
in one run and COHERENT in the next (2026-11-30, the CI-equivalent run: the folio was
not cleaned before the driver dirtied it), depending on what memory.reclaim wrote back
first; it needs a writeback step of its own first.
"""

from __future__ import annotations

from pinlab.common.vocab import CPU_WRITE_OPTION, PRIVATE_BACKINGS

from ..classify import Judge
from . import Event
from .ev_pageout import reclaim


def classify(j: Judge) -> str:
    return reclaim(j, EVENT.swap_control)


EVENT = Event(
    "memcg-reclaim",
    order=6,
    backings=("anon", "memfd", "ext4", "xfs", "private-file"),
    classify=classify,
    swap_control=PRIVATE_BACKINGS,
    # and with the CPU write after the event (README "Cell options"; its private
    # backings only, vocab.OPTION_BACKINGS)
    variants=("", CPU_WRITE_OPTION),
)
