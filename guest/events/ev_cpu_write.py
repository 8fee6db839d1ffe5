"""Event ``cpu-write``: the guest's steps.

The region is registered read-only (no FOLL_WRITE; the device may only read) over a
mapping that holds known contents (``fill``: a MAP_PRIVATE file gets them in the file and
is only read-faulted, so its PTEs map the page cache's pages; the cell option ``fast``:
the pinned modes take the pages with get/pin_user_pages_fast()). The device reads the
region (DMA_READ's CRC-32); the process writes new contents over every page; the device
reads again. Recorded: the CRC-32 of the old and the new contents, of what the process's
mapping holds before and after the write, and of what the device read each time, and the
PFNs after the write. The host side (orchestrator/events/ev_cpu_write.py) compares them.
"""

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import timed
from pinlab.guest.pinlab_ioctl import dma_crc32

NAME = "cpu-write"
READONLY = True


def old_contents(size):
    """What the mapping holds before the write: page i is filled with 0x40 + i % 26."""
    return b"".join(bytes([0x40 + i % 26]) * 4096 for i in range(size // 4096))


def new_contents(size):
    """What the process writes: page i filled with 0xa0 + i % 26 (no byte of old)."""
    return b"".join(bytes([0xa0 + i % 26]) * 4096 for i in range(size // 4096))


def fill(size):
    """The mapping's contents before registration (pinlab_cell.Mapping ``fill``)."""
    return old_contents(size)


def device_read(c, name):
    """DMA_READ of the whole region as step ``name``; returns its CRC-32 or None."""
    got = timed(c.rep, name, c.dev.dma_read, c.rid, 0, c.m.size)
    return None if got is None else got[0]


def run(c):
    m, rep, size = c.m, c.rep, c.m.size
    old, new = old_contents(size), new_contents(size)
    rep[Key.CRC_OLD] = dma_crc32(old)
    rep[Key.CRC_NEW] = dma_crc32(new)
    rep[Key.CRC_MAP_BEFORE] = dma_crc32(m.mm[:size])
    rep[Key.DEVICE_CRC_BEFORE] = device_read(c, "dma_read_before")
    timed(rep, "cpu_write", m.mm.__setitem__, slice(0, size), new)
    rep[Key.PFNS_AFTER_WRITE] = m.pfns()
    rep[Key.CRC_MAP_AFTER] = dma_crc32(m.mm[:size])
    rep[Key.DEVICE_CRC_AFTER] = device_read(c, "dma_read_after")
    rep[Key.QUERY_AFTER_EVENT] = c.dev.query(c.rid)
