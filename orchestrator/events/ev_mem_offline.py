"""Event ``mem-offline``.

Anonymous pages in a hot-added ZONE_MOVABLE DIMM (file pages behave alike for
offline: migration is refused on the extra reference either way,
docs/pinning-semantics.md row 24); rows 26-28.
"""

from __future__ import annotations

from pinlab.common.vocab import CPU_WRITE_OPTION, Key, Outcome

from ..classify import Inconclusive, Judge, changed, step
from . import Event


def classify(j: Judge) -> str:
    rep = j.rep
    off = rep.get(Key.OFFLINE)
    j.f.update(blocks=rep.get(Key.BLOCKS), offline=off,
               movable_pages=rep.get(Key.MOVABLE_PAGES),
               moved_at_registration=changed(rep.get(Key.PFNS_BEFORE),
                                                 rep.get(Key.PFNS_REGISTERED)),
               moved_by_offline=changed(rep.get(Key.PFNS_REGISTERED),
                                            rep.get(Key.PFNS_AFTER_TOUCH)),
               migration_failures=j.dm.lines.get("MIGRATION_FAILURE", [])[:3])
    if not isinstance(off, list) or not off:
        raise Inconclusive("no registered page was in a movable block")
    if not all(isinstance(o, dict) and "result" in o for o in off):
        raise Inconclusive("offline results malformed")
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    good = j.views_g([Key.MAP_G2])
    if not good:
        return j.outcome(False)
    j.wrote(2)
    if all(o[Key.RESULT] == "ok" for o in off):
        if j.cell.mode == "odp" and j.acked():
            return Outcome.REVOKED_IN_TIME
        return Outcome.OFFLINE_SUCCEEDS
    return Outcome.OFFLINE_BLOCKED


EVENT = Event(
    "mem-offline",
    order=21,
    backings=("anon",),
    classify=classify,
    scenario="mem_offline",
    # and with the CPU write after the event (README "Cell options"; its private
    # backings only, vocab.OPTION_BACKINGS)
    variants=("", CPU_WRITE_OPTION),
)
