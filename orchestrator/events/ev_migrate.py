"""Event ``migrate``.

Compaction and soft offline. Compaction does not move hugetlb pages; tmpfs = memfd;
xfs = ext4 (file pages). anon-thp and memfd-thp: soft offline of a page of a THP splits
the folio first (a pinned folio cannot be split, so its page is not migrated; the
unregistered control THP is split and migrated; docs/pinning-semantics.md row 56).
"""

from __future__ import annotations

from pinlab.common.vocab import CPU_WRITE_OPTION, Key, Outcome

from ..classify import Inconclusive, Judge, step
from . import Event


def classify(j: Judge) -> str:
    rep = j.rep
    j.f.update({k: rep.get(k) for k in ("pinned_moved", "control_moved",
                                            "vmstat_event")})
    j.f["soft_offline"] = {st[Key.STEP]: st.get(Key.ERRNO_NAME) or 0
                           for st in rep.get(Key.STEPS, []) if isinstance(st, dict)
                           and str(st.get(Key.STEP, "")).startswith("soft_offline")}
    pinned, control = rep.get(Key.PINNED_MOVED), rep.get(Key.CONTROL_MOVED)
    if not isinstance(pinned, int) or not isinstance(control, int):
        raise Inconclusive("migration counts missing")
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    good = j.views_g([Key.MAP_G2])
    if not good or pinned or j.cell.mode == "odp":
        return j.outcome(good)
    if not control:
        raise Inconclusive("no page migrated, not even the unregistered control")
    j.wrote(2)
    return Outcome.MIGRATION_FAILS


EVENT = Event(
    "migrate",
    order=10,
    backings=("anon", "memfd", "ext4", "anon-thp", "memfd-thp"),
    classify=classify,
    # the read-only flow (orchestrator/readonly.py) and the fast path
    variants=("", "readonly", "fast", CPU_WRITE_OPTION),
)
