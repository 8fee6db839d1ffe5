"""Guest memory: the DMA_MAP table and guest-physical address translation.

Every access goes through :class:`GuestMemory` and is bounds-checked against the maps the
client gave us; an address outside a mapping, an fd-less mapping or a write to a read-only
mapping raises :class:`DmaError`. The device never touches host memory outside mapped
guest RAM. All accesses copy through ``mmap`` slices, so no buffer export ever outlives
the call and DMA_UNMAP can always close the mapping.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

BytesLike = bytes | bytearray | memoryview


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
            if m.mm is not None:
                m.mm.close()
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

    def crc32(self, addr: int, length: int, crc: int, fn: Callable[[BytesLike, int], int]) -> int:
        """Fold ``fn`` (e.g. zlib.crc32) over guest bytes without an intermediate join."""
        with self.lock:
            for mm, off, n in self._segments(addr, length, False):
                crc = fn(mm[off:off + n], crc)
        return crc
