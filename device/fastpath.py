"""The streams' data path, compiled (numba) and run without the interpreter lock.

A stream's chunks are written by :func:`stream_batch`, a loop compiled with numba
(``nogil``): one call writes up to ``max_chunks`` chunks of the DMA pattern straight into
the numpy view of one guest RAM mapping, with no Python between chunks, so other device
threads (the vfio-user socket, the SQ fetcher that executes INVALIDATE) keep the
interpreter while a stream runs, and a 64 KiB chunk costs about its memory write.

Coordination uses a small shared ``int64`` array per stream (``CTL_*`` slots), written by
Python threads and read by the loop at every chunk boundary (x86-64 keeps stores in
order, so everything the loop wrote is visible before its ``CTL_INSIDE = 0``):

* ``CTL_HOLD`` (region page-table changers: INVALIDATE, MAP_PAGES, DESTROY), ``CTL_MEM``
  (DMA_UNMAP of guest RAM) and ``CTL_STOP``: the loop returns before its next chunk;
* ``CTL_INSIDE``: 1 from before the call until the loop has written its last chunk; a
  changer waits for 0, after which no chunk is in flight and none starts until it is done;
* ``CTL_LOGN``: how many chunks of this call are in ``log`` (offset, bytes, generation per
  row), so the audit records of every chunk written can be made before an INVALIDATE is
  acknowledged (``Stream.drain``).

The loop writes a chunk only if every page of it is mapped, guest-physically contiguous
and inside the one mapping it was given; otherwise it returns and the stream's Python
path handles that chunk (page fault, several runs, another mapping), as before.

Priority (sched.py): called with ``rt`` = 1 by a real-time stream thread, the loop drops
its thread to normal priority once it runs without the interpreter lock and raises it
back to real-time before it returns, so the thread never holds the interpreter lock at
normal priority and never copies at real-time priority.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit

from .auditfmt import run_text
from .sched import SCHED_FIFO, SCHED_OTHER, SCHED_PARAMS, normal_thread, sched_setscheduler

CTL_HOLD, CTL_MEM, CTL_STOP, CTL_INSIDE, CTL_LOGN = range(5)
CTL_SLOTS = 8

# stream_batch results (the first item of its return tuple)
DONE = 0  # max_chunks written
HELD = 1  # a changer, unmap or stop asked it to return
FAULT = 2  # the chunk at ``pos`` touches an unmapped page (the page is the 5th item)
SLOW = 3  # the chunk at ``pos`` needs the Python path (several runs, another mapping)

PAGE_SHIFT = 12
_PAGE_MASK = np.uint64(0xFFF)


@njit(nogil=True, cache=True)
def stream_batch(words, iova, ptes, rid, offset, length, chunk, pos, gen,
                 max_chunks, ctl, log, rt, sched):  # pragma: no cover - compiled
    """Write up to ``max_chunks`` chunks; returns (result, pos, gen, passes, page).

    ``words``: uint64 view of the guest RAM mapping at guest-physical ``iova``; ``ptes``:
    the region's page table (gpa | 1, 0 = unmapped); ``pos``: byte position of the next
    chunk within [offset, offset+length); ``log``: int64 rows (offset, bytes, gen).
    ``rt`` = 1: run at normal priority, back to real-time before returning; ``sched``:
    ``sched.SCHED_PARAMS`` (the two struct sched_param)."""
    if rt:
        sched_setscheduler(0, SCHED_OTHER, sched[0:].ctypes.data)
    passes = 0
    done = 0
    nwords = words.shape[0]
    result = DONE
    page = -1
    while done < max_chunks:
        if ctl[CTL_HOLD] != 0 or ctl[CTL_MEM] != 0 or ctl[CTL_STOP] != 0:
            result = HELD
            break
        off = offset + pos
        n = min(chunk, length - pos)
        first = off >> PAGE_SHIFT
        end = ((off + n - 1) >> PAGE_SHIFT) + 1
        p0 = ptes[first]
        if p0 == 0:
            result = FAULT
            page = first
            break
        ok = True
        for p in range(first + 1, end):
            pte = ptes[p]
            if pte == 0:
                result = FAULT
                page = p
                ok = False
                break
            if pte != p0 + np.uint64((p - first) << PAGE_SHIFT):
                result = SLOW
                ok = False
                break
        if not ok:
            break
        gpa = (p0 & ~_PAGE_MASK) + np.uint64(off & 0xFFF)
        if gpa < iova or (gpa - iova) % 8 != 0:
            result = SLOW
            break
        i = np.int64((gpa - iova) >> np.uint64(3))
        k = n >> 3
        if i + k > nwords:
            result = SLOW
            break
        base = (np.uint64(rid & 0xFFFF) << np.uint64(48)) | (np.uint64(gen & 0xFFFF)
                                                             << np.uint64(32))
        w0 = np.uint64((off >> 3) & 0xFFFFFFFF)
        for j in range(k):
            words[i + j] = base | (w0 + np.uint64(j))
        log[done, 0] = off
        log[done, 1] = n
        log[done, 2] = gen
        done += 1
        ctl[CTL_LOGN] = done
        pos += n
        if pos >= length:
            pos = 0
            passes += 1
            gen = (gen + 1) & 0xFFFF
    ctl[CTL_INSIDE] = 0
    if rt:  # before the interpreter lock is taken again (a fence may have boosted it)
        sched_setscheduler(0, SCHED_FIFO, sched[1:].ctypes.data)
    return result, pos, gen, passes, page


_ready = threading.Event()


def ready() -> bool:
    """The loop (and the audit file's formatter, auditfmt.py) is compiled or loaded from
    numba's cache: calling it cannot block on a compilation, which holds the interpreter
    lock for seconds."""
    return _ready.is_set()


def _warm() -> None:
    normal_thread()  # seconds of Python when not cached: nobody waits for it (sched.py)
    words = np.zeros(1024, dtype=np.uint64)
    ptes = np.array([1 | 0x1000 * i for i in range(2)], dtype=np.uint64)
    ctl = np.zeros(CTL_SLOTS, dtype=np.int64)
    log = np.zeros((4, 3), dtype=np.int64)
    stream_batch(words, np.uint64(0), ptes, 1, 0, 8192, 4096, 0, 1, 2, ctl, log, 0,
                 SCHED_PARAMS)
    run_text(1, 1, 0, ptes, 8, 4088, 8184, "w", 1, 1, 0)  # the audit file's formatter
    _ready.set()


_warm_thread = threading.Thread(target=_warm, name="fastpath-compile", daemon=True)


def warm_up() -> None:
    """Compile (or load from numba's cache) in the background, once per process; until
    :func:`ready`, streams take the Python path."""
    if not _warm_thread.is_alive() and _warm_thread.ident is None:
        _warm_thread.start()
