"""Event ``numa-hint``: the guest's steps.

NUMA balancing's hinting faults on registered pages, then a CPU write, then a device
write (docs/pinning-semantics.md rows 76-78). The guest has a second, CPU-less NUMA node
(orchestrator/guestenv.py ``NUMA_MB``) and boots with NUMA balancing off. Before the
mapping is made the cell binds its memory policy to node 1, so the registered pages and
an unregistered control mapping of the same backing are faulted in there, away from the
CPUs. After registration the policy is reset and NUMA balancing turned on with the scan
delay and period at their floor (``kernel.numa_balancing`` and the debugfs
``sched/numa_balancing`` tunables, Documentation/admin-guide/sysctl/kernel.rst): the
scanner makes the PTEs PROT_NONE (``numa_pte_updates``), the cell reads every page until
hinting faults were taken (``numa_hint_faults``) and the control pages were migrated to
node 0, or a deadline. Then NUMA balancing is turned off again, the process writes a word
into every registered page (the write fault that would copy a page away from its pin),
the device writes generation 2 and the mapping is scanned.

Recorded under ``numa``: the vmstat delta of the NUMA counters, each page's node before
and after (move_pages(2) with nodes=NULL), the control mapping's nodes, the polls and
the time it took. Host side: orchestrator/events/ev_numa_hint.py.
"""
import contextlib
import time

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import PAGE, Mapping, now_ms
from pinlab.guest.pinlab_mm import (
    MPOL_BIND,
    MPOL_DEFAULT,
    NUMA_KEYS,
    delta,
    page_nodes,
    read_file,
    set_mempolicy,
    vmstat,
    write_file,
)

NAME = "numa-hint"
#: the remote node the pages start on (the guest's CPU-less node)
REMOTE_NODE = 1
#: seconds the cell waits for hinting faults and the control's migration
DEADLINE_S = 12.0
SYSCTL = "/proc/sys/kernel/numa_balancing"
TUNABLES = "/sys/kernel/debug/sched/numa_balancing"
#: the scanner's tunables while the cell runs (ms, MiB): no delay, the shortest period
FAST_SCAN = {"scan_delay_ms": "0", "scan_period_min_ms": "10", "scan_period_max_ms": "100",
             "scan_size_mb": "256"}
CPU_WORD = b"cpuwrite"


def _set(stack, path, value):
    """Write ``value`` to ``path``, putting the old value back when the cell ends."""
    old = read_file(path).strip()
    write_file(path, value)
    stack.callback(_restore, path, old)


def _restore(path, old):
    with contextlib.suppress(OSError):
        write_file(path, old)


def before_mapping(c):
    """Bind the cell's memory to the remote node and make the control mapping there;
    the registered mapping is made next, under the same policy."""
    set_mempolicy(MPOL_BIND, (REMOTE_NODE,))
    c.stack.callback(set_mempolicy, MPOL_DEFAULT)
    c.numa_control = Mapping(c.stack, c.a.backing, c.rep, tag="control")


def _touch(mp):
    s = 0
    for off in range(0, mp.size, PAGE):
        s += mp.mm[off]
    return s


def run(c):
    m, rep = c.m, c.rep
    ctl = c.numa_control
    set_mempolicy(MPOL_DEFAULT)
    numa = rep[Key.NUMA] = {}
    numa[Key.NODES_BEFORE] = page_nodes(m.addr, m.npages)
    numa[Key.CONTROL_NODES_BEFORE] = page_nodes(ctl.addr, ctl.npages)
    for name, value in FAST_SCAN.items():
        _set(c.stack, f"{TUNABLES}/{name}", value)
    v0 = vmstat(NUMA_KEYS)
    t0 = now_ms()
    _set(c.stack, SYSCTL, "1")
    polls = 0
    deadline = time.monotonic() + DEADLINE_S
    while True:
        _touch(ctl)
        _touch(m)
        polls += 1
        d = delta(v0, vmstat(NUMA_KEYS))
        cn = page_nodes(ctl.addr, ctl.npages)
        if (d.get("numa_hint_faults", 0) > 0 and all(n == 0 for n in cn)) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    write_file(SYSCTL, "0")
    numa[Key.VMSTAT_EVENT] = delta(v0, vmstat(NUMA_KEYS))
    numa[Key.POLLS] = polls
    numa[Key.MS] = round(now_ms() - t0, 1)
    numa[Key.NODES_AFTER] = page_nodes(m.addr, m.npages)
    numa[Key.CONTROL_NODES_AFTER] = page_nodes(ctl.addr, ctl.npages)
    rep[Key.PFNS_AFTER_EVENT] = m.pfns()
    t1 = now_ms()
    for off in range(0, m.size, PAGE):       # the CPU write: a write fault on every page
        m.mm[off + 64:off + 64 + len(CPU_WORD)] = CPU_WORD
    rep[Key.STEPS].append({Key.STEP: "cpu_write", Key.ERRNO: 0,
                           Key.MS: round(now_ms() - t1, 1)})
    rep[Key.PFNS_AFTER_TOUCH] = m.pfns()
    numa[Key.NODES_AFTER_WRITE] = page_nodes(m.addr, m.npages)
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
