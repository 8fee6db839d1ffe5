"""The DMA engine: BAR0 registers, SQ/CQ/EQ rings in guest memory, regions, streams.

Threads and locks (acquire in this order, never the reverse):

* ``exec_lock``: held by the queue worker while one command executes; reset takes it to
  wait for the in-flight command (which notices ``aborting`` at its next chunk).
* ``inv_lock``: held by the SQ fetcher while it executes an INVALIDATE (which does not
  queue behind the worker's command); reset takes it after ``exec_lock``. The two are
  never held by the same thread otherwise.
* ``Region.lock``: held for each chunk of DMA into a region (command or stream) and by
  MAP_PAGES / INVALIDATE / DESTROY. INVALIDATE therefore acknowledges only after the
  in-flight chunk finished, and no later chunk can see the cleared page-table entries.
* ``Engine.lock``: register file, CQ/EQ posting.
* ``GuestMemory.lock``, the audit lock and the irq lock are innermost.

vfio-user message handling only ever takes ``Engine.lock`` briefly (and ``exec_lock`` for
a reset), so it stays responsive while commands and streams run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .audit import AuditLog
from .faults import Faults
from .irq import IrqTable
from .memory import DmaError, GuestMemory
from .regions import (
    MAX_PAGES,
    MAX_REGION_ID,
    MAX_REGIONS,
    PAGE_SHIFT,
    PAGE_SIZE,
    REGION_WRITABLE,
    Region,
    pattern,
    word_base,
    words_to_wrap,
)

log = logging.getLogger("pinlab.device.engine")

ID_VALUE = 0x50494E4C
VERSION_VALUE = 0x00010000
STATUS_ENABLED = 1
STATUS_FATAL = 2
CTRL_ENABLE = 1
CTRL_RESET = 2

SQE = struct.Struct("<BBHI7Q")
SQE_SIZE = 64
CQE_SIZE = 32
EQE_SIZE = 32
CQE_HEAD = struct.Struct("<HH")  # cid, status (bytes 0..3)
CQE_TAIL = struct.Struct("<QQII")  # result0, result1, sq_head, reserved (bytes 8..31)
EQE_HEAD = struct.Struct("<HH")  # type, reserved
EQE_TAIL = struct.Struct("<IIQQ")  # region, reserved, info0, info1
MIN_ENTRIES = 2
MAX_ENTRIES = 4096
MAX_MAP_COUNT = 512
MAX_TOTAL_PAGES = 4 * MAX_PAGES
CHUNK = 64 * 1024
MAX_STREAM_CHUNK = 1 << 20

# status codes
OK, BAD_OPCODE, BAD_ARG, NO_REGION, EXISTS, DMA_ERROR, PAGE_FAULT, ABORTED, NO_SPACE = range(9)
STATUS_NAMES = ["OK", "BAD_OPCODE", "BAD_ARG", "NO_REGION", "EXISTS", "DMA_ERROR",
                "PAGE_FAULT", "ABORTED", "NO_SPACE"]
# opcodes
(OP_NOP, OP_CREATE_REGION, OP_MAP_PAGES, OP_INVALIDATE, OP_DESTROY_REGION, OP_DMA_WRITE,
 OP_DMA_READ, OP_STREAM_START, OP_STREAM_STOP, OP_FENCE) = range(10)
# event types
EV_PAGE_FAULT, EV_STREAM_STOPPED, EV_DEVICE_ERROR = 1, 2, 3
# interrupt vectors (MSI-X, or MSI with --irq msi)
VEC_CQ, VEC_EQ = 0, 1

# The device's threads hand work to each other (vfio-user message -> SQ fetcher -> CQ/MSI-X)
# while stream threads compute chunks. With CPython's default 5 ms GIL switch interval
# every hand-off may wait 5 ms behind a stream, so a revoke fence took tens of ms; the
# device process runs with a shorter interval (set by serve.main and the benchmarks).
SWITCH_INTERVAL = 0.0002
# Bulk DMA threads (streams, the command worker) run at a lower OS priority than the
# threads that receive doorbells and fetch (INVALIDATE): on a loaded host a CPU-bound
# stream otherwise delays the fetcher's wake-up by a scheduler time slice.
BULK_NICE = 10


_STEPS = np.arange(MAX_STREAM_CHUNK // PAGE_SIZE + 2, dtype=np.uint64) << np.uint64(PAGE_SHIFT)


def _lower_priority() -> None:
    """Make the calling thread a background thread (Linux: nice is per thread)."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BULK_NICE)

Emit = Callable[[str, dict[str, Any]], None]
Result = tuple[int, int, int]  # status, result0, result1


class Aborted(Exception):
    pass


def _pow2_entries(n: int) -> bool:
    return MIN_ENTRIES <= n <= MAX_ENTRIES and n & (n - 1) == 0


class Command:
    __slots__ = ("opcode", "flags", "cid", "region", "a")

    def __init__(self, raw: bytes) -> None:
        op, self.flags, self.cid, self.region, *a = SQE.unpack(raw)
        self.opcode = op
        self.a: list[int] = a


class Stream:
    """Background writer of the pattern into one region (one thread per stream)."""

    def __init__(self, engine: Engine, region: Region, offset: int, length: int, gen: int,
                 chunk: int, interval_us: int) -> None:
        self.engine, self.region = engine, region
        self.offset, self.length, self.gen = offset, length, gen
        self.chunk, self.interval = chunk, interval_us / 1e6
        self.chunks = 0
        self.passes = 0
        self.state = "running"  # running | paused | stopped
        self.reason = OK
        self.fault_page = -1
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"stream-{region.rid}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the stream to stop and wait for it (caller must not hold region.lock)."""
        self._stop.set()
        with self.region.lock:
            self.region.changed.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join()

    def describe(self) -> dict[str, Any]:
        return {"region": self.region.rid, "state": self.state, "chunks": self.chunks,
                "passes": self.passes, "generation": self.gen, "offset": self.offset,
                "length": self.length, "chunk": self.chunk, "fault_page": self.fault_page,
                "reason": STATUS_NAMES[self.reason]}

    def _run(self) -> None:
        region, eng = self.region, self.engine
        _lower_priority()
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
                    res = eng.write_pattern(region, off, n, self.gen, atomic=True)
                    if res is not None and res[0] == PAGE_FAULT:
                        # pause at the faulting page until it is re-mapped
                        page = res[1]
                        self.state, self.fault_page = "paused", page
                        if page != reported:
                            reported = page
                            eng.page_fault(region, page)
                        region.changed.wait(0.1)
                        continue
                    self.state, self.fault_page, reported = "running", -1, -1
                    if res is not None:  # DMA_ERROR
                        self.reason = res[0]
                        eng.post_event(EV_STREAM_STOPPED, region.rid, res[0], res[1])
                        break
                self.chunks += 1
                pos += n
                if pos >= self.length:
                    pos = 0
                    self.passes += 1
                    self.gen = (self.gen + 1) & 0xFFFF
                if self.interval:
                    self._stop.wait(self.interval)
        except Exception:  # never let a stream thread die silently
            log.exception("stream on region %d failed", region.rid)
            self.reason = DMA_ERROR
        finally:
            self.state = "stopped"


class Engine:
    def __init__(self, mem: GuestMemory, irq: IrqTable, audit: AuditLog, faults: Faults,
                 emit: Emit | None = None) -> None:
        self.mem, self.irq, self.audit, self.faults = mem, irq, audit, faults
        self.emit: Emit = emit or (lambda name, data: None)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.exec_lock = threading.Lock()
        self.inv_lock = threading.Lock()  # held by the fetcher while it executes INVALIDATE
        self._pending: deque[tuple[int, Command]] = deque()  # fetched, waiting for the worker
        self._running: Command | None = None  # the command the worker executes
        self._outstanding = 0  # fetched commands whose completion is not written/dropped
        self.aborting = threading.Event()
        self.regions: dict[int, Region] = {}
        self.epoch = 0
        self.stats: dict[str, int] = dict.fromkeys(
            ("events_posted", "events_dropped", "irqs", "irqs_dropped", "resets",
             "fatal"), 0)
        self._reset_regs()
        self._shutdown = False
        self._worker = threading.Thread(target=self._work, name="engine", daemon=True)
        self._fetcher = threading.Thread(target=self._fetch, name="engine-fetch", daemon=True)
        self._worker.start()
        self._fetcher.start()

    # --- register file --------------------------------------------------------------
    def _reset_regs(self) -> None:
        self.status = 0
        self.sq_base = self.cq_base = self.eq_base = 0
        self.sq_entries = self.cq_entries = self.eq_entries = 0
        self.sq_head = self.sq_tail = self.cq_head = self.cq_tail = 0
        self.eq_head = self.eq_tail = 0
        self.cq_phase = self.eq_phase = 1
        self.cmds_done = self.errors = 0
        self.scratch = 0
        self.fatal_reason = ""

    @property
    def enabled(self) -> bool:
        return bool(self.status & STATUS_ENABLED)

    def read32(self, off: int) -> int:
        with self.lock:
            regs = {
                0x000: ID_VALUE, 0x004: VERSION_VALUE, 0x008: self.status,
                0x00C: self.status & STATUS_ENABLED,
                0x010: self.sq_base & 0xFFFFFFFF, 0x014: self.sq_base >> 32,
                0x018: self.sq_entries, 0x01C: self.sq_tail, 0x020: self.sq_head,
                0x028: self.cq_base & 0xFFFFFFFF, 0x02C: self.cq_base >> 32,
                0x030: self.cq_entries, 0x034: self.cq_head, 0x038: self.cq_tail,
                0x040: self.eq_base & 0xFFFFFFFF, 0x044: self.eq_base >> 32,
                0x048: self.eq_entries, 0x04C: self.eq_head, 0x050: self.eq_tail,
                0x060: self.cmds_done, 0x064: self.errors, 0x080: self.scratch,
            }
            return regs.get(off, 0)

    def write32(self, off: int, val: int) -> None:
        if off == 0x00C and val & CTRL_RESET:
            self.reset("ctrl")
        with self.lock:
            if off == 0x00C:
                if val & CTRL_ENABLE and not self.enabled:
                    self._enable()
                elif not val & CTRL_ENABLE:
                    self.status &= ~STATUS_ENABLED
            elif off == 0x01C:
                self._doorbell("sq_tail", val, self.sq_entries)
            elif off == 0x034:
                self._doorbell("cq_head", val, self.cq_entries)
            elif off == 0x04C:
                self._doorbell("eq_head", val, self.eq_entries)
            elif off == 0x080:
                self.scratch = val
                self.audit.scratch(val)
            elif not self.enabled:
                self._write_config(off, val)
            self.cond.notify_all()

    def _write_config(self, off: int, val: int) -> None:
        lo, hi = 0xFFFFFFFF, 0xFFFFFFFF << 32
        if off == 0x010:
            self.sq_base = self.sq_base & hi | val
        elif off == 0x014:
            self.sq_base = self.sq_base & lo | val << 32
        elif off == 0x018:
            self.sq_entries = val
        elif off == 0x028:
            self.cq_base = self.cq_base & hi | val
        elif off == 0x02C:
            self.cq_base = self.cq_base & lo | val << 32
        elif off == 0x030:
            self.cq_entries = val
        elif off == 0x040:
            self.eq_base = self.eq_base & hi | val
        elif off == 0x044:
            self.eq_base = self.eq_base & lo | val << 32
        elif off == 0x048:
            self.eq_entries = val

    def _doorbell(self, name: str, val: int, entries: int) -> None:
        if not self.enabled:
            return  # doorbells are only meaningful while enabled
        if val >= entries:
            self._fatal(f"{name} doorbell {val} >= {entries} entries")
            return
        setattr(self, name, val)

    def _ring_ok(self, base: int, entries: int, esize: int, write: bool) -> str:
        if not _pow2_entries(entries):
            return f"entries {entries} not a power of two in 2..4096"
        if base % esize:
            return f"base {base:#x} not {esize}-byte aligned"
        try:
            self.mem.check(base, entries * esize, write)
        except DmaError as exc:
            return str(exc)
        return ""

    def _enable(self) -> None:
        if self.status & STATUS_FATAL:
            return
        why = (self._ring_ok(self.sq_base, self.sq_entries, SQE_SIZE, False)
               or self._ring_ok(self.cq_base, self.cq_entries, CQE_SIZE, True))
        if not why and self.eq_base:
            why = self._ring_ok(self.eq_base, self.eq_entries, EQE_SIZE, True)
        if why:
            self._fatal(f"enable: {why}")
            return
        self.sq_head = self.sq_tail = self.cq_head = self.cq_tail = 0
        self.eq_head = self.eq_tail = 0
        self.cq_phase = self.eq_phase = 1
        # commands fetched before an earlier disable never complete into the new rings
        self.epoch += 1
        self._pending.clear()
        self._outstanding = 0
        self.status = STATUS_ENABLED

    def _fatal(self, why: str) -> None:
        """Caller holds ``lock``."""
        log.warning("device error: %s", why)
        self.status = (self.status & ~STATUS_ENABLED) | STATUS_FATAL
        self.fatal_reason = why
        self.stats["fatal"] += 1
        self.emit("DEVICE_ERROR", {"reason": why})

    def bar0_read(self, off: int, count: int) -> bytes:
        first, last = off & ~3, (off + count + 3) & ~3
        raw = b"".join(self.read32(o).to_bytes(4, "little") for o in range(first, last, 4))
        return raw[off - first:off - first + count]

    def bar0_write(self, off: int, data: bytes) -> None:
        if off % 4 == 0 and len(data) % 4 == 0:
            for i in range(0, len(data), 4):
                self.write32(off + i, int.from_bytes(data[i:i + 4], "little"))
            return
        first, last = off & ~3, (off + len(data) + 3) & ~3  # sub-word: read-modify-write
        for o in range(first, last, 4):
            word = bytearray(self.read32(o).to_bytes(4, "little"))
            for i in range(4):
                if off <= o + i < off + len(data):
                    word[i] = data[o + i - off]
            self.write32(o, int.from_bytes(word, "little"))

    # --- reset / shutdown -----------------------------------------------------------
    def reset(self, source: str) -> None:
        """Stop all DMA, drop every region, stream and queue. Returns when done."""
        with self.lock:
            self.epoch += 1
            self.aborting.set()
            self.status &= ~STATUS_ENABLED
            self.cond.notify_all()
        with self.faults.changed:
            self.faults.changed.notify_all()
        for region in list(self.regions.values()):
            self._stop_stream(region)
        with self.exec_lock, self.inv_lock:
            for region in list(self.regions.values()):
                self._destroy(region)
            with self.lock:
                self.regions.clear()
                self._reset_regs()
                self._pending.clear()
                self._outstanding = 0
                self.stats["resets"] += 1
                self.aborting.clear()
        self.audit.reset()
        self.emit("DEVICE_RESET", {"source": source})

    def shutdown(self) -> None:
        self.reset("shutdown")
        with self.lock:
            self._shutdown = True
            self.cond.notify_all()
        self._worker.join(5)
        self._fetcher.join(5)

    # --- queue fetcher and worker -------------------------------------------------------
    # The fetcher reads SQ entries in order. INVALIDATE executes right there (it only needs
    # the region lock, which a running command or stream holds for one chunk at a time), so
    # the revoke fence never waits behind a long DMA_WRITE. Every other command goes to the
    # worker, which executes them one at a time in submission order.
    def _can_fetch(self) -> bool:
        if self.status != STATUS_ENABLED or self.sq_head == self.sq_tail:
            return False
        free = (self.cq_head - self.cq_tail - 1) % self.cq_entries
        return free > self._outstanding  # every fetched command has a CQ slot waiting

    def _conflicts(self, rid: int) -> bool:
        """An INVALIDATE of ``rid`` must keep its order (caller holds ``lock``): a command
        fetched earlier that creates, maps, invalidates or destroys the region has not
        finished yet."""
        ops = (OP_CREATE_REGION, OP_MAP_PAGES, OP_INVALIDATE, OP_DESTROY_REGION)
        running = self._running
        if running is not None and running.region == rid and running.opcode in ops:
            return True
        return any(c.region == rid and c.opcode in ops for _, c in self._pending)

    def _fetch(self) -> None:
        while True:
            with self.lock:
                while not self._shutdown and not self._can_fetch():
                    self.cond.wait()
                if self._shutdown:
                    return
                epoch, addr = self.epoch, self.sq_base + self.sq_head * SQE_SIZE
                try:
                    raw = self.mem.read(addr, SQE_SIZE)
                except DmaError as exc:
                    self._fatal(f"SQ fetch: {exc}")
                    continue
                self.sq_head = (self.sq_head + 1) % self.sq_entries
                cmd = Command(raw)
                self._outstanding += 1
                if cmd.opcode != OP_INVALIDATE or self._conflicts(cmd.region):
                    self._pending.append((epoch, cmd))
                    self.cond.notify_all()
                    continue
            with self.inv_lock:
                if epoch != self.epoch:
                    continue
                after = self._run(epoch, cmd)
            if after is not None:
                after()

    def _run(self, epoch: int, cmd: Command) -> Callable[[], None] | None:
        after: Callable[[], None] | None = None
        try:
            (status, r0, r1), after = self.execute(cmd)
        except Aborted:
            status, r0, r1 = ABORTED, 0, 0
        except Exception:
            log.exception("command %d failed", cmd.opcode)
            status, r0, r1 = DMA_ERROR, 0, 0
        self._complete(epoch, cmd, status, r0, r1)
        return after

    def _work(self) -> None:
        _lower_priority()
        while True:
            with self.lock:
                while not self._shutdown and not self._pending:
                    self.cond.wait()
                if self._shutdown:
                    return
                epoch, cmd = self._pending.popleft()
                if epoch != self.epoch:
                    continue
                if not self.enabled:  # disabled after the fetch: dropped, no completion
                    self._outstanding -= 1
                    self.cond.notify_all()
                    continue
                self._running = cmd
            after = None
            with self.exec_lock:
                if epoch == self.epoch:
                    after = self._run(epoch, cmd)
            with self.lock:
                self._running = None
            if after is not None:
                after()

    def _complete(self, epoch: int, cmd: Command, status: int, r0: int, r1: int) -> None:
        with self.lock:
            if epoch != self.epoch:
                return
            self._outstanding -= 1
            self.cond.notify_all()
            if not self.enabled:
                return
            addr = self.cq_base + self.cq_tail * CQE_SIZE
            try:
                self.mem.write(addr, CQE_HEAD.pack(cmd.cid, status))
                self.mem.write(addr + 8, CQE_TAIL.pack(r0, r1, self.sq_head, 0))
                self.mem.write(addr + 4, struct.pack("<I", self.cq_phase))  # phase last
            except DmaError as exc:
                self._fatal(f"CQ write: {exc}")
                return
            self.cq_tail = (self.cq_tail + 1) % self.cq_entries
            if self.cq_tail == 0:
                self.cq_phase ^= 1
            self.cmds_done = (self.cmds_done + 1) & 0xFFFFFFFF
            if status:
                self.errors = (self.errors + 1) & 0xFFFFFFFF
        self._signal(VEC_CQ)

    def post_event(self, etype: int, region: int, info0: int, info1: int = 0) -> bool:
        with self.lock:
            if not self.enabled or not self.eq_base:
                self.stats["events_dropped"] += 1
                return False
            if (self.eq_tail + 1) % self.eq_entries == self.eq_head:
                self.stats["events_dropped"] += 1
                return False
            addr = self.eq_base + self.eq_tail * EQE_SIZE
            try:
                self.mem.write(addr, EQE_HEAD.pack(etype, 0))
                self.mem.write(addr + 8, EQE_TAIL.pack(region, 0, info0, info1))
                self.mem.write(addr + 4, struct.pack("<I", self.eq_phase))
            except DmaError as exc:
                self._fatal(f"EQ write: {exc}")
                return False
            self.eq_tail = (self.eq_tail + 1) % self.eq_entries
            if self.eq_tail == 0:
                self.eq_phase ^= 1
            self.stats["events_posted"] += 1
        self._signal(VEC_EQ)
        return True

    def _signal(self, vector: int) -> None:
        f = self.faults
        if f.drop_irq:
            self.stats["irqs_dropped"] += 1
            return
        self.stats["irqs"] += 1
        if f.delay_irq_ms:
            t = threading.Timer(f.delay_irq_ms / 1000, self.irq.signal, (vector,))
            t.daemon = True
            t.start()
        else:
            self.irq.signal(vector)

    # --- DMA helpers (caller holds region.lock) -------------------------------------
    def first_unmapped(self, region: Region, off: int, length: int) -> int:
        first, end = off >> PAGE_SHIFT, (off + length - 1 >> PAGE_SHIFT) + 1
        if end - first <= 8:
            ptes = region.ptes
            for page in range(first, end):
                if not ptes[page]:
                    return page
            return -1
        holes = np.flatnonzero(region.ptes_np[first:end] == 0)
        return first + int(holes[0]) if len(holes) else -1

    @staticmethod
    def _runs(region: Region, first: int, end: int) -> tuple[int, list[int]]:
        """Scan pages first..end-1: (stop, cuts). ``stop`` is the first unmapped page (or
        ``end``); pages first..stop-1 split into guest-physically contiguous runs
        ``first + cuts[i] .. first + cuts[i+1] - 1``."""
        n = end - first
        ptes = region.ptes
        prev = ptes[first]
        if not prev:
            return first, [0]
        if n == 1:
            return end, [0, 1]
        if ptes[end - 1] == prev + (n - 1 << PAGE_SHIFT):  # one run? (the usual case)
            if n <= 64:
                one = n == 2 or ptes[first:end] == array(
                    "Q", range(prev, prev + (n << PAGE_SHIFT), PAGE_SIZE))
            else:
                steps = _STEPS[:n] if n <= len(_STEPS) else np.arange(n, dtype=np.uint64) << 12
                one = bool(np.array_equal(region.ptes_np[first:end] - np.uint64(prev), steps))
            if one:
                return end, [0, n]
        if n <= 32:  # a Python loop beats numpy's per-call overhead here
            cuts = [0]
            for i in range(1, n):
                cur = ptes[first + i]
                if not cur:
                    cuts.append(i)
                    return first + i, cuts
                if cur != prev + PAGE_SIZE:
                    cuts.append(i)
                prev = cur
            cuts.append(n)
            return end, cuts
        seg = region.ptes_np[first:end]
        holes = np.flatnonzero(seg == 0)
        if len(holes):
            n = int(holes[0])
            if not n:
                return first, [0]
            seg = seg[:n]
        steps = np.flatnonzero(np.diff(seg) != PAGE_SIZE) + 1
        return first + n, [0, *steps.tolist(), n]

    def write_pattern(self, region: Region, off: int, length: int, gen: int,
                      atomic: bool = False) -> tuple[int, int] | None:
        """Write the pattern words of [off, off+length) (8-byte multiples) into the
        region's pages, straight into guest memory, and audit every page written.

        Page by page semantics: at an unmapped page nothing is written from there on
        (PAGE_FAULT, page); at a guest-physical address that is not writable guest RAM
        (DMA_ERROR, address) the pages before it are written and that page is not. With
        ``atomic`` an unmapped page anywhere in the span fails it before anything is
        written. Returns None on success. Caller holds ``region.lock``."""
        first = off >> PAGE_SHIFT
        end = (off + length - 1 >> PAGE_SHIFT) + 1
        ptes = region.ptes
        stop, cuts = self._runs(region, first, end)
        if stop < end and (atomic or stop == first):
            return PAGE_FAULT, stop
        po = off & (PAGE_SIZE - 1)
        # the part of the span in pages first..stop-1, which are mapped
        total = min(off + length, stop << PAGE_SHIFT) - off
        base = word_base(region.rid, gen, off)
        if words_to_wrap(off) < total >> 3:  # regions > 32 GiB only: never with MAX_PAGES
            raise AssertionError("pattern low half wraps inside a chunk")
        npg = stop - first
        mem = self.mem
        if len(cuts) == 2 and stop == end:  # the usual case: one contiguous run, all mapped
            try:
                mem.write_ramp((ptes[first] & ~(PAGE_SIZE - 1)) + po, length >> 3, base)
            except DmaError:
                pass  # find the failing page below
            else:
                self.audit.access_run(region.track, first, ptes[first:end], po, length,
                                      True, gen)
                return None
        res: tuple[int, int] | None = None
        done = 0  # bytes of the span written
        written = npg  # pages written
        for a, b in zip(cuts, cuts[1:], strict=False):
            run_off = (first + a) << PAGE_SHIFT  # region offset of the run's first page
            lo = max(off, run_off)
            hi = min(off + total, (first + b) << PAGE_SHIFT)
            gpa = (ptes[first + a] & ~(PAGE_SIZE - 1)) + (lo - run_off)
            try:
                mem.write_ramp(gpa, hi - lo >> 3, base + (done >> 3))
                done += hi - lo
                continue
            except DmaError:
                pass
            for page in range(first + a, first + b):  # which page failed: one at a time
                plo = max(off, page << PAGE_SHIFT)
                phi = min(off + total, page + 1 << PAGE_SHIFT)
                pgpa = (ptes[page] & ~(PAGE_SIZE - 1)) + (plo & (PAGE_SIZE - 1))
                try:
                    mem.write_ramp(pgpa, phi - plo >> 3, base + (done >> 3))
                except DmaError as exc:
                    res, written = (DMA_ERROR, exc.addr), page - first
                    break
                done += phi - plo
            if res is not None:
                break
        if written:
            self.audit.access_run(region.track, first, ptes[first:first + written], po,
                                  done, True, gen)
        if res is None and stop < end:
            res = PAGE_FAULT, stop
        return res

    def crc_in(self, region: Region, off: int, length: int, crc: int) -> tuple[int, int, int]:
        """Read [off, off+length) page by page folding CRC32. Returns (status, r, crc)."""
        ptes, mem, audit, track = region.ptes, self.mem, self.audit, region.track
        end = off + length
        while off < end:
            page, po = off >> PAGE_SHIFT, off & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - po, end - off)
            pte = ptes[page]
            if not pte:
                return PAGE_FAULT, page, crc
            gpa = (pte & ~(PAGE_SIZE - 1)) + po
            try:
                crc = mem.crc32(gpa, n, crc, zlib.crc32)
            except DmaError as exc:
                return DMA_ERROR, exc.addr, crc
            audit.access(track, page, gpa, n, False)
            off += n
        return OK, 0, crc

    def page_fault(self, region: Region, page: int) -> None:
        self.post_event(EV_PAGE_FAULT, region.rid, page)
        self.emit("PAGE_FAULT", {"region": region.rid, "page": page})

    def _check_abort(self) -> None:
        if self.aborting.is_set():
            raise Aborted

    # --- commands -------------------------------------------------------------------
    def execute(self, cmd: Command) -> tuple[Result, Callable[[], None] | None]:
        op = cmd.opcode
        if op == OP_NOP:
            return (OK, 0, 0), None
        if op == OP_FENCE:
            return self._fence(), None
        if op == OP_CREATE_REGION:
            return self._create(cmd), None
        if not OP_NOP < op <= OP_FENCE:
            return (BAD_OPCODE, 0, 0), None
        region = self.regions.get(cmd.region)
        if region is None:
            return (NO_REGION, 0, 0), None
        if op == OP_INVALIDATE:
            return self._invalidate(region, cmd)
        handler = {OP_MAP_PAGES: self._map_pages, OP_DESTROY_REGION: self._destroy_cmd,
                   OP_DMA_WRITE: self._dma_write, OP_DMA_READ: self._dma_read,
                   OP_STREAM_START: self._stream_start, OP_STREAM_STOP: self._stream_stop}[op]
        return handler(region, cmd), None

    def _fence(self) -> Result:
        for region in list(self.regions.values()):
            with region.lock:  # waits for any in-flight stream chunk
                pass
        return OK, 0, 0

    def _create(self, cmd: Command) -> Result:
        rid, npages, flags = cmd.region, cmd.a[0], cmd.a[1]
        if not 1 <= rid <= MAX_REGION_ID or not 1 <= npages <= MAX_PAGES or flags & ~1:
            return BAD_ARG, 0, 0
        if rid in self.regions:
            return EXISTS, 0, 0
        total = sum(r.npages for r in self.regions.values())
        if len(self.regions) >= MAX_REGIONS or total + npages > MAX_TOTAL_PAGES:
            return NO_SPACE, 0, 0
        track = self.audit.region_created(rid, npages)
        with self.lock:
            self.regions[rid] = Region(rid, npages, flags & REGION_WRITABLE, track)
        return OK, 0, 0

    def _map_pages(self, region: Region, cmd: Command) -> Result:
        first, count, list_gpa = cmd.a[0], cmd.a[1], cmd.a[2]
        if (not 1 <= count <= MAX_MAP_COUNT or first >= region.npages
                or count > region.npages - first or list_gpa % PAGE_SIZE):
            return BAD_ARG, 0, 0
        try:
            addrs = array("Q", self.mem.read(list_gpa, 8 * count))
        except DmaError as exc:
            return DMA_ERROR, exc.addr, 0
        for gpa in addrs:
            if gpa % PAGE_SIZE:
                return BAD_ARG, gpa, 0
            try:
                self.mem.check(gpa, PAGE_SIZE, region.writable)
            except DmaError as exc:
                return DMA_ERROR, exc.addr, 0
        with region.urgent():
            region.map_pages(first, addrs)
            self.audit.pages_mapped(region.track, first, count)
        return OK, 0, 0

    def _invalidate(self, region: Region, cmd: Command) -> tuple[Result, Callable[[], None] | None]:
        first, count = cmd.a[0], cmd.a[1]
        if count < 1 or first >= region.npages or count > region.npages - first:
            return (BAD_ARG, 0, 0), None
        self.audit.invalidate_request(region.track, first, count)
        stale: tuple[int, int] | None = None
        with region.urgent():  # the in-flight chunk (command or stream) finishes first
            if self.faults.write_after_revoke:
                stale = self._first_mapped(region, first, count)
            mapped = region.invalidate(first, count)
        self._revoke_faults()
        self.audit.invalidate_ack(region.track, first, count, mapped)
        self.emit("INVALIDATE_ACK", {"region": region.rid, "first": first, "count": count,
                                     "mapped": mapped})
        after = None
        if stale is not None:
            def after() -> None:  # injected bug: one write through a stale translation
                gpa, page = stale
                with region.lock:
                    try:
                        self.mem.write(gpa, pattern(region.rid, 0xFFFF, page << PAGE_SHIFT, 8))
                    except DmaError:
                        return
                    self.audit.access(region.track, page, gpa, 8, True, 0xFFFF)
        return (OK, mapped, 0), after

    @staticmethod
    def _first_mapped(region: Region, first: int, count: int) -> tuple[int, int] | None:
        for page in range(first, first + count):
            if region.ptes[page]:
                return region.ptes[page] & ~(PAGE_SIZE - 1), page
        return None

    def _revoke_faults(self) -> None:
        f = self.faults
        with f.changed:
            while f.never_ack_revoke and not self.aborting.is_set():
                f.changed.wait(0.1)
            self._check_abort()
        if f.delay_revoke_ms:
            deadline = time.monotonic() + f.delay_revoke_ms / 1000
            while (left := deadline - time.monotonic()) > 0:
                if self.aborting.wait(min(left, 0.05)):
                    raise Aborted

    def _stop_stream(self, region: Region) -> Stream | None:
        stream = region.stream
        if isinstance(stream, Stream):
            stream.stop()
            return stream
        return None

    def _destroy(self, region: Region) -> None:
        self._stop_stream(region)
        with region.lock:
            region.destroyed = True
            region.changed.notify_all()
            self.audit.region_destroyed(region.track)
        with self.lock:
            if self.regions.get(region.rid) is region:
                del self.regions[region.rid]

    def _destroy_cmd(self, region: Region, cmd: Command) -> Result:
        stream = region.stream
        running = isinstance(stream, Stream) and stream.state != "stopped"
        self._destroy(region)
        if running:
            self.post_event(EV_STREAM_STOPPED, region.rid, ABORTED)
        return OK, 0, 0

    def _span_ok(self, region: Region, off: int, length: int, align: int) -> bool:
        return (length > 0 and off % align == 0 and length % align == 0
                and off < region.size and length <= region.size - off)

    def _dma_write(self, region: Region, cmd: Command) -> Result:
        off, length, gen = cmd.a[0], cmd.a[1], cmd.a[2]
        if not region.writable or not 1 <= gen <= 0xFFFF or not self._span_ok(region, off,
                                                                           length, 8):
            return BAD_ARG, 0, 0
        start, end = off, off + length
        while off < end:
            self._check_abort()
            n = min(CHUNK - off % CHUNK, end - off)
            region.yield_to_waiters()
            with region.lock:
                if region.destroyed:
                    raise Aborted
                res = self.write_pattern(region, off, n, gen)
            if res is not None:
                done = off - start
                if res[0] == PAGE_FAULT:
                    self.page_fault(region, res[1])
                    done = max(0, (res[1] << PAGE_SHIFT) - start)
                return res[0], res[1], done
            off += n
        return OK, length, 0

    def _dma_read(self, region: Region, cmd: Command) -> Result:
        off, length = cmd.a[0], cmd.a[1]
        if not self._span_ok(region, off, length, 1):
            return BAD_ARG, 0, 0
        crc, end = 0, off + length
        while off < end:
            self._check_abort()
            n = min(CHUNK - off % CHUNK, end - off)
            region.yield_to_waiters()
            with region.lock:
                status, r0, crc = self.crc_in(region, off, n, crc)
            if status == PAGE_FAULT:
                self.page_fault(region, r0)
            if status:
                return status, r0, 0
            off += n
        return OK, crc, length

    def _stream_start(self, region: Region, cmd: Command) -> Result:
        off, length, gen, chunk, interval = cmd.a[:5]
        chunk = chunk or PAGE_SIZE
        if (not region.writable or gen > 0xFFFF or not self._span_ok(region, off, length, 8)
                or chunk % 8 or not 0 < chunk <= MAX_STREAM_CHUNK or interval > 10_000_000):
            return BAD_ARG, 0, 0
        old = region.stream
        if isinstance(old, Stream) and old.state != "stopped":
            return EXISTS, 0, 0
        stream = Stream(self, region, off, length, gen, min(chunk, length), interval)
        region.stream = stream
        stream.start()
        return OK, 0, 0

    def _stream_stop(self, region: Region, cmd: Command) -> Result:
        stream = self._stop_stream(region)
        if stream is None:
            return BAD_ARG, 0, 0
        region.stream = None
        return OK, stream.chunks, stream.passes

    # --- introspection --------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        with self.lock:
            regs = {
                "status": self.status, "sq_base": self.sq_base, "sq_entries": self.sq_entries,
                "sq_head": self.sq_head, "sq_tail": self.sq_tail, "cq_base": self.cq_base,
                "cq_entries": self.cq_entries, "cq_head": self.cq_head,
                "cq_tail": self.cq_tail, "eq_base": self.eq_base,
                "eq_entries": self.eq_entries, "eq_head": self.eq_head,
                "eq_tail": self.eq_tail, "cmds_done": self.cmds_done, "errors": self.errors,
                "scratch": self.scratch,
            }
            return {"enabled": self.enabled, "fatal": bool(self.status & STATUS_FATAL),
                    "fatal_reason": self.fatal_reason, "registers": regs,
                    "regions": len(self.regions), "stats": dict(self.stats)}

    def region_list(self) -> list[dict[str, Any]]:
        with self.lock:
            regions = list(self.regions.values())
        return [r.describe() for r in regions]

    def stream_list(self) -> list[dict[str, Any]]:
        with self.lock:
            regions = list(self.regions.values())
        return [r.stream.describe() for r in regions if isinstance(r.stream, Stream)]
