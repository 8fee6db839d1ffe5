"""Event ``munmap``.

One shmem (memfd) and one disk file (ext4) stand for their kinds; the fsdax files have it
too (the mapping ends, the pmem blocks stay the file's: a new mapping maps the same PFNs).
"""

from __future__ import annotations

from pinlab.common.vocab import DAX_BACKINGS, Key, Outcome

from ..classify import Inconclusive, Judge, step, step_errno
from . import Event


def classify(j: Judge) -> str:
    if step_errno(j.rep, "munmap"):
        raise Inconclusive("munmap failed")
    if j.g2_errno():
        return j.revoked_failure(step(j.rep, "dma_write_g2").get("errno_name"))
    if j.cell.backing == "anon":
        # anonymous memory nobody maps any more: the device wrote into orphaned pages
        j.wrote(2)
        return Outcome.WRITES_LOST_SILENTLY
    return j.outcome(j.views_g([Key.REMAP_G2]))


EVENT = Event(
    "munmap",
    order=13,
    backings=("anon", "memfd", "ext4", *DAX_BACKINGS),
    classify=classify,
)
