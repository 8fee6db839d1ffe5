"""Event ``cpu-write-fork``: a child registers read-only after fork, the parent writes,
the device reads (guest/events/ev_cpu_write_fork.py).

The private backings only (anon, private-file): there the parent's write is a
copy-on-write of pages it shares with the child. Every mode, slow path. The device serves
the child's registration and must read what the child sees (the old contents), never the
parent's write: the parent gets its own copy because the shared page is mapped twice and,
for a pinned page, referenced by the pin (docs/pinning-semantics.md row 51).
"""

from __future__ import annotations

from typing import Any

from pinlab.common.vocab import PRIVATE_BACKINGS, Key, Outcome

from ..classify import Inconclusive, Judge, changed, step_errno
from ..readonly import crc as report_crc
from . import Event


def classify(j: Judge) -> str:
    return judge(j, unmapped=False)


def judge(j: Judge, unmapped: bool) -> str:
    """The class of a cpu-write-fork cell; ``unmapped``: the child munmapped its range
    before the parent's write (cpu-write-fork-unmap), so it has no view of its own and
    the device must read the child's snapshot (the old contents)."""
    rep = j.rep
    child: Any = rep.get(Key.CHILD)
    status = rep.get(Key.CHILD_STATUS)
    if not isinstance(child, dict) or not child or Key.ERROR in child:
        raise Inconclusive("child report missing")
    if status != 0:
        raise Inconclusive(f"child exited with status {status}")
    j.registration(readonly=True)
    # the child says it unmapped its range (cpu-write-fork-unmap), or did not
    if (child.get(Key.MAPPED) is not False) if unmapped else child.get(Key.MAPPED) is False:
        raise Inconclusive(f"the child's report says mapped={child.get(Key.MAPPED)}")
    for name in ("dma_read_before", "cpu_write"):
        if step_errno(rep, name):
            raise Inconclusive(f"step {name} failed")
    if step_errno(rep, "dma_read_after"):
        # odp, child unmapped: its munmap invalidated and the device finds no page
        if unmapped and j.cell.mode == "odp" and j.acked():
            return Outcome.REVOKED_IN_TIME
        raise Inconclusive("step dma_read_after failed")
    keys = (Key.CRC_OLD, Key.CRC_NEW, Key.CRC_MAP_BEFORE, Key.CRC_MAP_AFTER,
            *(() if unmapped else (Key.CRC_CHILD_AFTER,)),
            Key.DEVICE_CRC_BEFORE, Key.DEVICE_CRC_AFTER)
    crc = {k: report_crc(rep, k) for k in keys}
    j.f["crc"] = crc
    old, new = crc[Key.CRC_OLD], crc[Key.CRC_NEW]
    if old == new:
        raise Inconclusive("old and new contents have the same CRC-32")
    if not crc[Key.CRC_MAP_BEFORE] == crc[Key.DEVICE_CRC_BEFORE] == old:
        raise Inconclusive("before the write the device or the mapping did not hold the "
                           "old contents")
    if crc[Key.CRC_MAP_AFTER] != new:
        raise Inconclusive("the parent's mapping does not hold its write")
    if not unmapped and crc[Key.CRC_CHILD_AFTER] != old:
        raise Inconclusive("the child's mapping changed with the parent's write")
    n = j.npages()
    read = j.audit.get("read_pages")
    j.f["audit_read_pages"] = read
    if not isinstance(read, int) or isinstance(read, bool) or read < n:
        raise Inconclusive(f"audit shows {read} pages read, the region has {n}")
    j.f["parent_pfns_changed_at_write"] = changed(rep.get(Key.PFNS_BEFORE),
                                                  rep.get(Key.PFNS_AFTER_WRITE))
    j.f["child_pfns_changed_at_register"] = changed(rep.get(Key.PFNS_BEFORE),
                                                    rep.get(Key.PFNS_REGISTERED))
    j.f["child_pfns_changed"] = changed(rep.get(Key.PFNS_REGISTERED), child.get(Key.PFNS))
    if crc[Key.DEVICE_CRC_AFTER] == old:
        if j.cell.mode == "odp" and j.acked():
            return Outcome.REVOKED_IN_TIME
        return Outcome.COHERENT
    if crc[Key.DEVICE_CRC_AFTER] == new:
        raise Inconclusive("the child's device read the parent's write (a copy-on-write "
                           "leak no class names yet)")
    raise Inconclusive("after the write the device read neither the old nor the new contents")


EVENT = Event(
    "cpu-write-fork",
    order=26,
    backings=PRIVATE_BACKINGS,
    classify=classify,
    last_gen=1,
    smoke=("longterm", "private-file"),   # unshared in the child on 6.12 and 7, not on 6.1
    readonly=True,
    # and the child's pin taken by get/pin_user_pages_fast() (the same classes, row 50)
    variants=("", "fast"),
)
