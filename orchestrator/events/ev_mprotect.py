"""Event ``mprotect``: mprotect(PROT_READ), then mprotect(PROT_READ|PROT_WRITE) of the
registered range (guest/events/ev_mprotect.py).

anon and private-file (private pages: the next CPU write goes through the write-fault
path, which reuses an exclusive anonymous page and copies any other) and memfd (a
MAP_SHARED page is written in place; the cycle only re-arms write notification). All four
modes; the private backings also with ``cpu-write-after``. The pinned pages stay mapped
and exclusive (change_protection() only changes the PTEs' write bit), so the device's write
stays visible; odp sees the write protection through its notifier
(MMU_NOTIFY_PROTECTION_VMA) and re-faults (docs/pinning-semantics.md rows 73 and 72).
"""

from __future__ import annotations

from pinlab.common.vocab import CPU_WRITE_OPTION, Key

from ..classify import Inconclusive, Judge, changed, step, step_errno
from . import Event


def classify(j: Judge) -> str:
    rep = j.rep
    for name in ("mprotect_read", "mprotect_read_write"):
        if step_errno(rep, name):
            raise Inconclusive(f"{name} failed ({step(rep, name).get('errno_name')})")
    j.f["pfns_changed"] = changed(rep.get(Key.PFNS_REGISTERED), rep.get(Key.PFNS_AFTER_TOUCH))
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    return j.outcome(j.views_g(j.file_views(Key.MAP_G2)))


EVENT = Event(
    "mprotect",
    order=37,
    backings=("anon", "memfd", "private-file"),
    classify=classify,
    variants=("", CPU_WRITE_OPTION),
)
