"""Event ``punch-hole-partial``.

A hole that covers part of a page. hugetlbfs zeroes the partial part of a huge page in
place; btrfs has the events ext4 and xfs have that involve its COW writeback and
checksums (a page dirtied behind its back: writeback, 2018, reclaim), not every hole
variant. fsdax has it: a partial hole zeroes part of a pmem block in place, and the layout
break still waits for the references of the range (dax_layout_busy_page_range).
memfd-thp: a hole inside a shmem THP zeroes the range and tries to split the folio
(truncate_inode_partial_folio; docs/pinning-semantics.md row 55).
"""

from __future__ import annotations

from pinlab.common.vocab import DAX_BACKINGS

from . import Event
from .ev_punch_hole import classify

EVENT = Event(
    "punch-hole-partial",
    order=4,
    backings=("memfd", "tmpfs", "ext4", "xfs", "hugetlb", *DAX_BACKINGS, "memfd-thp"),
    classify=classify,
)
