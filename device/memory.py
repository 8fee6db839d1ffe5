"""Guest memory: the DMA_MAP table and guest-physical address translation.

Every access goes through :class:`GuestMemory` and is bounds-checked against the maps the
client gave us; an address outside a mapping, an fd-less mapping or a write to a read-only
mapping raises :class:`DmaError`. The device never touches host memory outside mapped
guest RAM. All accesses copy through ``mmap`` slices, so no buffer export ever outlives
the call and DMA_UNMAP can always close the mapping. The one exception is
``Mapping.words``, a numpy view of a writable mapping used by :meth:`write_ramp`: it is
dropped (under ``lock``) before the mapping is closed, and its slices never outlive a call.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("pinlab.device.memory")

BytesLike = bytes | bytearray | memoryview
MASK64 = (1 << 64) - 1


_RAMP = np.arange((1 << 20) // 8 + 512, dtype=np.uint64)  # a 1 MiB stream chunk and more


def ramp(words: int) -> np.ndarray:
    """0, 1, ..., words-1 as uint64 (a cached array for up to ~1 MiB of words)."""
    return _RAMP[:words] if words <= len(_RAMP) else np.arange(words, dtype=np.uint64)


class DmaError(Exception):
    """A guest-physical access could not be performed; ``addr`` is the first bad address."""

    def __init__(self, addr: int, why: str) -> None:
        super().__init__(f"{why} at {addr:#x}")
        self.addr = addr


@dataclass
class Mapping:
    iova: int
    size: int
    flags: int  # DMA_FLAG_READ | DMA_FLAG_WRITE
    offset: int
    mm: mmap.mmap | None
    words: np.ndarray | None = None  # the mapping as uint64 words (writable maps only)

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def writable(self) -> bool:
        return bool(self.flags & 2) and self.mm is not None

    def describe(self) -> dict[str, object]:
        return {"iova": self.iova, "size": self.size, "flags": self.flags,
                "offset": self.offset, "backed": self.mm is not None}


class GuestMemory:
    """Map table with translation. Thread-safe; ``lock`` serialises accesses and unmaps."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._maps: list[Mapping] = []  # newest last; lookups prefer the newest
        self._last: Mapping | None = None

    # --- map management -------------------------------------------------------------
    def map(self, iova: int, size: int, flags: int, offset: int, fd: int | None) -> Mapping:
        """Add a mapping. Takes ownership of ``fd`` (closed here once mmap'd)."""
        mm: mmap.mmap | None = None
        try:
            if fd is not None and size > 0:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if flags & 2 else 0)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
        finally:
            if fd is not None:
                os.close(fd)
        m = Mapping(iova, size, flags, offset, mm)
        if mm is not None and flags & 2 and size % 8 == 0 and iova % 8 == 0:
            m.words = np.frombuffer(mm, dtype=np.uint64)
        with self.lock:
            self._maps.append(m)
            self._last = None
        return m

    def unmap(self, iova: int, size: int) -> int:
        """Remove the mapping that is exactly [iova, iova+size); without one, remove every
        mapping intersecting the range (conservative: never access a range the client
        unmapped). Returns how many were removed."""
        with self.lock:
            exact = [m for m in self._maps if (m.iova, m.size) == (iova, size)]
            if exact:
                gone = exact[-1:]
                keep = [m for m in self._maps if m is not gone[0]]
            else:
                keep, gone = [], []
                for m in self._maps:
                    (gone if m.iova < iova + size and iova < m.end else keep).append(m)
            self._drop(gone)
            self._maps = keep
            return len(gone)

    def unmap_all(self) -> int:
        with self.lock:
            n = len(self._maps)
            self._drop(self._maps)
            self._maps = []
            return n

    def _drop(self, maps: list[Mapping]) -> None:
        self._last = None
        for m in maps:
            m.words = None  # the only long-lived buffer export of m.mm
            if m.mm is not None:
                try:
                    m.mm.close()
                except BufferError:  # a view still alive somewhere (a traceback?)
                    log.warning("mapping %#x+%#x: still exported, unmapped when freed",
                                m.iova, m.size)
                m.mm = None

    def mappings(self) -> list[dict[str, object]]:
        with self.lock:
            return [m.describe() for m in self._maps]

    # --- translation ----------------------------------------------------------------
    def _find(self, addr: int) -> Mapping | None:
        last = self._last
        if last is not None and last.iova <= addr < last.end and last.mm is not None:
            return last
        for m in reversed(self._maps):
            if m.iova <= addr < m.end:
                self._last = m
                return m
        return None

    def _segments(self, addr: int, length: int, write: bool) -> list[tuple[mmap.mmap, int, int]]:
        """Split [addr, addr+length) into (mmap, offset, n) pieces or raise DmaError."""
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise DmaError(addr, "address out of range")
        out = []
        while length > 0:
            m = self._find(addr)
            if m is None:
                raise DmaError(addr, "not mapped")
            if m.mm is None:
                raise DmaError(addr, "mapping has no fd")
            if write and not m.writable:
                raise DmaError(addr, "read-only mapping")
            n = min(length, m.end - addr)
            out.append((m.mm, addr - m.iova, n))
            addr += n
            length -= n
        return out

    def check(self, addr: int, length: int, write: bool) -> None:
        with self.lock:
            self._segments(addr, length, write)

    def read(self, addr: int, length: int) -> bytes:
        with self.lock:
            segs = self._segments(addr, length, False)
            if len(segs) == 1:
                mm, off, n = segs[0]
                return mm[off:off + n]
            return b"".join(mm[off:off + n] for mm, off, n in segs)

    def write(self, addr: int, data: BytesLike) -> None:
        view = memoryview(data).cast("B")
        with self.lock:
            last = self._last  # fast path: the whole access inside the last-used mapping
            if (last is not None and last.mm is not None and last.flags & 2
                    and last.iova <= addr and addr + len(view) <= last.end):
                off = addr - last.iova
                last.mm[off:off + len(view)] = view
                return
            segs = self._segments(addr, len(view), True)
            pos = 0
            for mm, off, n in segs:
                mm[off:off + n] = view[pos:pos + n]
                pos += n

    def write_ramp(self, addr: int, words: int, start: int) -> None:
        """Write the 8-byte words ``start + i`` (i < ``words``, little-endian, mod 2**64) at
        ``addr``, straight into the mapping: no intermediate buffer. All or nothing: raises
        DmaError (writing nothing) unless the whole range is writable guest memory."""
        n = words << 3
        with self.lock:
            last = self._last
            if (last is not None and last.words is not None and last.iova <= addr
                    and addr + n <= last.end and not addr & 7):
                i = (addr - last.iova) >> 3  # fast path: one ufunc into the cached view
                np.add(_RAMP[:words] if words <= len(_RAMP) else ramp(words),
                       np.uint64(start), out=last.words[i:i + words])
                return
            segs = self._segments(addr, n, True)
            if len(segs) > 1 and any(off & 7 or nb & 7 for _, off, nb in segs):
                raw = (ramp(words) + np.uint64(start)).tobytes()  # a word spans two maps
                pos = 0
                for mm, off, nb in segs:
                    mm[off:off + nb] = raw[pos:pos + nb]
                    pos += nb
                return
            done = 0
            for mm, off, nb in segs:
                k = nb >> 3
                dst = np.frombuffer(mm, dtype=np.uint64, count=k, offset=off)
                try:
                    np.add(ramp(k), np.uint64(start + done & MASK64), out=dst)
                finally:
                    del dst  # release the buffer export: the mapping stays closable
                done += k

    def crc32(self, addr: int, length: int, crc: int, fn: Callable[[BytesLike, int], int]) -> int:
        """Fold ``fn`` (e.g. zlib.crc32) over guest bytes without an intermediate join."""
        with self.lock:
            for mm, off, n in self._segments(addr, length, False):
                crc = fn(mm[off:off + n], crc)
        return crc
