"""Event ``cpu-write-fork-unmap``: the guest's steps.

As ``cpu-write-fork`` (guest/events/ev_cpu_write_fork.py), but the child munmaps its range
right after its first device read, before the parent writes: the "vmsplice() + unmap in
child" case of the kernel's COW selftest (tools/testing/selftests/mm/cow.c) and of
CVE-2020-29374 (17839856fd58), with a device read instead of a pipe. The child's pages
are then held only by its registration; the parent's write must still not reach them.
Recorded as in cpu-write-fork; the child's report says ``mapped`` false and has no view of
its own. Host side: orchestrator/events/ev_cpu_write_fork_unmap.py.
"""

from pinlab.guest.events import ev_cpu_write_fork
from pinlab.guest.events.ev_cpu_write import fill

NAME = "cpu-write-fork-unmap"
READONLY = True
REGISTERS_ITSELF = True

__all__ = ["NAME", "READONLY", "REGISTERS_ITSELF", "fill", "run"]


def run(c):
    ev_cpu_write_fork.run(c, unmap=True)
