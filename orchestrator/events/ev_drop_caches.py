"""Event ``drop-caches``.

Only the page cache is dropped: anon and private-file COW pages are not page cache;
hugetlb is not on the LRU.
"""

from __future__ import annotations

from . import Event
from .ev_pageout import reclaim as classify

EVENT = Event(
    "drop-caches",
    order=7,
    backings=("memfd", "tmpfs", "ext4", "xfs", "btrfs"),
    classify=classify,
)
