"""Scheduling of the device's threads on a busy host (Linux: priorities are per thread).

The threads that carry a doorbell to its completion (the vfio-user message loop and the
SQ fetcher, which executes INVALIDATE) wait for messages almost all the time; when one
arrives it must not queue behind CPU hogs for a scheduler time slice, or a revoke fence
takes milliseconds on a loaded machine. In the device process (``serve.main``) they run
as real-time threads (SCHED_FIFO, the lowest real-time priority) when the process may do
so (root or CAP_SYS_NICE); the kernel's real-time throttling
(Documentation/scheduler/sched-rt-group.rst) still leaves the other tasks their share.
The command worker and the stream threads run at normal priority (measured: niced, they
held the interpreter lock the real-time fetcher needs while the host kept them off the
CPU; revoke p99 under load fell from 16-28 ms to 5-12 ms without the nice). While an
event thread waits for a stream's chunk in flight (INVALIDATE, DMA_UNMAP), the stream
thread is boosted to real-time until it is out (:func:`boosted`): a fence then waits
for one chunk's write, not for the scheduler.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

_realtime = False


def enable_realtime() -> None:
    """Let :func:`event_thread` make threads real-time (the device process only)."""
    global _realtime
    _realtime = True


def event_thread() -> None:
    """Called by a thread that carries doorbells and completions: SCHED_FIFO priority 1
    if enabled and permitted, else unchanged."""
    if not _realtime:
        return
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(1))


@contextlib.contextmanager
def boosted(tid: int | None) -> Iterator[None]:
    """Priority inheritance by hand: while a real-time event thread waits for thread
    ``tid`` (a stream finishing its chunk in flight, a few microseconds of work), that
    thread runs real-time too, so a busy host cannot keep it off the CPU; then it goes
    back to normal scheduling (its nice value is kept)."""
    if not _realtime or tid is None:
        yield
        return
    try:
        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
