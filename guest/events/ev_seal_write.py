"""Event ``seal-write``: the guest's steps.

munmap, then F_SEAL_WRITE on the memfd.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_seal_write.py.
"""
import fcntl

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import timed
from pinlab.guest.pinlab_mm import F_ADD_SEALS, F_GET_SEALS, F_SEAL_WRITE

NAME = "seal-write"


def run(c):
    m, rep = c.m, c.rep
    # a writable shared mapping alone makes F_SEAL_WRITE fail (mapping_deny_writable);
    # unmap first so only the driver's page references can make it fail
    timed(rep, "munmap", m.unmap)
    timed(rep, "seal_write", fcntl.fcntl, m.fd, F_ADD_SEALS, F_SEAL_WRITE)
    rep[Key.SEALS] = fcntl.fcntl(m.fd, F_GET_SEALS)
    c.dma(2)
    c.file_scan(Key.FILE_G2)
