"""Event ``cpu-write-fork``: the guest's steps.

A read-only registration by a child after fork: the mapping holds known contents
(``fill``; a MAP_PRIVATE file only read-faulted), the parent forks without registering
anything (``REGISTERS_ITSELF``), the child registers the range read-only and has the
device read it, the parent writes new contents over every page of its own mapping (the
copy-on-write of pages it shares with the child), the child has the device read again and
records its own view. The device serves the child's registration, so it should read what
the child sees, never the parent's write. Recorded: the CRC-32s of the old and new
contents, of the parent's mapping before and after its write, of the child's mapping
after it, of both device reads; the child's report under ``child``.
Host side: orchestrator/events/ev_cpu_write_fork.py.
"""

import os

from pinlab.common import jsonlines
from pinlab.common.vocab import Key
from pinlab.guest.events.ev_cpu_write import device_read, fill, new_contents, old_contents
from pinlab.guest.pinlab_cell import errname, fork_child, now_ms, release_child
from pinlab.guest.pinlab_ioctl import dma_crc32

NAME = "cpu-write-fork"
READONLY = True
REGISTERS_ITSELF = True

__all__ = ["NAME", "READONLY", "REGISTERS_ITSELF", "fill", "run"]


class _ChildCell:
    """What device_read() needs of a cell, in the child: its device, region and report."""

    def __init__(self, c, rid, rep):
        self.dev, self.rid, self.m, self.rep = c.dev, rid, c.m, rep


def _child(c, go_r, res_w, unmap=False):
    """In the child: register read-only, device read (``unmap``: then munmap the range in
    the child), tell the parent, wait for its write, device read again, record the child's
    view (if still mapped), deregister, report."""
    m = c.m
    out = {Key.STEPS: []}
    t0 = now_ms()
    try:
        rid = c.dev.register(m.addr, m.size, c.a.mode, readonly=True, fast=c.fast)
    except OSError as exc:
        out.update({Key.ERRNO: exc.errno, Key.ERRNO_NAME: errname(exc.errno),
                    Key.STEP: "register", Key.REGISTER_MS: round(now_ms() - t0, 1)})
        os.write(res_w, b"r")
        os.write(res_w, jsonlines.encode(out))
        return
    out[Key.REGION] = rid
    out[Key.REGISTER_MS] = round(now_ms() - t0, 1)
    out[Key.PFNS_REGISTERED] = m.pfns()
    out[Key.QUERY_REGISTERED] = c.dev.query(rid)
    cc = _ChildCell(c, rid, out)
    out[Key.DEVICE_CRC_BEFORE] = device_read(cc, "dma_read_before")
    out[Key.MAPPED] = not unmap
    if unmap:   # only the registration holds the child's pages now
        m.mm.close()
    os.write(res_w, b"r")              # registered and read: the parent may write
    os.read(go_r, 1)
    out[Key.DEVICE_CRC_AFTER] = device_read(cc, "dma_read_after")
    if not unmap:
        out[Key.CRC_CHILD_AFTER] = dma_crc32(m.mm[:m.size])
        out[Key.PFNS] = m.pfns()
    out[Key.QUERY_AFTER_EVENT] = c.dev.query(rid)
    c.dev.deregister(rid)
    os.write(res_w, jsonlines.encode(out))


def run(c, unmap=False):
    """The steps; ``unmap``: the child munmaps its range after its first device read
    (event cpu-write-fork-unmap)."""
    m, rep, size = c.m, c.rep, c.m.size
    old, new = old_contents(size), new_contents(size)
    rep[Key.CRC_OLD] = dma_crc32(old)
    rep[Key.CRC_NEW] = dma_crc32(new)
    rep[Key.CRC_MAP_BEFORE] = dma_crc32(m.mm[:size])
    pid, go_w, res_r = fork_child(lambda go_r, res_w: _child(c, go_r, res_w, unmap))
    rep[Key.CHILD_PID] = pid
    first = os.read(res_r, 1)          # the child registered and read (or failed)
    if first == b"r":
        t0 = now_ms()
        m.mm[:size] = new                # the parent's write: COW of the shared pages
        rep[Key.STEPS].append({Key.STEP: "cpu_write", Key.ERRNO: 0,
                               Key.MS: round(now_ms() - t0, 1)})
        rep[Key.PFNS_AFTER_WRITE] = m.pfns()
        rep[Key.CRC_MAP_AFTER] = dma_crc32(m.mm[:size])
    rep[Key.CHILD_STATUS], child = release_child(pid, go_w, res_r)
    rep[Key.CHILD] = child
    # the child's registration is the cell's: its region, PFNs, query and steps
    if child.get(Key.STEP) == "register":
        rep.update({k: child.get(k) for k in (Key.ERRNO, Key.ERRNO_NAME, Key.STEP,
                                                Key.REGISTER_MS)})
        return
    for k in (Key.REGION, Key.REGISTER_MS, Key.PFNS_REGISTERED, Key.QUERY_REGISTERED,
              Key.DEVICE_CRC_BEFORE, Key.DEVICE_CRC_AFTER, Key.CRC_CHILD_AFTER,
              Key.QUERY_AFTER_EVENT, Key.MAPPED):
        if k in child:
            rep[k] = child[k]
    rep[Key.STEPS].extend(s for s in child.get(Key.STEPS, []) if isinstance(s, dict))
