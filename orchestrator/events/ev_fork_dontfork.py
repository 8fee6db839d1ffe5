"""Event ``fork-dontfork``.

fork after MADV_DONTFORK: only meaningful where fork COWs (anon).
"""

from __future__ import annotations

from . import Event
from .ev_fork import classify

EVENT = Event(
    "fork-dontfork",
    order=12,
    backings=("anon",),
    classify=classify,
)
