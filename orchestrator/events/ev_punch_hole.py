"""Event ``punch-hole``.

Needs a file (as truncate): FALLOC_FL_PUNCH_HOLE over whole pages of the registered range.
"""

from __future__ import annotations

from pinlab.common.vocab import FILE_SHARED, Key

from ..classify import Judge, step
from . import Event


def classify(j: Judge) -> str:
    j.f["map_after_punch"] = j.rep.get(Key.MAP_AFTER_PUNCH)
    if j.g2_errno():
        return j.revoked_failure(step(j.rep, "dma_write_g2").get("errno_name"))
    return j.outcome(j.views_g(j.file_views(Key.MAP_G2)))


EVENT = Event(
    "punch-hole",
    order=3,
    backings=FILE_SHARED,
    classify=classify,
)
