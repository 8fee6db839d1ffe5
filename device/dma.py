"""The device's data path: the DMA pattern written into a region's pages, DMA reads
folded into a CRC, and the guest-physical runs of a region's page table.

Every function here runs with ``region.lock`` held by the caller (a command or a
stream holds it for one chunk), so an INVALIDATE that took the lock sees no access in
flight. Every page touched is recorded in the audit log before the lock is released.
The pattern is defined in ``device/REGISTERS.md`` ("Data pattern").
"""

from __future__ import annotations

import zlib
from array import array

import numpy as np

from pinlab.common.uapi import STATUS_DMA_ERROR as DMA_ERROR
from pinlab.common.uapi import STATUS_OK as OK
from pinlab.common.uapi import STATUS_PAGE_FAULT as PAGE_FAULT

from .audit import AuditLog
from .memory import DmaError, GuestMemory
from .regions import PAGE_SHIFT, PAGE_SIZE, Region, word_base, words_to_wrap

MAX_STREAM_CHUNK = 1 << 20  # STREAM_START's largest chunk (REGISTERS.md)

_STEPS = np.arange(MAX_STREAM_CHUNK // PAGE_SIZE + 2, dtype=np.uint64) << np.uint64(PAGE_SHIFT)


class DmaPath:
    """The device's accesses to guest memory through a region's page table.

    ``mem`` is guest RAM (guest-physical addresses), ``audit`` gets one record per run of
    pages accessed. Offsets and lengths are bytes within the region."""

    def __init__(self, mem: GuestMemory, audit: AuditLog) -> None:
        self.mem, self.audit = mem, audit

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
