"""Event ``fork``.

MAP_SHARED backings other than memfd behave alike (docs/pinning-semantics.md row 31).
"""

from __future__ import annotations

from pinlab.common.vocab import CPU_WRITE_OPTION, PRIVATE_BACKINGS, Key, Outcome

from ..classify import Inconclusive, Judge, all_gen, changed, step, view
from . import Event


def classify(j: Judge) -> str:
    rep, cell = j.rep, j.cell
    child = rep.get(Key.CHILD)
    status = rep.get(Key.CHILD_STATUS)
    if not isinstance(child, dict) or not child or "error" in child:
        raise Inconclusive("child report missing")
    if status != 0:
        raise Inconclusive(f"child exited with status {status}")
    if not isinstance(child.get(Key.MAPPED), bool):
        raise Inconclusive("child report lacks 'mapped'")
    parent_ok = j.views_g([Key.MAP_PARENT_G2])
    child_g2 = False
    if child[Key.MAPPED]:
        j.f["child_map"] = view(child, "map")
        child_g2 = all_gen(child[Key.MAP], 2)
    j.f.update(parent_g2=parent_ok, child_g2=child_g2, child_status=status,
               parent_pfns_changed=changed(rep.get(Key.PFNS_BEFORE),
                                               rep.get(Key.PFNS_PARENT_AFTER_WRITE)))
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    if not parent_ok:
        j.wrote(2)
        return Outcome.PARENT_LOSES_WRITES if child_g2 else Outcome.WRITES_LOST_SILENTLY
    if child_g2 and cell.backing in PRIVATE_BACKINGS:
        j.wrote(2)
        return Outcome.CHILD_SEES_WRITES
    return j.outcome(True)


EVENT = Event(
    "fork",
    order=11,
    backings=("anon", "memfd", "private-file"),
    classify=classify,
    # the read-only flow (orchestrator/readonly.py) and the fast path
    variants=("", "readonly", "fast", CPU_WRITE_OPTION),
)
