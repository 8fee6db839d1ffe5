"""BAR0's second page: a read-only mirror of the register file in shared memory.

vfio-user lets a server offer parts of a region as memory the client maps (the region's
``VFIO_REGION_INFO_CAP_SPARSE_MMAP`` areas, backed by the file descriptor sent with the
DEVICE_GET_REGION_INFO reply; QEMU 10.1+ maps each area into the guest as RAM device
memory: hw/vfio/region.c ``vfio_region_mmap``, hw/vfio-user/device.c
``vfio_user_device_io_get_region_info``). BAR0 page 0 stays trapped: every read and write
there is a vfio-user message, as before. Page 1 (``MIRROR_OFFSET``) holds the same
32-bit registers at the same offsets (``MIRROR_OFFSET + REG_X``), kept current by the
device whenever one changes, so a guest reads status and counters with no exit to QEMU
and no socket round trip. Writes to page 1 reach no register (the mapping is plain
memory; the next change of the register file overwrites them).
"""

from __future__ import annotations

import mmap
import os
import struct

PAGE = 4096
MIRROR_OFFSET = 0x1000  # BAR0 page 1
MIRROR_WORDS = 0x84 // 4  # registers 0x000..0x080 (REG_SCRATCH is the last)
_PACK = struct.Struct(f"<{MIRROR_WORDS}I")


class RegisterMirror:
    """A memfd the size of BAR0 (two pages); page 1 is the mirror. ``fd`` is what the
    REGION_INFO reply carries (the client mmaps [MIRROR_OFFSET, +PAGE) of it)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("pinlab-bar0", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 2 * PAGE)
        self._mm = mmap.mmap(self.fd, 2 * PAGE, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)

    def publish(self, words: list[int]) -> None:
        """Store the register file (``MIRROR_WORDS`` u32 values, offset order)."""
        _PACK.pack_into(self._mm, MIRROR_OFFSET, *words)

    def read(self, off: int, count: int) -> bytes:
        """Bytes of BAR0 at ``off`` in page 1 as the client sees them (trapped reads)."""
        return self._mm[off:off + count]

    def close(self) -> None:
        self._mm.close()
        os.close(self.fd)
