"""Event ``odirect-write``.

Only disk filesystems have O_DIRECT over a page cache (docs/pinning-semantics.md
row 13).
"""

from __future__ import annotations

from pinlab.common.vocab import DISK_BACKINGS, Key

from ..classify import Inconclusive, Judge, changed, step, step_errno
from . import Event


def classify(j: Judge) -> str:
    rep = j.rep
    j.f.update({k: rep.get(k) for k in ("odirect_pages", "map_after_odirect")})
    j.f["odirect"] = step(rep, "odirect_write")
    if step_errno(rep, "odirect_write"):
        raise Inconclusive("O_DIRECT write failed")
    j.f["pfns_changed"] = changed(rep.get(Key.PFNS_BEFORE), rep.get(Key.PFNS_AFTER_TOUCH))
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    return j.outcome(j.views_g([Key.MAP_G2, Key.FILE_AFTER]))


EVENT = Event(
    "odirect-write",
    order=18,
    backings=DISK_BACKINGS,
    classify=classify,
)
