"""Event ``oom``.

The victim is killed by the memcg OOM killer (whose reaper invalidates without
blocking); one backing is enough (the killer picks the victim).
"""

from __future__ import annotations

from ..classify import Judge
from . import Event
from .ev_exit import victim


def classify(j: Judge) -> str:
    return victim(j, oom=True)


EVENT = Event(
    "oom",
    order=20,
    backings=("anon",),
    classify=classify,
)
