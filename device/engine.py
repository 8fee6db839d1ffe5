"""The DMA engine: BAR0 registers, SQ/CQ/EQ rings in guest memory, commands, regions.

The data path (pattern writes, CRC reads through a region's page table) is in
``dma.py``, streams in ``stream.py``; register offsets, opcodes and codes come from
``pinlab.common.uapi`` (the twin of ``kmod/pinlab.h``).

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

import logging
import struct
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

from pinlab.common import uapi as U
from pinlab.common.uapi import (  # re-exported: the tests and benchmarks use E.OP_* / E.OK
    CQE_SIZE,
    CTRL_ENABLE,
    CTRL_RESET,
    EQE_SIZE,
    EV_DEVICE_ERROR,
    EV_PAGE_FAULT,
    EV_STREAM_STOPPED,
    MAX_PAGES,
    MAX_REGION_ID,
    OP_CREATE_REGION,
    OP_DESTROY_REGION,
    OP_DMA_READ,
    OP_DMA_WRITE,
    OP_FENCE,
    OP_INVALIDATE,
    OP_MAP_PAGES,
    OP_NOP,
    OP_STREAM_START,
    OP_STREAM_STOP,
    SQE,
    SQE_SIZE,
    STATUS_ENABLED,
    STATUS_FATAL,
    STATUS_NAMES,
    VEC_CQ,
    VEC_EQ,
)

from . import sched
from .audit import AuditLog
from .dma import MAX_STREAM_CHUNK, DmaPath
from .fastpath import CTL_MEM, warm_up
from .fastpath import ready as fastpath_ready
from .faults import Faults
from .irq import IrqTable
from .memory import DmaError, GuestMemory
from .mirror import MIRROR_OFFSET, MIRROR_WORDS, RegisterMirror
from .regions import (
    MAX_REGIONS,
    PAGE_SHIFT,
    PAGE_SIZE,
    REGION_WRITABLE,
    Region,
    pattern,
    wait_outside,
)
from .sched import device_thread
from .stream import Stream

log = logging.getLogger("pinlab.device.engine")

__all__ = ["EV_DEVICE_ERROR", "STATUS_NAMES", "Engine", "Stream"]

CQE_HEAD = struct.Struct("<HH")  # cid, status (bytes 0..3)
CQE_TAIL = struct.Struct("<QQII")  # result0, result1, sq_head, reserved (bytes 8..31)
EQE_HEAD = struct.Struct("<HH")  # type, reserved
EQE_TAIL = struct.Struct("<IIQQ")  # region, reserved, info0, info1
MIN_ENTRIES = 2
MAX_ENTRIES = 4096
MAX_TOTAL_PAGES = 4 * MAX_PAGES
CHUNK = 64 * 1024

# status codes under their short names (REGISTERS.md "Status codes")
OK, BAD_OPCODE, BAD_ARG, NO_REGION, EXISTS = (
    U.STATUS_OK, U.STATUS_BAD_OPCODE, U.STATUS_BAD_ARG, U.STATUS_NO_REGION, U.STATUS_EXISTS)
DMA_ERROR, PAGE_FAULT, ABORTED, NO_SPACE = (
    U.STATUS_DMA_ERROR, U.STATUS_PAGE_FAULT, U.STATUS_ABORTED, U.STATUS_NO_SPACE)

# The device's threads hand work to each other (vfio-user message -> SQ fetcher -> CQ/MSI-X)
# while stream threads compute chunks. With CPython's default 5 ms GIL switch interval
# every hand-off may wait 5 ms behind a stream, so a revoke fence took tens of ms; the
# device process runs with a shorter interval (set by serve.main and the benchmarks).
SWITCH_INTERVAL = 0.0002

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


# BAR0 registers a write sets only while the device is not enabled: offset -> (attribute,
# shift) of the value it sets (the *_BASE registers are u64 in two words)
_CONFIG_REGS: dict[int, tuple[str, int]] = {
    U.REG_SQ_BASE: ("sq_base", 0), U.REG_SQ_BASE + 4: ("sq_base", 32),
    U.REG_SQ_ENTRIES: ("sq_entries", -1),
    U.REG_CQ_BASE: ("cq_base", 0), U.REG_CQ_BASE + 4: ("cq_base", 32),
    U.REG_CQ_ENTRIES: ("cq_entries", -1),
    U.REG_EQ_BASE: ("eq_base", 0), U.REG_EQ_BASE + 4: ("eq_base", 32),
    U.REG_EQ_ENTRIES: ("eq_entries", -1),
}


class Engine:
    def __init__(self, mem: GuestMemory, irq: IrqTable, audit: AuditLog, faults: Faults,
                 emit: Emit | None = None) -> None:
        self.mem, self.irq, self.audit, self.faults = mem, irq, audit, faults
        self.dma = DmaPath(mem, audit)
        mem.before_drop.append(self._streams_leave_memory)
        warm_up()  # compile the stream loop before the first STREAM_START needs it
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
        self.mirror = RegisterMirror()
        self._reset_regs()
        self._publish()
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

    def _regfile(self) -> dict[int, int]:
        """The 32-bit registers by BAR0 offset (caller holds ``lock``)."""
        return {
            U.REG_ID: U.ID_MAGIC, U.REG_VERSION: U.VERSION, U.REG_STATUS: self.status,
            U.REG_CTRL: self.status & STATUS_ENABLED,
            U.REG_SQ_BASE: self.sq_base & 0xFFFFFFFF, U.REG_SQ_BASE + 4: self.sq_base >> 32,
            U.REG_SQ_ENTRIES: self.sq_entries, U.REG_SQ_TAIL: self.sq_tail,
            U.REG_SQ_HEAD: self.sq_head,
            U.REG_CQ_BASE: self.cq_base & 0xFFFFFFFF, U.REG_CQ_BASE + 4: self.cq_base >> 32,
            U.REG_CQ_ENTRIES: self.cq_entries, U.REG_CQ_HEAD: self.cq_head,
            U.REG_CQ_TAIL: self.cq_tail,
            U.REG_EQ_BASE: self.eq_base & 0xFFFFFFFF, U.REG_EQ_BASE + 4: self.eq_base >> 32,
            U.REG_EQ_ENTRIES: self.eq_entries, U.REG_EQ_HEAD: self.eq_head,
            U.REG_EQ_TAIL: self.eq_tail,
            U.REG_CMDS_DONE: self.cmds_done, U.REG_ERRORS: self.errors,
            U.REG_SCRATCH: self.scratch,
        }

    def read32(self, off: int) -> int:
        """The 32-bit register at BAR0 byte offset ``off`` (4-aligned); 0 if undefined.
        Page 1 (``MIRROR_OFFSET``) mirrors page 0."""
        with self.lock:
            return self._regfile().get(off & (MIRROR_OFFSET - 1), 0)

    def _publish(self) -> None:
        """Store the register file into the mirror page (caller holds ``lock``): called
        after every change, before the interrupt that may make a driver read it."""
        regs = self._regfile()
        self.mirror.publish([regs.get(o, 0) for o in range(0, MIRROR_WORDS * 4, 4)])

    def write32(self, off: int, val: int) -> None:
        """A 32-bit write of ``val`` to the register at BAR0 byte offset ``off`` (page 1,
        the mirror, has no writable register)."""
        if off >= MIRROR_OFFSET:
            return
        if off == U.REG_CTRL and val & CTRL_RESET:
            self.reset("ctrl")
        with self.lock:
            if off == U.REG_CTRL:
                if val & CTRL_ENABLE and not self.enabled:
                    self._enable()
                elif not val & CTRL_ENABLE:
                    self.status &= ~STATUS_ENABLED
            elif off == U.REG_SQ_TAIL:
                self._doorbell("sq_tail", val, self.sq_entries)
            elif off == U.REG_CQ_HEAD:
                self._doorbell("cq_head", val, self.cq_entries)
            elif off == U.REG_EQ_HEAD:
                self._doorbell("eq_head", val, self.eq_entries)
            elif off == U.REG_SCRATCH:
                self.scratch = val
                self.audit.scratch(val)
            elif not self.enabled and off < MIRROR_OFFSET:
                self._write_config(off, val)
            self._publish()
            self.cond.notify_all()

    def _write_config(self, off: int, val: int) -> None:
        reg = _CONFIG_REGS.get(off)
        if reg is None:
            return
        name, shift = reg
        if shift < 0:
            setattr(self, name, val)
        else:
            keep = getattr(self, name) & ~(0xFFFFFFFF << shift)
            setattr(self, name, keep | val << shift)

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
        self._publish()
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
            self._publish()
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
                self._publish()
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
        self.mirror.close()

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
        device_thread()
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
                self._publish()
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
        # real-time like the fetcher (sched.py): between chunks its Python holds the
        # interpreter lock that the fetcher needs for INVALIDATE; a holder at normal
        # priority that the host keeps off the CPU stalls the fence. Its commands are
        # bounded (a DMA_WRITE/READ of at most the region, in 64 KiB chunks).
        device_thread()
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
            self._publish()
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
            self._publish()
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

    def page_fault(self, region: Region, page: int) -> None:
        self.post_event(EV_PAGE_FAULT, region.rid, page)
        self.emit("PAGE_FAULT", {"region": region.rid, "page": page})

    def _stream_stopped(self, region: Region, status: int, info: int) -> None:
        self.post_event(EV_STREAM_STOPPED, region.rid, status, info)

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
            with region.urgent():  # waits for any in-flight stream chunk, audits it
                pass
        return OK, 0, 0

    def _streams_leave_memory(self) -> Callable[[], None]:
        """GuestMemory.before_drop (under its lock): every compiled stream loop returns
        before its next chunk and writes no more until the returned function is called
        (its next chunk then finds the mapping gone, or takes the new one)."""
        with self.lock:
            regions = [r for r in self.regions.values() if r.stream is not None]
        for r in regions:
            r.ctl[CTL_MEM] = 1
        for r in regions:
            wait_outside(r.ctl, r.stream.tid if r.stream is not None else None)

        def resume() -> None:
            for r in regions:
                r.ctl[CTL_MEM] = 0
        return resume

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
        if (not 1 <= count <= U.MAP_CHUNK or first >= region.npages
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
        if stream is not None:
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
        running = stream is not None and stream.live
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
        with sched.normal_priority(length > sched.LONG_COMMAND_BYTES):
            return self._dma_write_span(region, off, length, gen)

    def _dma_write_span(self, region: Region, off: int, length: int, gen: int) -> Result:
        start, end = off, off + length
        while off < end:
            self._check_abort()
            n = min(CHUNK - off % CHUNK, end - off)
            region.yield_to_waiters()
            with region.lock:
                if region.destroyed:
                    raise Aborted
                res = self.dma.write_pattern(region, off, n, gen)
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
        with sched.normal_priority(length > sched.LONG_COMMAND_BYTES):
            return self._dma_read_span(region, off, length)

    def _dma_read_span(self, region: Region, off: int, length: int) -> Result:
        crc, end = 0, off + length
        while off < end:
            self._check_abort()
            n = min(CHUNK - off % CHUNK, end - off)
            region.yield_to_waiters()
            with region.lock:
                status, r0, crc = self.dma.crc_in(region, off, n, crc)
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
        if old is not None and old.live:
            return EXISTS, 0, 0
        stream = Stream(region, off, length, gen, min(chunk, length), interval, self.dma,
                        self.page_fault, self._stream_stopped)
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
                    "stream_loop_ready": fastpath_ready(),
                    "scheduling": sched.describe(),
                    "regions": len(self.regions), "stats": dict(self.stats)}

    def region_list(self) -> list[dict[str, Any]]:
        with self.lock:
            regions = list(self.regions.values())
        return [r.describe() for r in regions]

    def stream_list(self) -> list[dict[str, Any]]:
        with self.lock:
            regions = list(self.regions.values())
        return [r.stream.describe() for r in regions if r.stream is not None]
