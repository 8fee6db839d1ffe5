"""Event ``punch-hole``.

Needs a file (as truncate): FALLOC_FL_PUNCH_HOLE over whole pages of the registered range.
On fsdax the punch waits for the pages' references as a truncate does (TRUNCATE_BLOCKED
for the pinned modes, ev_truncate).
"""

from __future__ import annotations

from pinlab.common.vocab import DAX_BACKINGS, FILE_SHARED, Key

from ..classify import Judge, step
from . import Event


def classify(j: Judge) -> str:
    blocked = j.truncate_blocked()
    if blocked:
        return blocked
    j.f["map_after_punch"] = j.rep.get(Key.MAP_AFTER_PUNCH)
    if j.g2_errno():
        return j.revoked_failure(step(j.rep, "dma_write_g2").get("errno_name"))
    return j.outcome(j.views_g(j.file_views(Key.MAP_G2)))


EVENT = Event(
    "punch-hole",
    order=3,
    backings=(*FILE_SHARED, *DAX_BACKINGS),
    classify=classify,
    # the read-only flow (orchestrator/readonly.py)
    variants=("", "readonly"),
)
