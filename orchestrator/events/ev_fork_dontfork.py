"""Event ``fork-dontfork``.

fork after MADV_DONTFORK: only meaningful where fork COWs (anon).
"""

from __future__ import annotations

from pinlab.common.vocab import CPU_WRITE_OPTION

from . import Event
from .ev_fork import classify

EVENT = Event(
    "fork-dontfork",
    order=12,
    backings=("anon",),
    classify=classify,
    # and with the CPU write after the event (README "Cell options"; its private
    # backings only, vocab.OPTION_BACKINGS)
    variants=("", CPU_WRITE_OPTION),
)
