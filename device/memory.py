"""Guest memory: the DMA_MAP table and guest-physical address translation.

Every access goes through :class:`GuestMemory` and is bounds-checked against the maps the
client gave us; an address outside a mapping, an fd-less mapping or a write to a read-only
mapping raises :class:`DmaError`. The device never touches host memory outside mapped
guest RAM. All accesses copy through ``mmap`` slices, so no buffer export ever outlives
the call and DMA_UNMAP can always close the mapping.

Permissions: a read needs the mapping's READ flag and a write its WRITE flag, for every
access the device makes (ring fetches, page lists, DMA). A file that shrank can never
kill the device with SIGBUS: only files sealed against shrinking (F_SEAL_SHRINK, as
QEMU's memfd backend seals them) are accessed through ``mmap``; any other file is
accessed with pread/pwrite, where a shrunk file gives a short read (:class:`MappingLost`).

The one exception to "no export outlives a call" is ``Mapping.words``, a numpy view of a
writable mapping used by :meth:`write_ramp`: it is dropped (under ``lock``) before the
mapping is closed, and its slices never outlive a call.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import mmap
import os
import stat
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


class MappingLost(DmaError):
    """The file behind a mapping shrank (or failed) under the device: the client broke the
    DMA_MAP contract. :class:`GuestMemory` reports it through ``on_lost`` as well."""


# vfio-user DMA_MAP flags (the spec's VFIO_USER_F_DMA_REGION_READ / _WRITE)
READ = 1
WRITE = 2
# the sealed fast path needs this seal: the file can never shrink below a checked size
# (memfd_create(2), "File sealing"; QEMU's memory-backend-memfd sets it by default, seal=on)
_SEALS_SAFE = fcntl.F_SEAL_SHRINK


@dataclass
class Mapping:
    """One DMA_MAP. ``mm`` is set for a *sealed* mapping (its file cannot shrink, so the
    mmap is always safe to touch); ``fd`` is kept instead for an unsealed one, which is
    only ever accessed with pread/pwrite (a file that shrank gives a short read, never a
    SIGBUS). Neither is set for an fd-less map or one with no access flags."""

    iova: int
    size: int
    flags: int  # DMA_FLAG_READ | DMA_FLAG_WRITE
    offset: int
    mm: mmap.mmap | None
    words: np.ndarray | None = None  # the mapping as uint64 words (sealed writable maps)
    fd: int | None = None  # unsealed mapping: the client's fd, accessed with pread/pwrite
    had_fd: bool = False  # DMA_MAP came with an fd (counted against max_fd_maps)

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def backed(self) -> bool:
        return self.mm is not None or self.fd is not None

    @property
    def readable(self) -> bool:
        return bool(self.flags & READ) and self.backed

    @property
    def writable(self) -> bool:
        return bool(self.flags & WRITE) and self.backed

    def describe(self) -> dict[str, object]:
        return {"iova": self.iova, "size": self.size, "flags": self.flags,
                "offset": self.offset, "backed": self.backed, "sealed": self.mm is not None}


def _errno_error(err: int, why: str) -> OSError:
    return OSError(err, f"{os.strerror(err)}: {why}")


def _validate_fd(fd: int, size: int, flags: int, offset: int) -> bool:
    """Check that ``fd`` can back [offset, offset+size) with ``flags``; returns whether the
    file is sealed against shrinking. Raises OSError (EINVAL: not a regular file or the
    range passes its end; EACCES: the fd does not allow the access; ...)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _errno_error(errno.EINVAL, "DMA_MAP fd is not a regular file or memfd")
    if offset % mmap.PAGESIZE:
        raise _errno_error(errno.EINVAL, f"DMA_MAP offset {offset:#x} not page aligned")
    if offset + size > st.st_size:
        raise _errno_error(errno.EINVAL, f"DMA_MAP range {offset:#x}+{size:#x} passes the "
                                         f"end of the file ({st.st_size:#x} bytes)")
    acc = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if (flags & READ and acc == os.O_WRONLY) or (flags & WRITE and acc == os.O_RDONLY):
        raise _errno_error(errno.EACCES, f"DMA_MAP fd opened {acc:#o} for flags {flags}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd: no seals
        return False
    return bool(seals & _SEALS_SAFE)


class GuestMemory:
    """Map table with translation. Thread-safe; ``lock`` serialises accesses and unmaps.

    Maps never overlap (a DMA_MAP over an existing one is refused with EEXIST) and there
    are at most ``max_maps`` of them (ENOSPC beyond: the ``max_dma_maps`` we advertise),
    of which at most ``max_fd_maps`` with an fd (each costs an mmap or a kept fd: the
    process's VMA and fd limits must stay out of a client's reach).
    ``on_lost(why)`` is called (under ``lock``; it must not block) when an access finds
    that the file behind a mapping shrank."""

    def __init__(self, max_maps: int = 65535,
                 on_lost: Callable[[str], None] | None = None,
                 max_fd_maps: int = 1024) -> None:
        self.lock = threading.RLock()
        self.max_maps = max_maps
        self.max_fd_maps = max_fd_maps
        self._fd_maps = 0  # maps created with an fd
        self.on_lost = on_lost
        self._maps: list[Mapping] = []  # sorted by iova, never overlapping
        self._starts: list[int] = []  # the iova of each entry of _maps
        self._last: Mapping | None = None
        # called (under ``lock``) before mappings are dropped: the engine makes the
        # compiled stream loops, which write into ``Mapping.words`` without this lock,
        # leave them first
        self.before_drop: list[Callable[[], Callable[[], None]]] = []

    # --- map management -------------------------------------------------------------
    def map(self, iova: int, size: int, flags: int, offset: int, fd: int | None) -> Mapping:
        """Add a mapping of [iova, iova+size). Takes ownership of ``fd`` (kept or closed).

        Raises OSError: EINVAL (empty or wrapping range, an fd that cannot back it),
        EEXIST (overlaps a mapping), ENOSPC (``max_maps`` reached), EACCES or another
        errno of fstat/mmap (the fd cannot be mapped with ``flags``)."""
        keep_fd = False
        try:
            if size <= 0 or iova < 0 or iova + size > 1 << 64:
                raise _errno_error(errno.EINVAL, f"DMA_MAP range {iova:#x}+{size:#x}")
            with self.lock:
                self._check_free(iova, size)
                if fd is not None and self._fd_maps >= self.max_fd_maps:
                    raise _errno_error(errno.ENOSPC, f"{self.max_fd_maps} DMA maps with an fd")
            mm: mmap.mmap | None = None
            if fd is not None:
                sealed = _validate_fd(fd, size, flags, offset)
                prot = (mmap.PROT_READ if flags & READ else 0) | (
                    mmap.PROT_WRITE if flags & WRITE else 0)
                if prot:
                    # mmap(2) is the judge of the fd (EACCES, ENODEV, ...); unsealed files
                    # are then accessed with pread/pwrite only
                    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot | mmap.PROT_READ,
                                   offset=offset)
                    if not sealed:
                        mm.close()
                        mm = None
                        keep_fd = True
            m = Mapping(iova, size, flags, offset, mm, fd=fd if keep_fd else None,
                        had_fd=fd is not None)
            if mm is not None and flags & WRITE and size % 8 == 0 and iova % 8 == 0:
                m.words = np.frombuffer(mm, dtype=np.uint64)
            with self.lock:
                self._check_free(iova, size)
                i = bisect.bisect_left(self._starts, iova)
                self._maps.insert(i, m)
                self._starts.insert(i, iova)
                self._fd_maps += m.had_fd
                self._last = None
            return m
        except BaseException:
            keep_fd = False
            raise
        finally:
            if fd is not None and not keep_fd:
                os.close(fd)

    def _check_free(self, iova: int, size: int) -> None:
        """Caller holds ``lock``. Raises OSError EEXIST / ENOSPC."""
        i = bisect.bisect_right(self._starts, iova)
        if (i and self._maps[i - 1].end > iova) or (
                i < len(self._maps) and self._maps[i].iova < iova + size):
            raise _errno_error(errno.EEXIST, f"DMA_MAP {iova:#x}+{size:#x} overlaps a map")
        if len(self._maps) >= self.max_maps:
            raise _errno_error(errno.ENOSPC, f"{self.max_maps} DMA maps already")

    def unmap(self, iova: int, size: int) -> int:
        """Remove the mapping that is exactly [iova, iova+size); without one, remove every
        mapping intersecting the range (conservative: never access a range the client
        unmapped). Returns how many were removed (0: nothing was mapped there)."""
        with self.lock:
            lo = bisect.bisect_right(self._starts, iova)
            if lo and self._maps[lo - 1].end > iova:
                lo -= 1
            hi = bisect.bisect_left(self._starts, iova + size)
            gone = self._maps[lo:hi]
            if not gone:
                return 0
            del self._maps[lo:hi]
            del self._starts[lo:hi]
            self._drop(gone)
            return len(gone)

    def unmap_all(self) -> int:
        with self.lock:
            n = len(self._maps)
            self._drop(self._maps)
            self._maps = []
            self._starts = []
            return n

    def __len__(self) -> int:
        return len(self._maps)

    def _drop(self, maps: list[Mapping]) -> None:
        resumes = [hook() for hook in self.before_drop]
        try:
            self._close(maps)
        finally:
            for resume in resumes:
                resume()

    def words_at(self, addr: int) -> Mapping | None:
        """The sealed writable mapping holding ``addr``, with its ``words`` view, or None.
        The caller uses ``words`` only while it is registered with ``before_drop``."""
        with self.lock:
            m = self._find(addr)
            if m is None or m.words is None or not m.flags & WRITE:
                return None
            return m

    def _close(self, maps: list[Mapping]) -> None:
        self._last = None
        for m in maps:
            self._fd_maps -= m.had_fd
            m.words = None  # the only long-lived buffer export of m.mm
            if m.mm is not None:
                try:
                    m.mm.close()
                except BufferError:  # a view still alive somewhere (a traceback?)
                    log.warning("mapping %#x+%#x: still exported, unmapped when freed",
                                m.iova, m.size)
                m.mm = None
            if m.fd is not None:
                os.close(m.fd)
                m.fd = None

    def mappings(self, limit: int | None = None) -> list[dict[str, object]]:
        """The maps, lowest iova first (at most ``limit`` of them)."""
        with self.lock:
            return [m.describe() for m in self._maps[:limit]]

    # --- translation ----------------------------------------------------------------
    def _find(self, addr: int) -> Mapping | None:
        last = self._last
        if last is not None and last.iova <= addr < last.end and last.mm is not None:
            return last
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            m = self._maps[i]
            if addr < m.end:
                self._last = m
                return m
        return None

    def _segments(self, addr: int, length: int, write: bool) -> list[tuple[Mapping, int, int]]:
        """Split [addr, addr+length) into (mapping, offset, n) pieces or raise DmaError."""
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise DmaError(addr, "address out of range")
        out = []
        while length > 0:
            m = self._find(addr)
            if m is None:
                raise DmaError(addr, "not mapped")
            if not m.flags & (WRITE if write else READ):
                raise DmaError(addr, "mapping not writable" if write
                               else "mapping not readable")
            if not m.backed:
                raise DmaError(addr, "mapping has no fd")
            n = min(length, m.end - addr)
            out.append((m, addr - m.iova, n))
            addr += n
            length -= n
        return out

    def _lost(self, m: Mapping, off: int, why: str) -> MappingLost:
        """Caller holds ``lock``."""
        exc = MappingLost(m.iova + off, why)
        if self.on_lost is not None:
            self.on_lost(str(exc))
        return exc

    def _get(self, m: Mapping, off: int, n: int) -> bytes:
        """Bytes [off, off+n) of mapping ``m`` (caller holds ``lock``)."""
        if m.mm is not None:
            return m.mm[off:off + n]
        assert m.fd is not None
        try:
            data = os.pread(m.fd, n, m.offset + off)
        except OSError as exc:
            raise self._lost(m, off, f"guest RAM read failed: {exc}") from exc
        if len(data) < n:
            raise self._lost(m, off + len(data), "guest RAM file shrank")
        return data

    def _put(self, m: Mapping, off: int, data: BytesLike) -> None:
        """Store ``data`` at ``off`` of mapping ``m`` (caller holds ``lock``)."""
        if m.mm is not None:
            m.mm[off:off + len(data)] = data
            return
        assert m.fd is not None
        try:  # never grow the client's file: a write past its end is a lost mapping
            if os.fstat(m.fd).st_size < m.offset + off + len(data):
                raise self._lost(m, off, "guest RAM file shrank")
            os.pwrite(m.fd, data, m.offset + off)
        except OSError as exc:
            raise self._lost(m, off, f"guest RAM write failed: {exc}") from exc

    def check(self, addr: int, length: int, write: bool) -> None:
        with self.lock:
            self._segments(addr, length, write)

    def read(self, addr: int, length: int) -> bytes:
        with self.lock:
            segs = self._segments(addr, length, False)
            if len(segs) == 1:
                m, off, n = segs[0]
                return self._get(m, off, n)
            return b"".join(self._get(m, off, n) for m, off, n in segs)

    def write(self, addr: int, data: BytesLike) -> None:
        view = memoryview(data).cast("B")
        with self.lock:
            last = self._last  # fast path: the whole access inside the last-used mapping
            if (last is not None and last.mm is not None and last.flags & WRITE
                    and last.iova <= addr and addr + len(view) <= last.end):
                off = addr - last.iova
                last.mm[off:off + len(view)] = view
                return
            segs = self._segments(addr, len(view), True)
            pos = 0
            for m, off, n in segs:
                self._put(m, off, view[pos:pos + n])
                pos += n

    def write_ramp(self, addr: int, words: int, start: int) -> None:
        """Write the 8-byte words ``start + i`` (i < ``words``, little-endian, mod 2**64) at
        ``addr``, straight into the mapping: no intermediate buffer. All or nothing: raises
        DmaError (writing nothing) unless the whole range is writable guest memory (an
        unsealed mapping that shrank meanwhile may be written in part: MappingLost)."""
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
            if (len(segs) > 1 and any(off & 7 or nb & 7 for _, off, nb in segs)) or any(
                    m.mm is None for m, _, _ in segs):
                # a word spans two maps, or an unsealed map (pwrite): one buffer
                raw = memoryview((ramp(words) + np.uint64(start)).tobytes())
                pos = 0
                for m, off, nb in segs:
                    self._put(m, off, raw[pos:pos + nb])
                    pos += nb
                return
            done = 0
            for m, off, nb in segs:
                k = nb >> 3
                dst = np.frombuffer(m.mm, dtype=np.uint64, count=k, offset=off)
                try:
                    np.add(ramp(k), np.uint64(start + done & MASK64), out=dst)
                finally:
                    del dst  # release the buffer export: the mapping stays closable
                done += k

    def crc32(self, addr: int, length: int, crc: int, fn: Callable[[BytesLike, int], int]) -> int:
        """Fold ``fn`` (e.g. zlib.crc32) over guest bytes without an intermediate join."""
        with self.lock:
            for m, off, n in self._segments(addr, length, False):
                crc = fn(self._get(m, off, n), crc)
        return crc
