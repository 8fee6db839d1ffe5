"""Event ``dontneed``.

MADV_DONTNEED. One shmem (memfd) and one disk file (ext4) stand for their kinds, with
the private ones.
"""

from __future__ import annotations

from . import Event
from .ev_pageout import reclaim as classify

EVENT = Event(
    "dontneed",
    order=14,
    backings=("anon", "memfd", "ext4", "private-file"),
    classify=classify,
)
