"""The classifier of the read-only flow: every cell with the option ``readonly`` (an event
that lists it in ``Event.variants``; guest/pinlab_readonly.py runs it).

The region is registered without FOLL_WRITE, the device reads it (DMA_READ's CRC-32)
before and after the event, and the process's view after the event is recorded: the
CRC-32 of its mapping and, for a MAP_SHARED file, of the file, beside the CRC-32 of what
the event should leave there (``crc_expected_after``: zeros where a truncate or hole punch
took the pages, the parent's own write after a fork, the old contents otherwise). The
device should read what the process sees; a device that still reads the old contents
where the process no longer sees them reads a page the kernel took from the process: the
read-side analogue of lost writes (DEVICE_READS_STALE).
"""

from __future__ import annotations

from typing import Any

from pinlab.common.vocab import FILE_SHARED, Key, Outcome

from . import events
from .classify import Inconclusive, Judge, changed, step

CRC_KEYS = (Key.CRC_OLD, Key.CRC_MAP_BEFORE, Key.DEVICE_CRC_BEFORE, Key.CRC_EXPECTED_AFTER,
            Key.CRC_MAP_AFTER, Key.DEVICE_CRC_AFTER)


def crc(rep: dict[str, Any], key: str) -> int:
    """A CRC-32 of the report (an int); :class:`Inconclusive` names it when it is missing."""
    v = rep.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise Inconclusive(f"{key} missing")
    return v


def classify(j: Judge) -> str:
    """The class of a read-only cell, after the shared checks and Judge.registration.

    COHERENT: the device's read after the event equals what the process sees (its mapping,
    and for a MAP_SHARED file the file too), which is what the event leaves.
    REVOKED_IN_TIME: so, for odp with an invalidate the event caused, or odp's read after
    the event failing after such an invalidate. DEVICE_READS_STALE: the device still reads
    the old contents, the process sees something else. DMA_FAILED(ERRNO): a device read
    failed (odp: without an acknowledged invalidate). Needs both reads' errno and CRC-32,
    the audit showing every registered page read, the device and the mapping holding the
    old contents before the event; else :class:`Inconclusive`."""
    rep = j.rep
    if rep.get(Key.READONLY_FLOW) is not True:
        raise Inconclusive("the workload did not run the read-only flow")
    before, after = step(rep, "dma_read_before"), step(rep, "dma_read_after")
    for name, st in (("dma_read_before", before), ("dma_read_after", after)):
        e = st.get(Key.ERRNO)
        if not isinstance(e, int) or isinstance(e, bool):
            raise Inconclusive(f"step {name} missing")
    if before[Key.ERRNO]:
        j.f["dma_read"] = {k: before.get(k) for k in ("step", "errno", "errno_name", "status")}
        return f"DMA_FAILED({before.get('errno_name') or before[Key.ERRNO]})"
    c = {k: crc(rep, k) for k in CRC_KEYS if k != Key.DEVICE_CRC_AFTER or not after[Key.ERRNO]}
    shared_file = j.cell.backing in FILE_SHARED
    if shared_file:
        c[Key.CRC_FILE_AFTER] = crc(rep, Key.CRC_FILE_AFTER)
    j.f["crc"] = c
    old = c[Key.CRC_OLD]
    if not c[Key.CRC_MAP_BEFORE] == c[Key.DEVICE_CRC_BEFORE] == old:
        raise Inconclusive("before the event the device or the mapping did not hold the "
                           "old contents")
    sees = c[Key.CRC_MAP_AFTER]
    if sees != c[Key.CRC_EXPECTED_AFTER]:
        raise Inconclusive("after the event the mapping does not hold what the event "
                           "leaves there")
    if shared_file and c[Key.CRC_FILE_AFTER] != sees:
        raise Inconclusive("after the event the file and the mapping differ")
    j.f["process_sees_old"] = sees == old
    j.f["pfns_changed"] = changed(rep.get(Key.PFNS_REGISTERED), rep.get(Key.PFNS_AFTER_WRITE))
    child = rep.get(Key.CHILD)
    if isinstance(child, dict):
        if rep.get(Key.CHILD_STATUS) != 0 or Key.ERROR in child:
            raise Inconclusive(f"child exited with status {rep.get(Key.CHILD_STATUS)}")
        j.f["child_sees_old"] = child.get(Key.CRC_CHILD_AFTER) == old
    for k in (Key.PINNED_MOVED, Key.CONTROL_MOVED, Key.KEPT_PAGES, Key.HOLE_PAGES):
        if k in rep:
            j.f[k] = rep[k]
    ev = events.event(j.cell.event)
    if ev is not None and j.cell.backing in ev.swap_control:
        from .events.ev_pageout import swap_reached

        swap_reached(j)   # reclaim reached the mapping (anon, private-file)
    q = rep.get(Key.QUERY_AFTER_EVENT)
    if isinstance(q, dict):
        j.f["invalidations"] = q.get("invalidations")
    if after[Key.ERRNO]:
        j.f["dma_read"] = {k: after.get(k) for k in ("step", "errno", "errno_name", "status")}
        return j.revoked_failure(after.get(Key.ERRNO_NAME) or after[Key.ERRNO])
    n = j.npages()
    read = j.audit.get("read_pages")
    j.f["audit_read_pages"] = read
    if not isinstance(read, int) or isinstance(read, bool) or read < n:
        raise Inconclusive(f"audit shows {read} pages read, the region has {n}")
    dev = c[Key.DEVICE_CRC_AFTER]
    if dev == sees:
        if j.cell.mode == "odp" and j.acked():
            return Outcome.REVOKED_IN_TIME
        return Outcome.COHERENT
    if dev == old:
        return Outcome.DEVICE_READS_STALE
    raise Inconclusive("after the event the device read neither what the process sees "
                       "nor the old contents")
