"""Event ``writeback``: the guest's steps.

fsync while the device streams, then generation 2; the disk read O_DIRECT while
registered and after release.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_writeback.py.
"""
import os
import time

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import PAGE, timed

NAME = "writeback"


def run(c):
    m, rep, dev = c.m, c.rep, c.dev
    timed(rep, "fsync_1", os.fsync, m.fd)
    timed(rep, "stream_start", dev.stream_start, c.rid, 0, m.size, 100, PAGE, 200)
    for i in range(3):
        time.sleep(0.2)
        timed(rep, f"fsync_stream_{i}", os.fsync, m.fd)
    rep[Key.STREAM_CHUNKS] = timed(rep, "stream_stop", dev.stream_stop, c.rid)
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    timed(rep, "fsync_registered", os.fsync, m.fd)
    c.file_scan(Key.DISK_REGISTERED, direct=True)
    c.deregister()
    timed(rep, "fsync_released", os.fsync, m.fd)
    c.file_scan(Key.DISK_RELEASED, direct=True)
