"""Scheduling of the device's threads on a busy host (Linux: priorities are per thread).

A revoke fence is a chain of hand-offs between device threads (vfio-user message -> SQ
fetcher, which executes INVALIDATE -> CQ write and MSI eventfd), and every link needs the
interpreter lock. A thread that holds that lock while the host keeps it off the CPU
stalls every other device thread, whatever their priority (priority inversion on the
interpreter lock). Measured with ``pinlab bench device`` under two busy processes on two
cores: with only the message loop and the fetcher real-time, revoke p99 while a stream
ran was 7.5-8.3 ms (the real-time threads waited for the lock held by the normal-priority
command worker or stream thread); with every device thread real-time, 0.23-0.25 ms.

So, in the device process (``serve.main`` calls :func:`enable_realtime`):

* every device thread runs as a real-time thread (SCHED_FIFO, the lowest real-time
  priority, :data:`RT_PRIORITY`) whenever it may hold the interpreter lock
  (:func:`device_thread`, called first by each thread: vfio-user loop, SQ fetcher, command
  worker, QMP control threads, stream threads, and the main thread);
* the long copy loops, which run compiled and without the interpreter lock
  (``fastpath.stream_batch``), run at normal priority: the compiled code itself drops to
  SCHED_OTHER after it released the lock and raises itself back to real-time before it
  returns (:data:`sched_setscheduler`, called from numba), so there is no moment where
  the thread holds the interpreter lock at normal priority, and a stream at full speed
  never occupies a CPU at real-time priority;
* long Python work runs at normal priority: compiling that loop (``fastpath.warm_up``,
  :func:`normal_thread`), a DMA_WRITE or DMA_READ over :data:`LONG_COMMAND_BYTES`
  (:func:`normal_priority`), and a stream whose chunks go through the Python path with
  less than :data:`RT_MIN_INTERVAL_US` between them (``stream.Stream._run``). There a
  fence may again wait for the scheduler, as before; the host's other tasks (QEMU's TCG
  vCPU threads) keep their CPU.

No real-time device thread busy-waits: every wait sleeps or blocks (the kernel's
real-time throttling, Documentation/scheduler/sched-rt-group.rst, leaves other tasks only
5 % of a CPU otherwise), and the Python work done at real-time priority is bounded per
message, command, compiled batch or stream chunk with a pause (the audit file's lines are
formatted by compiled code, ``auditfmt.py``). A fence boosts the region's stream thread
to real-time (:func:`boost`) before it takes the region lock and while it waits for the
chunk in flight.

Where real-time scheduling is not permitted (no CAP_SYS_NICE and RLIMIT_RTPRIO 0) every
call here leaves the threads as they are: the device behaves as before, only slower under
load; :func:`describe` says which scheduling the device got (QMP ``query-status``,
``engine.scheduling``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from numba import types

RT_PRIORITY = 1  # the lowest SCHED_FIFO priority: above every normal task, below the kernel's
#: a DMA_WRITE / DMA_READ longer than this runs at normal priority (:func:`normal_priority`):
#: up to a second of Python for a region of MAX_PAGES pages
LONG_COMMAND_BYTES = 1 << 20
#: a stream whose chunks go through Python with less than this pause between them (or
#: none) would keep a CPU busy at real-time priority: it runs at normal priority instead
RT_MIN_INTERVAL_US = 200

#: libc's sched_setscheduler(pid, policy, const struct sched_param *), callable from
#: numba nopython code (the pointer passed as an integer: ``param.ctypes.data``); linked by
#: name, so the compiled stream loop stays in numba's on-disk cache. sched_setscheduler(2).
sched_setscheduler = types.ExternalFunction(
    "sched_setscheduler", types.int32(types.int32, types.int32, types.intp))

#: struct sched_param for the compiled code: [0] = normal (priority 0), [1] = real-time
SCHED_PARAMS = np.array([0, RT_PRIORITY], dtype=np.int32)
SCHED_OTHER = os.SCHED_OTHER
SCHED_FIFO = os.SCHED_FIFO

_realtime = False
_granted: dict[int | None, bool] = {}  # thread ident -> whether it got SCHED_FIFO


def enable_realtime() -> None:
    """Let :func:`device_thread` make threads real-time (the device process only)."""
    global _realtime
    _realtime = True


def device_thread() -> bool:
    """Called first by every device thread that may hold the interpreter lock: SCHED_FIFO
    priority :data:`RT_PRIORITY` if enabled and permitted, else unchanged. Returns whether
    the calling thread now runs real-time."""
    if not _realtime:
        return False
    ok = True
    try:
        os.sched_setscheduler(threading.get_native_id(), SCHED_FIFO,
                              os.sched_param(RT_PRIORITY))
    except (OSError, AttributeError):
        ok = False
    _granted[threading.get_ident()] = ok
    return ok


def normal_thread() -> None:
    """The calling thread runs at normal priority (SCHED_OTHER, nice kept): for long
    Python work that nobody waits for, e.g. compiling the stream loop."""
    with contextlib.suppress(OSError, AttributeError):
        if os.sched_getscheduler(0) != SCHED_OTHER:
            os.sched_setscheduler(0, SCHED_OTHER, os.sched_param(0))


def set_realtime(on: bool) -> bool:
    """The calling thread (a device thread, :func:`device_thread`) runs real-time (``on``)
    or at normal priority; a no-op unless enabled. Returns whether it runs real-time."""
    if not _realtime:
        return False
    try:
        if on:
            os.sched_setscheduler(0, SCHED_FIFO, os.sched_param(RT_PRIORITY))
        else:
            os.sched_setscheduler(0, SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        return False
    return on


@contextlib.contextmanager
def normal_priority(on: bool = True) -> Iterator[None]:
    """Run the block at normal priority (if ``on`` and the thread runs real-time), then
    real-time again: for long Python work of a device thread (a command over more than
    :data:`LONG_COMMAND_BYTES`). While it holds the interpreter lock in the block a busy
    host can keep it off the CPU, and a fence waits for it (as before real-time threads);
    the real-time budget of the host's other tasks is kept."""
    if not on or not is_realtime():
        yield
        return
    set_realtime(False)
    try:
        yield
    finally:
        set_realtime(True)


def is_realtime() -> bool:
    """Whether the calling thread runs SCHED_FIFO now."""
    try:
        return os.sched_getscheduler(0) == SCHED_FIFO
    except (OSError, AttributeError):
        return False


def boost(tid: int | None) -> None:
    """Priority inheritance by hand: thread ``tid`` (a stream thread in its compiled loop,
    at normal priority, that a real-time fence waits for) runs real-time from now on. It
    is not set back: the thread returns to the interpreter at real-time priority anyway,
    and drops to normal again itself at its next compiled batch."""
    if not _realtime or tid is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(tid, SCHED_FIFO, os.sched_param(RT_PRIORITY))


def describe() -> dict[str, Any]:
    """Which scheduling the device asked for and got: ``realtime`` (asked), ``priority``,
    ``threads``: for each live thread that called :func:`device_thread`, its name ->
    ``{"tid": kernel thread id, "realtime": whether it got SCHED_FIFO}``."""
    live = {t.ident: t for t in threading.enumerate()}
    threads = {t.name: {"tid": t.native_id, "realtime": _granted[t.ident]}
               for ident, t in live.items() if ident in _granted}
    for ident in [i for i in _granted if i not in live]:  # ended threads
        _granted.pop(ident, None)
    return {"realtime": _realtime, "priority": RT_PRIORITY, "threads": threads}
