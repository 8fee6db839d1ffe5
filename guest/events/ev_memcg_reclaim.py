"""Event ``memcg-reclaim``: the guest's steps.

memory.reclaim of the cell's cgroup (pinlab_env.CGCELL).

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_memcg_reclaim.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import memcg_current, timed
from pinlab.guest.pinlab_env import CGCELL
from pinlab.guest.pinlab_mm import delta, vmstat, write_file

NAME = "memcg-reclaim"
#: backings whose mapping gets unregistered control pages that must reach swap
SWAP_CONTROL = ("anon", "private-file")
#: the report records the cell cgroup's memory.current before registration
MEMCG = True


def run(c):
    rep = c.rep
    rep[Key.MEMCG_REGISTERED] = memcg_current()
    v0 = vmstat()
    timed(rep, "memory_reclaim", write_file, f"{CGCELL}/memory.reclaim", "64M")
    rep[Key.VMSTAT_EVENT] = delta(v0, vmstat())
    rep[Key.MEMCG_AFTER_RECLAIM] = memcg_current()
    c.after_reclaim()
