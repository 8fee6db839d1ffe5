"""The read-only flow: a cell with the option ``readonly`` (``--options readonly``) of an
event that lists it in its variants (orchestrator/events/ev_<event>.py ``variants``).

The region is registered without FOLL_WRITE (PINLAB_REG_READONLY), so the device may only
read it: no generation is written. The mapping starts with known contents (``fill``, the
cpu-write event's old contents: a MAP_PRIVATE file gets them in the file and is only
read-faulted). The flow:

1. the device reads the whole region (DMA_READ's CRC-32, step ``dma_read_before``);
2. the event's own read-only steps run: ``run_readonly(c)`` of guest/events/ev_<event>.py,
   which returns the bytes the process should see through its mapping afterwards (e.g.
   zeros where a truncate or hole punch took the pages, its own write after a fork);
3. what the process sees is recorded: the CRC-32 of its mapping (and, for a MAP_SHARED
   file, of the file read through the page cache);
4. the device reads the whole region again (``dma_read_after``).

The report holds the CRC-32s only (Key.CRC_OLD, CRC_MAP_BEFORE, DEVICE_CRC_BEFORE,
CRC_EXPECTED_AFTER, CRC_MAP_AFTER, CRC_FILE_AFTER, DEVICE_CRC_AFTER); the host compares
them (orchestrator/readonly.py). Standard library only (guest).
"""
import os

from pinlab.common.vocab import Key
from pinlab.guest.events.ev_cpu_write import device_read, new_contents, old_contents
from pinlab.guest.pinlab_ioctl import dma_crc32

__all__ = ["fill", "new_contents", "old_contents", "run", "with_zeros"]


def fill(size):
    """The mapping's contents before registration (pinlab_cell.Mapping ``fill``)."""
    return old_contents(size)


def with_zeros(data, first, count, page=4096):
    """``data`` with pages [first, first+count) zero-filled (what a truncated or punched
    range reads as)."""
    a, b = first * page, min(len(data), (first + count) * page)
    return data[:a] + bytes(b - a) + data[b:]


def run(c, ev):
    """The read-only flow around ``ev.run_readonly(c)`` on a prepared, read-only registered
    cell ``c`` (pinlab_cell.Cell). Raises what the event's steps raise."""
    m, rep, size = c.m, c.rep, c.m.size
    rep[Key.READONLY_FLOW] = True
    old = old_contents(size)
    rep[Key.CRC_OLD] = dma_crc32(old)
    rep[Key.CRC_MAP_BEFORE] = dma_crc32(m.mm[:size])
    rep[Key.DEVICE_CRC_BEFORE] = device_read(c, "dma_read_before")
    expected = ev.run_readonly(c)
    if expected is None:
        expected = old
    rep[Key.CRC_EXPECTED_AFTER] = dma_crc32(expected)
    rep[Key.CRC_MAP_AFTER] = dma_crc32(m.mm[:size])
    rep[Key.PFNS_AFTER_WRITE] = m.pfns()
    if m.shared and m.fd is not None:
        data = os.pread(m.fd, size, 0)
        rep[Key.CRC_FILE_AFTER] = dma_crc32(data + bytes(size - len(data)))
    rep[Key.DEVICE_CRC_AFTER] = device_read(c, "dma_read_after")
    rep[Key.QUERY_AFTER_EVENT] = c.dev.query(c.rid)
