"""Event ``no-ack``.

The device never acknowledges INVALIDATE (fault never-ack-revoke), the process revokes
by MADV_DONTNEED: the driver must escalate. Only odp revokes, so only odp has a revoke
to leave unacknowledged.
"""

from __future__ import annotations

from pinlab.common.vocab import Key, Outcome

from ..classify import ESCALATION_LINES, Inconclusive, Judge, step
from . import Event


def classify(j: Judge) -> str:
    rep, dm = j.rep, j.dm
    j.f["madv_dontneed_ms"] = step(rep, "madv_dontneed").get("ms")
    j.f["escalation_lines"] = [ln for ln in dm.pinlab_lines
                               if any(x in ln for x in ESCALATION_LINES)][:4]
    q = rep.get(Key.QUERY_AFTER_EVENT)
    j.f["query_after_event"] = q
    j.f["resets"] = j.audit.get("resets")
    failed = isinstance(q, dict) and q.get("state") == 1
    refused = bool(step(rep, "dma_write_g2").get("errno"))
    if j.f["escalation_lines"] and (failed or refused):
        if not j.audit.get("resets"):
            raise Inconclusive("escalation logged but no reset in the audit")
        return Outcome.ESCALATED_RESET
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    return j.outcome(j.views_g([Key.MAP_G2]))


EVENT = Event(
    "no-ack",
    order=22,
    backings=("anon", "memfd"),
    classify=classify,
    modes=("odp",),
    scenario="no_ack",
    faults={"never-ack-revoke": True},
)
