"""Event ``fork``: the guest's steps.

fork; the parent writes (COW), the device writes generation 2, the child reports its view.
With the option ``readonly`` (run_readonly): fork, the parent writes new contents, the
child reports the CRC-32 of its view; the device reads before and after.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_fork.py.
"""

import os

from pinlab.common import jsonlines
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import fork_child, release_child, timed
from pinlab.guest.pinlab_ioctl import dma_crc32
from pinlab.guest.pinlab_mm import pagemap
from pinlab.guest.pinlab_readonly import new_contents

NAME = "fork"


def run(c):
    c.fork_and_look(dontfork=False)


def run_readonly(c):
    """The read-only flow (guest/pinlab_readonly.py): fork; the parent (the process that
    registered) writes new contents over every page of its mapping, the copy-on-write of
    the pages it shares with the child; the child then reports the CRC-32 of its own view
    (Key.CHILD: crc_child_after, pfns). Returns the parent's write: what it sees."""
    m, rep = c.m, c.rep

    def child(go_r, res_w):
        os.read(go_r, 1)
        os.write(res_w, jsonlines.encode({Key.CRC_CHILD_AFTER: dma_crc32(m.mm[:m.size]),
                                          Key.PFNS: pagemap(m.addr, m.npages)}))

    pid, go_w, res_r = fork_child(child)
    rep[Key.CHILD_PID] = pid
    new = new_contents(m.size)
    timed(rep, "cpu_write", m.mm.__setitem__, slice(0, m.size), new)
    rep[Key.PFNS_PARENT_AFTER_WRITE] = m.pfns()
    rep[Key.CHILD_STATUS], rep[Key.CHILD] = release_child(pid, go_w, res_r)
    return new
