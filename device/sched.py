"""Scheduling of the device's threads on a busy host (Linux: priorities are per thread).

The threads that carry a doorbell to its completion (the vfio-user message loop and the
SQ fetcher, which executes INVALIDATE) wait for messages almost all the time; when one
arrives it must not queue behind CPU hogs for a scheduler time slice, or a revoke fence
takes milliseconds on a loaded machine. In the device process (``serve.main``) they run
as real-time threads (SCHED_FIFO, the lowest real-time priority) when the process may do
so (root or CAP_SYS_NICE); the kernel's real-time throttling
(Documentation/scheduler/sched-rt-group.rst) still leaves the other tasks their share.
Bulk DMA threads (streams, the command worker) run at a lower OS priority instead.
"""

from __future__ import annotations

import contextlib
import os
import threading

# Bulk DMA threads (streams, the command worker) run at a lower OS priority than the
# threads that receive doorbells and fetch (INVALIDATE): on a loaded host a CPU-bound
# stream otherwise delays the fetcher's wake-up by a scheduler time slice.
BULK_NICE = 10
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


def lower_priority() -> None:
    """Make the calling thread a background thread (Linux: nice is per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BULK_NICE)
