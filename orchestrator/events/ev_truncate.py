"""Event ``truncate``.

Needs a file: anon has none; private-file (MAP_PRIVATE ext4) would only zap COW copies
that no truncate semantics are documented for. Shrinks the file to half, the device
writes generation 2, the file is extended again. On fsdax (ext4-dax, xfs-dax) the
filesystem waits for the pages' references before it frees the blocks
(dax_layout_busy_page / dax_break_layout, Documentation/filesystems/dax.rst): a pinned
cell's truncate returns only after the workload's helper deregisters (TRUNCATE_BLOCKED);
odp is revoked over the whole file (Judge.dax_revoked_whole_file).
"""

from __future__ import annotations

from pinlab.common.vocab import DAX_BACKINGS, FILE_SHARED, Key, Outcome

from ..classify import Inconclusive, Judge, states, step, view
from . import Event


def classify(j: Judge) -> str:
    blocked = j.truncate_blocked()
    if blocked:
        return blocked
    kept = j.rep.get(Key.KEPT_PAGES)
    if not isinstance(kept, int) or kept <= 0:
        raise Inconclusive("kept_pages missing")
    e = j.g2_errno()
    kept_g2 = j.views_g([Key.MAP_KEPT_G2])
    if e:
        if j.cell.mode == "odp":
            # the device re-faulted and wrote the kept half, then found no page
            # beyond EOF (fsdax: the layout break revoked the whole file)
            if not kept_g2 and j.dax_revoked_whole_file():
                return Outcome.REVOKED_IN_TIME
            if not kept_g2:
                raise Inconclusive("odp DMA failed and the kept pages lack gen2")
            j.wrote_pages(2, kept)
        return j.revoked_failure(step(j.rep, "dma_write_g2").get("errno_name"))
    if not kept_g2:
        return j.outcome(False)
    after = states(view(j.rep, Key.MAP_AFTER_EXTEND))[kept:]
    j.f["truncated_after_extend"] = after
    if not after:
        raise Inconclusive("map_after_extend: page scan empty")
    return j.outcome(all(s == "g2" for s in after))


EVENT = Event(
    "truncate",
    order=2,
    backings=(*FILE_SHARED, *DAX_BACKINGS),
    classify=classify,
    # the read-only flow (orchestrator/readonly.py)
    variants=("", "readonly"),
)
