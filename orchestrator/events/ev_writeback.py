"""Event ``writeback``.

Only filesystems with writeback (ext4, xfs, btrfs) write anything back.
"""

from __future__ import annotations

from pinlab.common.vocab import DISK_BACKINGS, Key, Outcome

from ..classify import Judge, step
from . import Event


def classify(j: Judge) -> str:
    j.f["stream_chunks"] = j.rep.get(Key.STREAM_CHUNKS)
    if j.g2_errno():
        return j.revoked_failure(step(j.rep, "dma_write_g2").get("errno_name"))
    j.wrote(2)
    reg = j.views_g([Key.DISK_REGISTERED])
    rel = j.views_g([Key.DISK_RELEASED])
    if not rel:
        return Outcome.WRITES_LOST_SILENTLY
    return j.outcome(True) if reg else Outcome.WRITEBACK_STALE


EVENT = Event(
    "writeback",
    order=8,
    backings=DISK_BACKINGS,
    classify=classify,
)
