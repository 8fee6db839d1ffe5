"""Event ``migrate``: the guest's steps.

Compaction and soft offline of the first pages of the registered mapping and of an
unregistered control mapping. With the option ``readonly`` (run_readonly) the same steps
run between the device's two reads.

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_migrate.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import PAGE, SOFT_OFFLINE_PAGES, Mapping, timed
from pinlab.guest.pinlab_mm import MADV_SOFT_OFFLINE, delta, madvise, vmstat, write_file

NAME = "migrate"
#: pages of the registered mapping (and of the control mapping)
NPAGES = 64


def run(c):
    migrate(c)
    c.dma(2)
    c.rep[Key.MAP_G2] = c.scan_map()


def run_readonly(c):
    """The read-only flow (guest/pinlab_readonly.py): the migration steps between the
    device's two reads; the process keeps seeing the old contents."""
    migrate(c)


def migrate(c):
    """Compaction, then soft offline of the first pages of a control mapping and of the
    registered one; records the PFNs before and after and how many pages moved."""
    rep = c.rep
    ctl = Mapping(c.stack, c.m.kind, rep, tag="control", npages=c.m.npages)
    rep[Key.CONTROL_PFNS_BEFORE] = ctl.pfns()
    pb = c.m.pfns()
    v0 = vmstat()
    timed(rep, "compact_memory", write_file, "/proc/sys/vm/compact_memory", "1")
    # compaction only reaches pages below where its scanners meet; soft offline
    # (migrate_pages(MR_MEMORY_FAILURE)) migrates exactly the pages it is given, so
    # the first pages of both mappings get a deterministic migration attempt
    for tag, mp in (("control", ctl), ("registered", c.m)):
        for i in range(SOFT_OFFLINE_PAGES):
            timed(rep, f"soft_offline_{tag}_{i}", madvise, mp.addr + i * PAGE, PAGE,
                  MADV_SOFT_OFFLINE)
    rep[Key.VMSTAT_EVENT] = delta(v0, vmstat())
    pa = c.m.pfns()
    ca = ctl.pfns()
    rep[Key.PFNS_AFTER_EVENT] = pa
    rep[Key.CONTROL_PFNS_AFTER] = ca
    rep[Key.PINNED_MOVED] = sum(1 for x, y in zip(pb, pa, strict=True) if x != y)
    rep[Key.CONTROL_MOVED] = sum(1 for x, y in zip(rep[Key.CONTROL_PFNS_BEFORE], ca,
                                                 strict=True) if x != y)
