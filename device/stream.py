"""Streams: a background writer of the DMA pattern into one region (STREAM_START).

A :class:`Stream` writes ``chunk`` bytes at a time over [offset, offset+length) of its
region, wrapping, one generation per pass, until it is stopped, its region is destroyed
or a chunk meets a DMA error. A chunk that touches an unmapped page pauses the stream at
that page (one PAGE_FAULT event) until MAP_PAGES maps it again. Behaviour: the STREAM_START
row of ``device/REGISTERS.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pinlab.common.uapi import STATUS_DMA_ERROR, STATUS_NAMES, STATUS_OK, STATUS_PAGE_FAULT

from .dma import DmaPath
from .regions import Region

log = logging.getLogger("pinlab.device.stream")

# Bulk DMA threads (streams, the command worker) run at a lower OS priority than the
# threads that receive doorbells and fetch (INVALIDATE): on a loaded host a CPU-bound
# stream otherwise delays the fetcher's wake-up by a scheduler time slice.
BULK_NICE = 10


def lower_priority() -> None:
    """Make the calling thread a background thread (Linux: nice is per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BULK_NICE)


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

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"stream-{self.region.rid}",
                                       daemon=True)
        self.thread.start()

    @property
    def live(self) -> bool:
        return self.state != "stopped"

    def stop(self) -> None:
        """Ask the stream to stop and wait for it (caller must not hold region.lock)."""
        self._stop.set()
        with self.region.lock:
            self.region.changed.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def describe(self) -> dict[str, Any]:
        return {"region": self.region.rid, "state": self.state, "chunks": self.chunks,
                "passes": self.passes, "generation": self.gen, "offset": self.offset,
                "length": self.length, "chunk": self.chunk, "fault_page": self.fault_page,
                "reason": STATUS_NAMES[self.reason]}

    def _run(self) -> None:
        region = self.region
        lower_priority()
        interval = self.interval_us / 1e6
        pos = 0
        reported = -1
        try:
            while not self._stop.is_set():
                off = self.offset + pos
                n = min(self.chunk, self.length - pos)
                region.yield_to_waiters()
                with region.lock:
                    if self._stop.is_set() or region.destroyed:
                        break
                    res = self.dma.write_pattern(region, off, n, self.gen, atomic=True)
                    if res is not None and res[0] == STATUS_PAGE_FAULT:
                        # pause at the faulting page until it is re-mapped
                        page = res[1]
                        self.state, self.fault_page = "paused", page
                        if page != reported:
                            reported = page
                            self.on_fault(region, page)
                        region.changed.wait(0.1)
                        continue
                    self.state, self.fault_page, reported = "running", -1, -1
                    if res is not None:  # DMA_ERROR
                        self.reason = res[0]
                        self.on_stopped(region, res[0], res[1])
                        break
                self.chunks += 1
                pos += n
                if pos >= self.length:
                    pos = 0
                    self.passes += 1
                    self.gen = (self.gen + 1) & 0xFFFF
                if interval:
                    self._stop.wait(interval)
        except Exception:  # never let a stream thread die silently
            log.exception("stream on region %d failed", region.rid)
            self.reason = STATUS_DMA_ERROR
        finally:
            self.state = "stopped"
