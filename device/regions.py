"""Device regions (page tables in device memory) and the DMA data pattern."""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from .audit import RegionTrack
from .fastpath import CTL_HOLD, CTL_INSIDE, CTL_SLOTS
from .memory import ramp
from .sched import boost

if TYPE_CHECKING:
    from .stream import Stream

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAX_PAGES = 262144
MAX_REGIONS = 1024
MAX_REGION_ID = 65535
REGION_WRITABLE = 1
PTE_VALID = 1  # page table entries are gpa | PTE_VALID; 0 = not mapped


def word_base(region: int, gen: int, offset: int) -> int:
    """The pattern word at byte ``offset`` (8-aligned) of ``region`` for generation ``gen``;
    the following words add 1 each while the low half does not wrap (``words_to_wrap``)."""
    return (region & 0xFFFF) << 48 | (gen & 0xFFFF) << 32 | (offset >> 3) & 0xFFFFFFFF


def words_to_wrap(offset: int) -> int:
    """How many words from ``offset`` on before the low half wraps (regions > 32 GiB)."""
    return (1 << 32) - ((offset >> 3) & 0xFFFFFFFF)


def pattern(region: int, gen: int, offset: int, length: int) -> bytes:
    """Pattern words for [offset, offset+length) (both 8-byte multiples).

    word(off) = (r & 0xffff) << 48 | (g & 0xffff) << 32 | (off >> 3) & 0xffffffff.
    """
    words = length >> 3
    room = words_to_wrap(offset)
    if words > room:  # low half wraps inside this span (regions > 32 GiB only)
        return pattern(region, gen, offset, room << 3) + pattern(
            region, gen, offset + (room << 3), length - (room << 3))
    return (ramp(words) + np.uint64(word_base(region, gen, offset))).tobytes()


def wait_outside(ctl: np.ndarray, tid: int | None = None) -> None:
    """Wait until the compiled stream loop of ``ctl`` (running in thread ``tid``) has no
    chunk in flight (it was asked to return: at most one chunk's write). Sleeps in 10 us
    steps: the waiter may be a real-time thread (sched.py), which must not spin against
    the stream's thread. The loop runs at normal priority (sched.py), where a busy host
    may keep it off the CPU for milliseconds, so the stream's thread is boosted to
    real-time at once, and again every 200 us (the loop drops its priority on entry,
    which may come just after a boost)."""
    n = 0
    while ctl[CTL_INSIDE]:
        if n % 20 == 0:
            boost(tid)
        n += 1
        time.sleep(0.00001)


class Region:
    """One region: a page table of ``npages`` entries kept in an ``array('Q')``."""

    def __init__(self, rid: int, npages: int, flags: int, track: RegionTrack) -> None:
        self.rid = rid
        self.npages = npages
        self.flags = flags
        self.track = track
        self.ptes = array("Q", bytes(8 * npages))
        # the same memory as a numpy array (the array is never resized: slice assignments
        # keep their length), for vectorised scans of the page table
        self.ptes_np = np.frombuffer(self.ptes, dtype=np.uint64)
        self.mapped = 0
        # held by the stream worker for each chunk and by INVALIDATE/DESTROY/MAP_PAGES
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # page table changed (MAP_PAGES etc.)
        self.destroyed = False
        self.stream: Stream | None = None  # the region's stream (STREAM_START)
        # page-table changers waiting for ``lock`` (INVALIDATE first of all): DMA loops
        # let them in between chunks instead of re-taking the (unfair) lock at once
        self._waiters = 0
        self._waiters_lock = threading.Lock()
        # the stream's control block (fastpath.CTL_*): the compiled stream loop reads it
        # at every chunk boundary, without the interpreter lock
        self.ctl = np.zeros(CTL_SLOTS, dtype=np.int64)

    @contextmanager
    def urgent(self) -> Iterator[None]:
        """Hold ``lock`` ahead of the DMA loops (which call :meth:`yield_to_waiters`), with
        no stream chunk in flight: the compiled stream loop is asked to return at its next
        chunk boundary (``CTL_HOLD``), and the chunks it wrote are audited (``drain``)
        before the caller changes anything. The stream's thread is boosted to real-time
        first (sched.py): at normal priority a busy host could keep it off the CPU while it
        holds ``lock`` or is inside the loop."""
        with self._waiters_lock:
            self._waiters += 1
            self.ctl[CTL_HOLD] = 1
        stream = self.stream
        if stream is not None:  # it may run at normal priority, holding ``lock`` (sched.py)
            boost(stream.tid)
        try:
            with self.lock:
                stream = self.stream
                wait_outside(self.ctl, stream.tid if stream is not None else None)
                if self.stream is not None:
                    self.stream.drain()
                yield
        finally:
            with self._waiters_lock:
                self._waiters -= 1
                if not self._waiters:
                    self.ctl[CTL_HOLD] = 0

    def yield_to_waiters(self, limit: float = 0.05) -> None:
        """Called without ``lock`` between chunks: let a waiting changer take the lock."""
        if not self._waiters:
            return
        deadline = time.monotonic() + limit
        while self._waiters and time.monotonic() < deadline:
            time.sleep(0.00002)

    @property
    def writable(self) -> bool:
        return bool(self.flags & REGION_WRITABLE)

    @property
    def size(self) -> int:
        return self.npages << PAGE_SHIFT

    def map_pages(self, first: int, addrs: array) -> None:
        """Caller holds ``lock``. ``addrs`` are page-aligned guest-physical addresses."""
        for i, gpa in enumerate(addrs):
            if not self.ptes[first + i]:
                self.mapped += 1
            self.ptes[first + i] = gpa | PTE_VALID
        self.changed.notify_all()

    def invalidate(self, first: int, count: int) -> int:
        """Caller holds ``lock``. Returns how many of the pages were mapped."""
        ptes = self.ptes
        was = sum(1 for i in range(first, first + count) if ptes[i])
        ptes[first:first + count] = array("Q", bytes(8 * count))
        self.mapped -= was
        return was

    def describe(self) -> dict[str, object]:
        return {"region": self.rid, "npages": self.npages, "writable": self.writable,
                "mapped_pages": self.mapped, "inst": self.track.inst,
                "streaming": self.stream is not None}
