"""Streams: a background writer of the DMA pattern into one region (STREAM_START).

A :class:`Stream` writes ``chunk`` bytes at a time over [offset, offset+length) of its
region, wrapping, one generation per pass, until it is stopped, its region is destroyed
or a chunk meets a DMA error. A chunk that touches an unmapped page pauses the stream at
that page (one PAGE_FAULT event) until MAP_PAGES maps it again. Behaviour: the STREAM_START
row of ``device/REGISTERS.md``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pinlab.common.uapi import STATUS_DMA_ERROR, STATUS_NAMES, STATUS_OK, STATUS_PAGE_FAULT

from .dma import DmaPath
from .fastpath import CTL_HOLD, CTL_INSIDE, CTL_LOGN, CTL_STOP, DONE, FAULT, SLOW, stream_batch
from .fastpath import ready as fastpath_ready
from .regions import PAGE_SHIFT, PAGE_SIZE, Region
from .sched import RT_MIN_INTERVAL_US, SCHED_PARAMS, device_thread, is_realtime, set_realtime

log = logging.getLogger("pinlab.device.stream")

# chunks per call of the compiled loop (its log's rows); at 64 KiB about 4 ms of writing:
# the stream thread holds the interpreter lock only between calls
LOG_ROWS = 1024
DMA_ERROR_STEP = -1
# a real-time stream thread runs a compiled batch at normal priority (sched.py) when it
# writes at least this much; a smaller one (one chunk of a stream with an interval) is a
# few microseconds of copying, less than the two priority changes would cost
NORMAL_PRIORITY_BYTES = 64 * 1024


#: (region, page): a chunk met an unmapped page (the engine posts the PAGE_FAULT event)
OnFault = Callable[[Region, int], None]
#: (region, status, info): the stream stopped by itself (STREAM_STOPPED event)
OnStopped = Callable[[Region, int, int], None]


@dataclass(eq=False)
class Stream:
    """One region's stream (at most one per region: ``Region.stream``).

    ``offset``/``length``/``chunk`` are bytes (8-byte multiples, ``chunk`` ≤ length),
    ``gen`` the generation of the current pass (mod 65536), ``interval_us`` the pause
    between chunks in microseconds. ``chunks``/``passes`` count what was written;
    ``state`` is ``running``, ``paused`` (at ``fault_page``) or ``stopped`` (``reason``:
    a device status code, OK when stopped by a command)."""

    region: Region
    offset: int
    length: int
    gen: int
    chunk: int
    interval_us: int
    dma: DmaPath = field(repr=False)
    on_fault: OnFault = field(repr=False)
    on_stopped: OnStopped = field(repr=False)
    chunks: int = 0
    passes: int = 0
    state: str = "running"
    reason: int = STATUS_OK
    fault_page: int = -1
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)
    # chunks the compiled loop wrote in its current call: (offset, bytes, generation)
    _log: np.ndarray = field(default_factory=lambda: np.zeros((LOG_ROWS, 3), np.int64),
                             repr=False)
    _drained: int = field(default=0, repr=False)

    def start(self) -> None:
        self.region.ctl[CTL_STOP] = 0
        self.thread = threading.Thread(target=self._run, name=f"stream-{self.region.rid}",
                                       daemon=True)
        self.thread.start()

    @property
    def tid(self) -> int | None:
        """The stream thread's kernel thread id (None before it runs)."""
        return self.thread.native_id if self.thread is not None else None

    @property
    def live(self) -> bool:
        return self.state != "stopped"

    def stop(self) -> None:
        """Ask the stream to stop and wait for it (caller must not hold region.lock)."""
        self._stop.set()
        self.region.ctl[CTL_STOP] = 1  # the compiled loop returns before its next chunk
        with self.region.lock:
            self.region.changed.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def describe(self) -> dict[str, Any]:
        return {"region": self.region.rid, "state": self.state, "chunks": self.chunks,
                "passes": self.passes, "generation": self.gen, "offset": self.offset,
                "length": self.length, "chunk": self.chunk, "fault_page": self.fault_page,
                "reason": STATUS_NAMES[self.reason]}

    def drain(self) -> None:
        """Audit the chunks the compiled loop wrote and count them (caller holds
        ``region.lock``; the loop is not running). Consecutive chunks of one generation
        become one run of page records, as one larger access would."""
        ctl, log, region = self.region.ctl, self._log, self.region
        n = int(ctl[CTL_LOGN])
        lo, self._drained = self._drained, n
        if n <= lo:
            return
        rows = log[lo:n]
        self.chunks += n - lo
        # runs: a new one where the generation changes or the offset does not follow on
        off, nb, gen = rows[:, 0], rows[:, 1], rows[:, 2]
        cut = np.flatnonzero((gen[1:] != gen[:-1]) | (off[1:] != off[:-1] + nb[:-1])) + 1
        bounds = [0, *cut.tolist(), n - lo]
        ptes, track, audit = region.ptes, region.track, self.dma.audit
        for i, j in zip(bounds, bounds[1:], strict=False):
            start, total, g = int(off[i]), int(off[j - 1] + nb[j - 1] - off[i]), int(gen[i])
            first, end = start >> PAGE_SHIFT, (start + total - 1 >> PAGE_SHIFT) + 1
            audit.access_run(track, first, ptes[first:end], start & (PAGE_SIZE - 1), total,
                             True, g)

    def _enter_fast(self, off: int) -> tuple[Any, Any] | None:
        """Caller holds ``region.lock``: the mapping for the chunk at region offset
        ``off`` and the loop marked inside it (``CTL_INSIDE``), or None (Python path)."""
        region = self.region
        pte = region.ptes[off >> PAGE_SHIFT]
        if not pte or region.ctl[CTL_HOLD] or not fastpath_ready():
            return None
        mem = self.dma.mem
        with mem.lock:  # DMA_UNMAP drops mappings under it, after the loop has left
            m = mem.words_at((pte & ~(PAGE_SIZE - 1)) + (off & (PAGE_SIZE - 1)))
            if m is None:
                return None
            region.ctl[CTL_INSIDE] = 1
            return m.words, np.uint64(m.iova)

    def _run(self) -> None:
        # real-time while it holds the interpreter lock (sched.py), as long as its Python
        # work is a small part of its time: compiled batches with no interval, or any
        # chunks with at least RT_MIN_INTERVAL_US between them; otherwise (chunks through
        # the Python path with no or a short interval) normal priority, as every device
        # thread had before, so that it never keeps a CPU busy at real-time priority
        can_rt = device_thread()
        region = self.region
        interval = self.interval_us / 1e6
        batch = 1 if interval else LOG_ROWS
        big = batch * self.chunk >= NORMAL_PRIORITY_BYTES
        slow_rt = self.interval_us >= RT_MIN_INTERVAL_US
        on_rt = can_rt
        ctl = region.ctl
        pos = 0
        reported = -1
        try:
            while not self._stop.is_set():
                rt = int(on_rt and big)
                off = self.offset + pos
                n = min(self.chunk, self.length - pos)
                region.yield_to_waiters()
                with region.lock:
                    if self._stop.is_set() or region.destroyed:
                        break
                    self.drain()
                    ctl[CTL_LOGN] = self._drained = 0
                    fast = self._enter_fast(off)
                    if fast is None:  # the Python path, one chunk under the lock
                        res = self.dma.write_pattern(region, off, n, self.gen, atomic=True)
                        step = (FAULT, res[1]) if res is not None and res[0] == \
                            STATUS_PAGE_FAULT else (DONE, -1)
                        if res is not None and step[0] == DONE:  # DMA_ERROR
                            self.reason = res[0]
                            self.on_stopped(region, res[0], res[1])
                            break
                        if step[0] == DONE:
                            self.chunks += 1
                            pos += n
                            if pos >= self.length:
                                pos = 0
                                self.passes += 1
                                self.gen = (self.gen + 1) & 0xFFFF
                if fast is not None:
                    words, iova = fast
                    result, pos, gen, passes, page = stream_batch(
                        words, iova, region.ptes_np, region.rid, self.offset, self.length,
                        self.chunk, pos, self.gen, batch, ctl, self._log, rt, SCHED_PARAMS)
                    del words
                    with region.lock:
                        self.drain()
                        self.gen = gen
                        self.passes += passes
                    step = (FAULT, page) if result == FAULT else (result, -1)
                    if result == SLOW:  # this chunk through the Python path
                        step = self._slow_chunk(pos)
                        if step[0] == DMA_ERROR_STEP:
                            break
                        pos = step[1]
                        step = (SLOW, -1)
                if can_rt:  # the next chunk's priority, by how this one went
                    want = slow_rt or (fast is not None and step[0] != SLOW and not interval)
                    if want != on_rt or (not want and is_realtime()):  # (or a fence's boost)
                        on_rt = set_realtime(want)
                if step[0] == FAULT:
                    with region.lock:
                        if self._stop.is_set() or region.destroyed:
                            break
                        if region.ptes[step[1]]:
                            continue  # re-mapped meanwhile
                        # pause at the faulting page until it is re-mapped
                        page = step[1]
                        self.state, self.fault_page = "paused", page
                        if page != reported:
                            reported = page
                            self.on_fault(region, page)
                        region.changed.wait(0.1)
                    continue
                self.state, self.fault_page, reported = "running", -1, -1
                if interval:
                    self._stop.wait(interval)
        except Exception:  # never let a stream thread die silently
            log.exception("stream on region %d failed", region.rid)
            self.reason = STATUS_DMA_ERROR
        finally:
            ctl[CTL_INSIDE] = 0
            self.state = "stopped"

    def _slow_chunk(self, pos: int) -> tuple[int, int]:
        """Write the chunk at ``pos`` through the Python path (several guest-physical runs,
        or a mapping the loop cannot use). Returns (step, next pos)."""
        region = self.region
        off = self.offset + pos
        n = min(self.chunk, self.length - pos)
        with region.lock:
            if self._stop.is_set() or region.destroyed:
                return DMA_ERROR_STEP, pos
            res = self.dma.write_pattern(region, off, n, self.gen, atomic=True)
            if res is not None and res[0] == STATUS_PAGE_FAULT:
                return DONE, pos  # the loop finds the fault again and pauses
            if res is not None:
                self.reason = res[0]
                self.on_stopped(region, res[0], res[1])
                return DMA_ERROR_STEP, pos
            self.chunks += 1
            pos += n
            if pos >= self.length:
                pos = 0
                self.passes += 1
                self.gen = (self.gen + 1) & 0xFFFF
        return DONE, pos
