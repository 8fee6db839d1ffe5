"""Event ``cpu-write`` (and ``cpu-write+fast``): a read-only registration, a device read,
a CPU write through the process's mapping, a device read again
(guest/events/ev_cpu_write.py).

Every backing and every mode: a read-only pin (no FOLL_WRITE) of a page the process may
later write is coherent only if the kernel made the pinned page the one the process keeps
writing. For MAP_SHARED backings and for anon memory the process already wrote (an
exclusive anonymous page) the write lands in the pinned page. For a MAP_PRIVATE file
mapped by read faults, the write fault copies the page (COW) unless the pin unshared it
first: FOLL_LONGTERM R/O pins do since 6.2 (docs/pinning-semantics.md row 47), short-term
R/O pins never do (row 48). odp re-faults through its notifier (row 49).
"""

from __future__ import annotations

from pinlab.common.vocab import BACKINGS, DAX_BACKINGS, THP_BACKINGS, Key, Outcome

from ..classify import Inconclusive, Judge, changed, step, step_errno
from ..readonly import crc as report_crc
from . import Event

CRC_KEYS = (Key.CRC_OLD, Key.CRC_NEW, Key.CRC_MAP_BEFORE, Key.CRC_MAP_AFTER,
            Key.DEVICE_CRC_BEFORE, Key.DEVICE_CRC_AFTER)


def judge(j: Judge) -> str:
    """The class of a cpu-write cell (read-only by nature; ``+fast``: the pages were taken
    by the fast path, Judge.registration checks which)."""
    rep = j.rep
    j.registration(readonly=True)
    e = step_errno(rep, "dma_read_before") or step_errno(rep, "dma_read_after")
    if e:
        bad = step(rep, "dma_read_before" if step_errno(rep, "dma_read_before")
                   else "dma_read_after")
        j.f["dma_read"] = {k: bad.get(k) for k in ("step", "errno", "errno_name", "status")}
        return f"DMA_FAILED({bad.get('errno_name') or e})"
    if step_errno(rep, "cpu_write"):
        raise Inconclusive("the CPU write step failed")
    crc = {k: report_crc(rep, k) for k in CRC_KEYS}
    j.f["crc"] = crc
    if crc[Key.CRC_OLD] == crc[Key.CRC_NEW]:
        raise Inconclusive("old and new contents have the same CRC-32")
    if not crc[Key.CRC_MAP_BEFORE] == crc[Key.DEVICE_CRC_BEFORE] == crc[Key.CRC_OLD]:
        raise Inconclusive("before the write the device or the mapping did not hold the "
                           "old contents")
    if crc[Key.CRC_MAP_AFTER] != crc[Key.CRC_NEW]:
        raise Inconclusive("the mapping does not hold the process's write")
    n = j.npages()
    read = j.audit.get("read_pages")
    j.f["audit_read_pages"] = read
    if not isinstance(read, int) or isinstance(read, bool) or read < n:
        raise Inconclusive(f"audit shows {read} pages read, the region has {n}")
    j.f["pfns_changed_at_register"] = changed(rep.get(Key.PFNS_BEFORE),
                                              rep.get(Key.PFNS_REGISTERED))
    j.f["pfns_changed_at_write"] = changed(rep.get(Key.PFNS_REGISTERED),
                                           rep.get(Key.PFNS_AFTER_WRITE))
    q = rep.get(Key.QUERY_AFTER_EVENT)
    if isinstance(q, dict):
        j.f["invalidations"] = q.get("invalidations")
    dev = crc[Key.DEVICE_CRC_AFTER]
    if dev == crc[Key.CRC_NEW]:
        # odp: the write replaced the page (COW) and the device acknowledged the notifier's
        # INVALIDATE before its next read faulted the new page in
        if j.cell.mode == "odp" and j.acked():
            return Outcome.REVOKED_IN_TIME
        return Outcome.COHERENT
    if dev == crc[Key.CRC_OLD]:
        return Outcome.DEVICE_READS_STALE
    raise Inconclusive("after the write the device read neither the old nor the new contents")


def classify(j: Judge) -> str:
    return judge(j)


EVENT = Event(
    "cpu-write",
    order=24,
    # not the fsdax backings yet: their read-only registrations were never observed
    backings=tuple(b for b in BACKINGS if b not in (*DAX_BACKINGS, *THP_BACKINGS)),
    classify=classify,
    last_gen=1,
    smoke=("longterm", "private-file"),   # the read-only cell that differs between kernels
    # and with the pages taken by get/pin_user_pages_fast() (PINLAB_REG_FAST): the fast
    # path walks the page tables without mmap_lock and falls back to the slow path for a
    # page it may not take; the classes are the slow path's (docs/pinning-semantics.md
    # row 50)
    variants=("", "fast"),
    readonly=True,
)
