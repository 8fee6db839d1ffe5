"""Event ``exit``.

A second process dies (SIGKILL) with a region registered; anon and memfd stand for
private and shared memory; the fsdax files have it too (release() at exit unpins pmem
pages that no page cache stands behind).
"""

from __future__ import annotations

from pinlab.common.vocab import DAX_BACKINGS, FOLL_PIN_MODES, Key, Outcome

from ..classify import Inconclusive, Judge, outstanding
from . import Event


def victim(j: Judge, oom: bool = False) -> str:
    """exit / oom: a second process registered a region and died without
    deregistering; its region (audit ``victim``) is what is judged."""
    rep, cell = j.rep, j.cell
    victim = rep.get(Key.VICTIM)
    va = j.audit.get("victim")
    j.f.update(victim_status=rep.get(Key.VICTIM_STATUS),
               victim_signal=rep.get(Key.VICTIM_SIGNAL),
               victim_exit_ms=rep.get(Key.VICTIM_EXIT_MS),
               oom_events=rep.get(Key.OOM_EVENTS),
               pins_victim=[outstanding(rep.get(Key.VMSTAT_BEFORE_VICTIM)),
                               outstanding(rep.get(Key.VMSTAT_VICTIM_REGISTERED)),
                               outstanding(rep.get(Key.VMSTAT_VICTIM_GONE))])
    before, after = rep.get(Key.NONBLOCK_REFUSED_BEFORE), rep.get(Key.NONBLOCK_REFUSED_AFTER)
    if isinstance(before, int) and isinstance(after, int):
        j.f["nonblock_invalidations_refused"] = after - before
    if not isinstance(victim, dict) or "error" in victim or "region" not in victim:
        raise Inconclusive("victim report missing")
    if not isinstance(rep.get(Key.VICTIM_STATUS), int):
        raise Inconclusive(f"victim did not die: {rep.get('victim_status')}")
    va = j.need_audit(va, "victim region")
    j.f.update(victim_audit=va.get("kinds"), victim_violations=va.get("violations"))
    if va["violations"]:
        j.f["violations"] = va.get("violation_samples")
        return Outcome.DMA_AFTER_REVOKE
    if oom and not (rep.get(Key.OOM_EVENTS) or {}).get("oom_kill"):
        raise Inconclusive("the memcg OOM killer did not kill the victim")
    b, r, g = j.f["pins_victim"]
    if cell.mode in FOLL_PIN_MODES:
        if b is None or r is None or g is None:
            raise Inconclusive("vmstat pin counters missing")
        if r <= b:
            raise Inconclusive("the victim's registration added no pin")
        if g != b:
            return Outcome.PINS_LEAKED
    kinds = va.get("kinds") or {}
    if not kinds.get("destroy"):
        return Outcome.REGION_NOT_RELEASED
    if cell.mode == "odp":
        if kinds.get("invalidate_ack") and va.get("ack_before_destroy"):
            return Outcome.REVOKED_IN_TIME
        raise Inconclusive("odp victim destroyed without an acknowledged invalidate")
    return Outcome.RELEASED_AT_EXIT


def classify(j: Judge) -> str:
    return victim(j)


EVENT = Event(
    "exit",
    order=19,
    backings=("anon", "memfd", *DAX_BACKINGS),
    classify=classify,
)
