"""Event ``numa-hint``.

NUMA balancing's hinting faults on registered pages, then a CPU write, then a device write
(docs/pinning-semantics.md rows 76-78; 80d47f5de5e3 is the bug this guards against:
a pinned page that took a hinting fault was copied away by the next write fault). The
pages start on the guest's CPU-less node 1 (orchestrator/guestenv.py ``NUMA_MB``), so
NUMA balancing wants them on node 0. anon is the COW mapping the skip in
change_prot_numa() is about; memfd is a shared mapping, which 6.1 and 6.12 still make
PROT_NONE when pinned. All four modes: odp has no page reference, so its pages are made
PROT_NONE and migrated, which the notifier must see.

Every cell needs the hinting evidence (:func:`need_hinting`) or it is INCONCLUSIVE.
No memfd cells on 6.1: its NUMA balancing never made the shared mapping PROT_NONE — in
two runs not one page of the unregistered memfd control moved within 12-30 s, in all
four modes (docs/pinning-semantics.md row 76), so the event does not happen there.
"""

from __future__ import annotations

from typing import Any

from pinlab.common.vocab import Key

from ..classify import Inconclusive, Judge, step
from . import Event

REMOTE_NODE = 1


def need_hinting(numa: Any) -> dict[str, Any]:
    """The facts that NUMA balancing ran on the cell's pages, from the guest's ``numa``
    record: every registered and control page on REMOTE_NODE before the event
    (move_pages), ``numa_pte_updates`` and ``numa_hint_faults`` grown while it was on
    (/proc/vmstat; mm/memory.c do_numa_page counts a hinting fault, mm/mprotect.c
    change_prot_numa the PTEs it made PROT_NONE), and at least one control page moved off
    the remote node (the counters are system-wide; the control shows that the scanner
    reached this kind of mapping in this process). Returns the facts (the counters, how many
    registered and control pages left the remote node). Raises Inconclusive when any of
    it is missing."""
    if not isinstance(numa, dict):
        raise Inconclusive("NUMA facts missing")
    before, cbefore = numa.get(Key.NODES_BEFORE), numa.get(Key.CONTROL_NODES_BEFORE)
    after, cafter = numa.get(Key.NODES_AFTER), numa.get(Key.CONTROL_NODES_AFTER)
    lists = (before, cbefore, after, cafter)
    if not all(isinstance(x, list) and x for x in lists):
        raise Inconclusive("page nodes missing")
    if any(n != REMOTE_NODE for n in (*before, *cbefore)):
        raise Inconclusive(f"the pages were not all on node {REMOTE_NODE} before the event")
    vm = numa.get(Key.VMSTAT_EVENT)
    if not isinstance(vm, dict):
        raise Inconclusive("NUMA vmstat delta missing")
    updates, faults = vm.get("numa_pte_updates", 0), vm.get("numa_hint_faults", 0)
    if not (isinstance(updates, int) and isinstance(faults, int)
            and updates > 0 and faults > 0):
        raise Inconclusive(f"no NUMA hinting (numa_pte_updates {updates}, "
                           f"numa_hint_faults {faults})")
    control_left = sum(1 for a in cafter if a != REMOTE_NODE)
    if not control_left:
        raise Inconclusive("NUMA balancing did not migrate any page of the unregistered "
                           f"control mapping (numa_hint_faults {faults} elsewhere)")
    return {"numa_pte_updates": updates, "numa_hint_faults": faults,
            "numa_pages_migrated": vm.get("numa_pages_migrated", 0),
            "pgmigrate_fail": vm.get("pgmigrate_fail", 0),
            "registered_left_node": sum(1 for a in after if a != REMOTE_NODE),
            "control_left_node": control_left,
            "polls": numa.get(Key.POLLS), "ms": numa.get(Key.MS)}


def classify(j: Judge) -> str:
    rep = j.rep
    j.f["numa"] = need_hinting(rep.get(Key.NUMA))
    j.f["cpu_write"] = step(rep, "cpu_write")
    if j.g2_errno():
        return j.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
    return j.outcome(j.views_g([Key.MAP_G2]))


EVENT = Event(
    "numa-hint",
    order=53,
    backings=("anon", "memfd"),
    classify=classify,
    not_on={"memfd": ("6.1",)},   # no hinting of shmem on 6.1 (row 76)
)
