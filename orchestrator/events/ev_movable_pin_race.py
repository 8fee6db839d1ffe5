"""Event ``movable-pin-race``.

Long-term pins of pages in ZONE_MOVABLE (a hot-added DIMM onlined movable, as for
mem-offline) and, where the kernel has a CMA area, in CMA, taken at once from two threads
right after the pages were faulted in on another CPU, 50 times (and 25 times with one
pinner, to tell a failure of concurrent pinners from one a lone pinner meets); then the
Movable blocks are offlined (docs/pinning-semantics.md rows 79-81). Only ``longterm``:
gup and pin are short-term and may stay in a movable block by design
(pin_user_pages.rst). anon and
memfd: the two kinds of movable user memory the migrate-at-pin path handles (anon folios
and shmem folios).
"""

from __future__ import annotations

from typing import Any

from pinlab.common.vocab import Key, Outcome

from ..classify import Inconclusive, Judge, changed, step
from . import Event


def race_facts(race: Any) -> dict[str, Any]:
    """Summarise the guest's ``race`` record: rounds, pages faulted in Movable/CMA, the
    registrations' errnos, and every PFN left long-term pinned in a Movable block or in
    CMA (``pinned``: {"movable": [...], "cma": [...]}). Raises Inconclusive when the
    rounds are missing or malformed, or when no page of any round was faulted in a
    Movable block: then the race was not run on the memory it is about; likewise when
    the kernel has a CMA area (``cma_ranges``) and no page was faulted in it."""
    if not isinstance(race, dict):
        raise Inconclusive("race facts missing")
    rounds = race.get(Key.ROUNDS)
    if not isinstance(rounds, list) or not rounds or not all(
            isinstance(r, dict) and isinstance(r.get(Key.ERRNOS), list)
            and isinstance(r.get(Key.PINNED_IN_MOVABLE), list)
            and isinstance(r.get(Key.PINNED_IN_CMA), list) for r in rounds):
        raise Inconclusive("race rounds missing or malformed")
    if any(e == "no result" for r in rounds for e in r[Key.ERRNOS]):
        raise Inconclusive("a pinner thread of the race gave no result")
    faulted_mov = sum(int(r.get(Key.FAULTED_IN_MOVABLE) or 0) for r in rounds)
    faulted_cma = sum(int(r.get(Key.FAULTED_IN_CMA) or 0) for r in rounds)
    if not faulted_mov:
        raise Inconclusive("no page of the race was faulted in a Movable block")
    if race.get(Key.CMA_RANGES) and not faulted_cma:
        raise Inconclusive("the kernel has a CMA area but no page of the race was "
                           "faulted in it")
    errnos = sorted({e for r in rounds for e in r[Key.ERRNOS] if e != 0})
    pinned = {"movable": sorted({p for r in rounds for p in r[Key.PINNED_IN_MOVABLE]}
                                | set(race.get(Key.CELL_PINNED_IN_MOVABLE) or [])),
              "cma": sorted({p for r in rounds for p in r[Key.PINNED_IN_CMA]}
                            | set(race.get(Key.CELL_PINNED_IN_CMA) or []))}
    return {"rounds": len(rounds),
            "cma_rounds": sum(1 for r in rounds if r.get(Key.PHASE) == "cma"),
            "faulted_in_movable": faulted_mov,
            "faulted_in_cma": faulted_cma, "register_errors": errnos,
            "rounds_failed": {ph: sum(1 for r in rounds if r.get(Key.PHASE, "movable") == ph
                                      and any(e != 0 for e in r[Key.ERRNOS]))
                              for ph in sorted({str(r.get(Key.PHASE, "movable"))
                                                for r in rounds})},
            "pinned": pinned, "movable_blocks": race.get(Key.MOVABLE_BLOCKS),
            "cma_ranges": race.get(Key.CMA_RANGES), "cma_meminfo_kb": race.get(Key.CMA),
            "race_ms": race.get(Key.MS)}


def classify(j: Judge) -> str:
    rep = j.rep
    facts = j.f["race"] = race_facts(rep.get(Key.RACE))
    off = rep.get(Key.OFFLINE)
    j.f.update(blocks=rep.get(Key.BLOCKS), offline=off,
               moved_at_registration=changed(rep.get(Key.PFNS_BEFORE),
                                             rep.get(Key.PFNS_REGISTERED)))
    if facts["pinned"]["movable"] or facts["pinned"]["cma"]:
        return Outcome.PINNED_IN_MOVABLE
    if facts["register_errors"]:
        return f"PIN_REFUSED({facts['register_errors'][0]})"
    if not isinstance(off, list) or not off:
        raise Inconclusive("no movable block to offline")
    if not all(isinstance(o, dict) and Key.RESULT in o for o in off):
        raise Inconclusive("offline results malformed")
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    if not j.views_g([Key.MAP_G2]):
        return j.outcome(False)
    j.wrote(2)
    if all(o[Key.RESULT] == "ok" for o in off):
        return Outcome.OFFLINE_SUCCEEDS
    return Outcome.OFFLINE_BLOCKED


EVENT = Event(
    "movable-pin-race",
    order=54,
    backings=("anon", "memfd"),
    modes=("longterm",),
    classify=classify,
    scenario="mem_offline",
)
