"""Turning one cell's raw observations into an outcome class, on positive evidence only.

Inputs, all gathered by ``scenario.py`` after the cell ran:

* the guest workload's report (``guest/pinlab_cell.py``): step errnos, page scans
  of the mapping, the file and the disk (which device generation each page holds), PFNs,
  vmstat pin counters;
* the kernel log lines the cell added, classified (``dmesg.py``);
* facts from the device's audit log (:func:`audit_facts`), the oracle of what the device
  really did: which pages it wrote with which generation, which invalidations it
  acknowledged, and when, relative to its other accesses.

Every outcome class has a definition of the evidence it needs (the header of
``data/expectations.toml`` states it beside the class, and :data:`EVIDENCE` names the
facts). A class is returned only when its evidence is present and says what the
definition requires. Evidence that is missing, truncated or contradictory gives
``INCONCLUSIVE(<what>)`` instead, a class no expectation may name and which the matrix
reports as an error: a step that silently fails on some kernel must show up, never pass
as the expected class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pinlab.common.vocab import (
    CPU_WRITE_OPTION,
    DAX_BACKINGS,
    FILE_BACKINGS,
    FOLL_PIN_MODES,
    PINNED_MODES,
    THP_BACKINGS,
    Key,
    Outcome,
)

from . import events
from .dmesg import DmesgReport
from .expectations import Cell

PAGE = 4096
# where a truncate / hole punch of a DAX file waits for the pages' references: 6.1 and 6.12
# ext4_break_layouts / xfs_break_dax_layouts around dax_layout_busy_page, 6.15+
# dax_break_layout (fs/dax.c; Documentation/filesystems/dax.rst)
LAYOUT_WAIT = re.compile(r"ext4_break_layouts|xfs_break_(?:dax_)?layouts|dax_break_layout"
                         r"|dax_layout_busy_page|(?:ext4|xfs)_wait_dax_page|wait_page_idle")
F_SEAL_WRITE = 0x0008
# a fence missed by the device is logged by pinlab_odp.c / pinlab_queue.c
ESCALATION_LINES = ("INVALIDATE fence missed", "resetting device")
# a WARN the ext4 dirty-folio path raises for a page dirtied without ->page_mkwrite
# (fs/ext4/inode.c ext4_dirty_folio, WARN_ON_ONCE(!folio_buffers(folio)); 6.x and 7.x formats)
EXT4_WARN = re.compile(r"fs/ext4/\S+ (?:at )?ext4_\w+")
#: audit_facts keeps at most this many generation-2 PFNs (a cell registers at most 64 pages
#: of 4 KiB; hugetlb cells 1024, whose gen-2 PFNs nobody needs)
GEN2_PFNS_MAX = 256
#: classes of the cpu-write-after option in which the process sees the device's write
#: (gen 2 must have gone to pages the process maps) and in which it does not (gen 2 went
#: to pages it no longer maps: the write fault copied them away)
CPU_WRITE_SEEN = ("COHERENT", "REVOKED_IN_TIME", "MIGRATION_FAILS", "OFFLINE_SUCCEEDS",
                  "OFFLINE_BLOCKED", "CHILD_SEES_WRITES")
CPU_WRITE_LOST = ("WRITES_LOST_SILENTLY", "PARENT_LOSES_WRITES")
SEVERE_CLASSES = ("BUG", "OOPS", "PANIC", "BAD_PAGE", "HUNG_TASK", "SOFT_LOCKUP", "RCU_STALL")

#: What each class needs, in the words of the expectations header (kept in sync by a unit
#: test). The classifier enforces each item; the property test removes or corrupts each.
EVIDENCE: dict[str, tuple[str, ...]] = {
    Outcome.PIN_REFUSED: ("register step errno",),
    Outcome.KERNEL_ERROR: ("dmesg lines of the error",),
    Outcome.PINS_LEAKED: ("vmstat pin counters before and at the end", "audit"),
    Outcome.DMA_AFTER_REVOKE: ("audit violation records",),
    Outcome.DMA_OUTSIDE_REGISTRATION: ("audit writes", "registered PFNs"),
    Outcome.COHERENT: ("audit: the later generation written to every registered page",
                 "the DMA step's errno 0", "every view scanned showing that generation",
                 "anon reclaim: a control page swapped, pswpout, control pages intact"),
    Outcome.REVOKED_IN_TIME: ("audit: an invalidate acknowledged after the event's step",
                        "no violation", "the outcome's views",
                        "anon reclaim: a control page swapped, pswpout, control pages "
                        "intact"),
    Outcome.WRITES_LOST_SILENTLY: ("audit: the later generation written to the registered pages",
                             "the DMA step's errno 0",
                             "a view showing something else on at least one page"),
    Outcome.WRITEBACK_STALE: ("audit: generation 2 written", "disk scan while registered (stale)",
                        "disk scan after release (generation 2)"),
    Outcome.EXT4_WARN_DATA_LOST: ("ext4 WARN or buffer-warning lines",
                            "audit: the later generation written",
                            "file scan after drop_caches without it"),
    Outcome.DIRTY_FOLIO_REJECTED: ("btrfs 'marked dirty without notifying the fs' lines or an "
                             "fsync EUCLEAN/EIO",
                             "an fsync, sync or file read step's error",
                             "audit: the later generation written"),
    Outcome.CSUM_FAILED: ("btrfs 'csum failed' lines",),
    Outcome.MIGRATION_FAILS: ("control pages moved", "registered pages not moved",
                        "audit: generation 2 written", "mapping scan"),
    Outcome.PARENT_LOSES_WRITES: ("child report", "child status 0", "parent and child scans",
                            "audit: generation 2 written"),
    Outcome.CHILD_SEES_WRITES: ("child report", "child status 0", "parent and child scans",
                          "audit: generation 2 written"),
    Outcome.SEAL_REFUSED: ("seal step errno",),
    Outcome.SEAL_APPLIED: ("seal step errno 0", "F_GET_SEALS showing F_SEAL_WRITE"),
    Outcome.ESCALATED_RESET: ("escalation lines in dmesg", "audit reset record",
                        "region failed or DMA refused"),
    Outcome.DEVICE_GONE_CLEAN: ("the workload saw the device go", "audit: reset or destroy",
                          "no violation", "pins back (pin, longterm)"),
    Outcome.DEVICE_NOT_REMOVED: ("the workload's removal wait",),
    Outcome.DMA_FAILED: ("the DMA step's errno",),
    Outcome.DEVICE_READS_STALE: ("both device reads' errno 0 and CRC-32",
                                 "audit: the device read every registered page",
                                 "the device's read before the write equal to the old contents",
                                 "the device's read after the write equal to the old contents",
                                 "the mapping after the write holding the new contents"),
    Outcome.RELEASED_AT_EXIT: ("victim status", "audit: the victim region destroyed",
                         "pins back (pin, longterm)"),
    Outcome.REGION_NOT_RELEASED: ("victim status", "victim audit without destroy"),
    Outcome.OFFLINE_BLOCKED: ("offline results", "audit: generation 2 written", "mapping scan"),
    Outcome.OFFLINE_SUCCEEDS: ("offline results", "audit: generation 2 written", "mapping scan"),
    Outcome.TRUNCATE_BLOCKED: ("DAX evidence", "the truncate or hole punch step waiting in a "
                               "layout-break function (wchan or kernel stack)",
                               "the step returning only after the driver's release (the "
                               "wait in ms), or still blocked at the watch deadline and then "
                               "killed", "audit: generation 1 written",
                               "audit: the region destroyed"),
    Outcome.QEMU_CRASHED: ("QEMU exited during the cell",
                           "hot-unplug-loop: its SIGABRT exit status or glibc's "
                           "'Assertion ... failed' line in qemu.log"),
    Outcome.DEVICE_NOT_REPLUGGED: ("hot-unplug-loop: the cycle's removal clean",
                                   "no PCI function bound to pinlab, or no /dev/pinlab0, "
                                   "within the replug deadline after QMP device_add"),
}
#: not a class: what every cell of a THP backing (anon-thp, memfd-thp, anon-mthp) needs
#: besides its class's evidence (Judge.need_thp); madv-collapse registers small pages on
#: purpose and needs THP_SMALL_EVIDENCE instead
THP_EVIDENCE = ("every registered PFN's kpageflags with KPF_THP",
                "one compound head, at the first registered page, the others tails",
                "contiguous PFNs, the first aligned to the folio size",
                "the folio size equal to the registered pages",
                "anon-thp, memfd-thp: smaps AnonHugePages / ShmemPmdMapped of at least 2 MiB")
THP_SMALL_EVIDENCE = ("every registered PFN present in kpageflags, none with KPF_THP",)
#: the smaps field that shows a PMD-mapped THP of each backing (anon-mthp: none, its
#: folios are PTE-mapped)
PMD_MAPPED = {"anon-thp": "AnonHugePages", "memfd-thp": "ShmemPmdMapped"}
HPAGE = 2 << 20
#: not a class: what every cell with the ``cpu-write-after`` option needs besides its
#: class's evidence (Judge.cpu_write_after, Judge.cpu_write_verdict)
CPU_WRITE_EVIDENCE = ("the cpu_write_after step's errno 0",
                      "the mapping after the CPU write holding the CPU pattern on every page",
                      "PFNs before and after the CPU write",
                      "audit: the PFNs generation 2 went to (all mapped after the CPU "
                      "write for a class that sees it; some not, and a page showing the "
                      "CPU write, for lost writes)")
#: the workload's step of the cpu-write-after option (guest/pinlab_cell.py)
CPU_WRITE_STEP = "cpu_write_after"
#: not a class: what every cell of a DAX backing needs besides its class's evidence
DAX_EVIDENCE = ("STATX_ATTR_DAX on the file", "the mount's dax option",
                "every page of the mapping at a PFN inside a pmem range (/proc/iomem)")


class Inconclusive(Exception):
    """Evidence a class needs is missing, truncated or contradictory."""


def base_class(observed: str) -> str:
    """``PIN_REFUSED(EFAULT)`` -> ``PIN_REFUSED``."""
    return observed.split("(", 1)[0]


# --------------------------------------------------------------------- report helpers
def states(scan: Any) -> list[str]:
    """Expand a run-length page scan ``[[state, first, count], ...]`` to one state per page.

    Raises :class:`Inconclusive` when ``scan`` is not such a list (missing, wrong type)."""
    if not isinstance(scan, list):
        raise Inconclusive("page scan missing")
    out: list[str] = []
    for run in scan:
        if (not isinstance(run, list) or len(run) != 3 or not isinstance(run[0], str)
                or not isinstance(run[2], int) or run[2] < 0):
            raise Inconclusive("page scan malformed")
        out += [run[0]] * run[2]
    return out


def all_gen(scan: Any, gen: int, first: int = 0, count: int | None = None) -> bool:
    """True if every page of ``scan[first:first+count]`` holds generation ``gen``.

    Raises :class:`Inconclusive` for a missing or empty scan (nothing seen proves
    nothing)."""
    sts = states(scan)[first:None if count is None else first + count]
    if not sts:
        raise Inconclusive("page scan empty")
    return all(s == f"g{gen}" for s in sts)


def view(rep: dict[str, Any], key: str) -> list[Any]:
    """A page scan the class needs; :class:`Inconclusive` names it when it is missing."""
    scan = rep.get(key)
    try:
        states(scan)
    except Inconclusive as exc:
        raise Inconclusive(f"{key}: {exc}") from None
    if not scan:
        raise Inconclusive(f"{key}: page scan empty")
    return list(scan)


def step(rep: dict[str, Any], name: str) -> dict[str, Any]:
    """The last record of workload step ``name`` ({} when it never ran)."""
    steps = rep.get(Key.STEPS)
    for st in reversed(steps if isinstance(steps, list) else []):
        if isinstance(st, dict) and st.get(Key.STEP) == name:
            return dict(st)
    return {}


def step_errno(rep: dict[str, Any], name: str) -> int:
    """The errno a step recorded; :class:`Inconclusive` when the step or its errno is
    missing."""
    st = step(rep, name)
    if not st:
        raise Inconclusive(f"step {name} missing")
    e = st.get(Key.ERRNO)
    if not isinstance(e, int) or isinstance(e, bool):
        raise Inconclusive(f"step {name} has no errno")
    return e


def _pfn_set(*lists: Any) -> set[int]:
    out: set[int] = set()
    for lst in lists:
        for p in lst if isinstance(lst, list) else []:
            if isinstance(p, int) and not isinstance(p, bool):
                out.add(p)
    return out


def changed(a: Any, b: Any) -> int | None:
    if not isinstance(a, list) or not isinstance(b, list) or not a or not b:
        return None
    return sum(1 for x, y in zip(a, b, strict=False) if x != y)


def summarize_pagemap(pm: Any) -> dict[str, int] | None:
    """Counts of present, swapped and absent pages in a pagemap list (None if missing)."""
    if not isinstance(pm, list):
        return None
    out = {"present": 0, "swap": 0, "absent": 0}
    for p in pm:
        out["present" if isinstance(p, int) else "swap" if p == "swap" else "absent"] += 1
    return out


def outstanding(vm: Any) -> int | None:
    """Outstanding FOLL_PIN pins in a vmstat dict (None if the counters are missing)."""
    if not isinstance(vm, dict):
        return None
    a, r = vm.get("nr_foll_pin_acquired"), vm.get("nr_foll_pin_released")
    if not isinstance(a, int) or not isinstance(r, int):
        return None
    return a - r


# --------------------------------------------------------------------- audit facts
def audit_facts(rep: dict[str, Any], records: Sequence[dict[str, Any]],
                violations: Sequence[dict[str, Any]], since: int, limit: int,
                region: Any = None) -> dict[str, Any]:
    """What the device did to one region since the mark, from its audit records.

    ``records``: every audit record with seq > ``since`` (the query asked for at most
    ``limit``); ``violations``: the device's violation records since the mark;
    ``region``: the region id (default the report's ``Key.REGION``). The extract is ``complete``
    only when its seqs run without a gap from ``since + 1`` and the limit was not reached
    (the device keeps a bounded ring, and a truncated extract cannot prove an absence).

    Returns counts per record kind, ``gen_pages`` (generation, as a string like every JSON
    key -> distinct guest pages written with it), ``outside_registration`` (written pages
    that were not registered: for odp any page the process mapped counts as registered),
    ``event_acks`` (invalidate acknowledgements after the region's last generation-1 write
    and before its first generation-2 write, i.e. caused by the event between them),
    ``ack_before_destroy``, ``violations``, ``resets`` and ``gen2_pfns`` (the guest pages
    written with generation 2, sorted, at most GEN2_PFNS_MAX: where the device's write
    after the event went, for the ``cpu-write-after`` option).
    """
    rid = rep.get(Key.REGION) if region is None else region
    seqs = [r.get("seq") for r in records]
    complete = (len(records) < limit
                and all(isinstance(s, int) for s in seqs)
                and seqs == list(range(since + 1, since + 1 + len(seqs)))
                and not any(r.get("kind") == "truncated" for r in records))
    facts: dict[str, Any] = {"records": len(records), "complete": complete,
                             "truncated": len(records) >= limit,
                             "resets": sum(1 for r in records if r.get("kind") == "reset")}
    if not isinstance(rid, int) or isinstance(rid, bool):
        facts["region_found"] = False
        return facts
    recs = [r for r in records if r.get("region") == rid]
    inst = None
    for r in recs:
        if r.get("kind") == "create":
            inst = r.get("inst")   # the last instance of this id is the cell's region
    facts["region_found"] = inst is not None
    facts["inst"] = inst
    if inst is not None:
        recs = [r for r in recs if r.get("inst") in (inst, None)]
    kinds: dict[str, int] = {}
    pages_by_gen: dict[int, set[int]] = {}
    read: set[int] = set()
    last_g1 = first_g2 = destroy = None
    acks: list[int] = []
    for r in recs:
        k = str(r.get("kind"))
        kinds[k] = kinds.get(k, 0) + 1
        seq = int(r.get("seq", 0))
        if k == "access" and r.get("dir") == "r" and isinstance(r.get("gpa"), int):
            read.add(int(r["gpa"]) // PAGE)
        if k == "access" and r.get("dir") == "w":
            g = int(r.get("gen", 0))
            pages_by_gen.setdefault(g, set()).add(int(r["gpa"]) // PAGE)
            if g == 1:
                last_g1 = seq
            elif g == 2 and first_g2 is None:
                first_g2 = seq
        elif k == "invalidate_ack":
            acks.append(seq)
        elif k == "destroy" and destroy is None:
            destroy = seq
    end = first_g2 if first_g2 is not None else destroy
    event_acks = sum(1 for a in acks if (last_g1 is None or a > last_g1)
                     and (end is None or a < end))
    # the pages the driver registered: FOLL_LONGTERM may have migrated them first (out of
    # ZONE_MOVABLE), so the PFNs after registration are the truth where the workload has them
    registered = _pfn_set(rep.get(Key.PFNS_REGISTERED) or rep.get(Key.PFNS_BEFORE))
    if rep.get(Key.MODE) == "odp":   # odp re-faults: any page the process mapped is legal
        registered |= _pfn_set(rep.get(Key.PFNS_AFTER), rep.get(Key.PFNS_AFTER_TOUCH),
                               rep.get(Key.PFNS_AFTER_EVENT), rep.get(Key.PAGEMAP_AFTER_EVENT),
                               rep.get(Key.PFNS_PARENT_AFTER_WRITE),
                               rep.get(Key.PFNS_AFTER_WRITE),
                               rep.get(Key.PFNS_AFTER_CPU_WRITE))
    written = set().union(*pages_by_gen.values()) if pages_by_gen else set()
    outside = sorted(written - registered)
    viol = [v for v in violations if inst is None or v.get("inst") == inst]
    viol += [r for r in recs if r.get("kind") == "violation" and r not in viol]
    facts.update(kinds=kinds, registered_known=bool(registered),
                 gen_pages={str(g): len(p) for g, p in sorted(pages_by_gen.items())},
                 pages_written=len(written), outside_registration=len(outside),
                 outside_pfns=outside[:16], event_acks=event_acks,
                 ack_before_destroy=any(destroy is None or a < destroy for a in acks),
                 violations=len(viol), violation_samples=viol[:5],
                 read_pages=len(read), read_registered=len(read & registered),
                 gen2_pfns=sorted(pages_by_gen.get(2, set()))[:GEN2_PFNS_MAX])
    return facts


# --------------------------------------------------------------------- the classifier
class Judge:
    """One classification: the cell (``cell``), its inputs (``rep`` the workload report,
    ``dm`` the kernel log, ``audit`` the audit facts) and the facts that decided it
    (``f``, recorded in the verdict). The shared checks (:meth:`shared`: kernel errors,
    pins leaked, audit violations and DMA outside the registration, the audit's
    completeness; btrfs's and ext4's own data-loss verdicts) run for every event, and every
    cell of an fsdax backing must prove DAX first (:meth:`need_dax`), every cell with the
    ``cpu-write-after`` option must show its CPU write (:meth:`cpu_write_after`) and have
    its class checked against where generation 2 went (:meth:`cpu_write_verdict`); each
    event's classifier (``orchestrator/events/ev_<event>.py``) then judges its views with
    the helpers here."""

    def __init__(self, cell: Cell, rep: dict[str, Any], dm: DmesgReport,
                 audit: dict[str, Any]) -> None:
        self.cell, self.rep, self.dm, self.audit = cell, rep, dm, audit
        self.f: dict[str, Any] = {}

    # -- evidence checks (each raises Inconclusive naming what is missing) --
    def need_audit(self, a: dict[str, Any] | None = None, who: str = "region") -> dict[str, Any]:
        a = self.audit if a is None else a
        if not isinstance(a, dict) or "unavailable" in a:
            why = a.get("unavailable") if isinstance(a, dict) else None
            raise Inconclusive(f"audit unavailable{': ' + str(why)[:80] if why else ''}")
        if a.get("complete") is not True:
            raise Inconclusive("audit extract truncated or incomplete")
        if a.get("region_found") is not True:
            raise Inconclusive(f"audit has no create record for the {who}")
        for key in ("kinds", "gen_pages", "violations", "outside_registration",
                    "event_acks"):
            if key not in a:
                raise Inconclusive(f"audit fact {key} missing")
        return a

    def npages(self) -> int:
        n = self.rep.get(Key.NPAGES)
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise Inconclusive("npages missing")
        return n

    def wrote(self, gen: int, pages: int | None = None) -> None:
        """The device wrote generation ``gen``: its DMA step succeeded and the audit shows
        that generation in ``pages`` (default: every) registered pages."""
        e = step_errno(self.rep, f"dma_write_g{gen}")
        if e != 0:
            raise Inconclusive(f"dma_write_g{gen} failed ({e}) where the class needs it")
        self.wrote_pages(gen, self.npages() if pages is None else pages)

    def acked(self) -> bool:
        n = self.audit.get("event_acks")
        if not isinstance(n, int) or isinstance(n, bool):
            raise Inconclusive("audit fact event_acks missing")
        self.f["event_acks"] = n
        return n > 0

    def outcome(self, good: bool, gen: int = 2, pages: int | None = None) -> str:
        """COHERENT / REVOKED_IN_TIME / WRITES_LOST_SILENTLY once the views were judged:
        ``good`` is whether every view shows generation ``gen``."""
        self.wrote(gen, pages)
        if not good:
            return Outcome.WRITES_LOST_SILENTLY
        if self.cell.mode == "odp" and self.acked():
            return Outcome.REVOKED_IN_TIME
        return Outcome.COHERENT

    def revoked_failure(self, errname: Any) -> str:
        """The DMA step failed: for odp that is the revoke working (the device found no
        page where the process has none) when the event's invalidate was acknowledged;
        otherwise the failure itself is the outcome."""
        if self.cell.mode == "odp" and self.acked():
            return Outcome.REVOKED_IN_TIME
        return f"DMA_FAILED({errname or '?'})"

    def views_g(self, keys: Sequence[str], gen: int = 2) -> bool:
        ok = True
        for k in keys:
            self.f[k] = view(self.rep, k)
            ok = all_gen(self.f[k], gen) and ok
        return ok

    def file_views(self, *keys: str) -> list[str]:
        """The mapping views plus the final file read-back for file backings."""
        out = list(keys)
        if self.cell.backing in FILE_BACKINGS:
            out.append(Key.FILE_AFTER)
        return out

    # -- shared checks --
    def shared(self) -> str | None:
        dm = self.dm
        sev = dm.severe()
        if any(k in sev for k in SEVERE_CLASSES):
            self.f["severe"] = {k: v[:5] for k, v in sev.items()}
            return Outcome.KERNEL_ERROR
        if dm.lines.get("PAGE_POISON"):
            self.f["page_poison"] = dm.lines["PAGE_POISON"][:5]
            return Outcome.KERNEL_ERROR
        warns = sev.get("WARN", [])
        other = [w for w in warns if not self.ext4_path_warn(w)]
        if other:
            self.f["warn"] = other[:5]
            return Outcome.KERNEL_ERROR
        self.need_audit()
        if self.pins_leaked():
            return Outcome.PINS_LEAKED
        if self.audit["violations"]:
            self.f["violations"] = self.audit.get("violation_samples")
            return Outcome.DMA_AFTER_REVOKE
        if self.audit["outside_registration"]:
            if not self.audit.get("registered_known"):
                raise Inconclusive("registered PFNs missing")
            self.f["outside_pfns"] = self.audit.get("outside_pfns")
            return Outcome.DMA_OUTSIDE_REGISTRATION
        if not self.audit.get("registered_known"):
            raise Inconclusive("registered PFNs missing")
        return None

    def pins_leaked(self) -> bool:
        """pin/longterm: outstanding FOLL_PINs (vmstat) differ at the end of the cell from
        before it. Raises Inconclusive when the counters are missing; False for gup and odp
        (FOLL_GET and notifiers are not counted there)."""
        if self.cell.mode not in FOLL_PIN_MODES:
            return False
        b = outstanding(self.rep.get(Key.VMSTAT_BEFORE))
        e = outstanding(self.rep.get(Key.VMSTAT_END))
        if b is None or e is None:
            raise Inconclusive("vmstat pin counters missing")
        self.f["pins"] = {"before": b, "after": e}
        return e != b

    def ext4_path_warn(self, line: str) -> bool:
        """A WARN of the ext4 dirty path, in a cell whose mapping is an ext4 file."""
        return self.cell.backing in ("ext4", "private-file") and bool(EXT4_WARN.search(line))

    def ext4_lost(self, last: int) -> str | None:
        """EXT4_WARN_DATA_LOST when ext4 warned and the device's last generation is not
        in the file after drop_caches (the 2018 bug, by whatever path reached it)."""
        lines = self.dm.lines.get("EXT4_NO_BUFFERS", [])
        warns = [w for w in self.dm.severe().get("WARN", []) if self.ext4_path_warn(w)]
        if not lines and not warns:
            return None
        self.f.update(ext4_no_buffers=lines[:4], warn=warns[:2])
        if self.views_g([Key.FILE_AFTER], last):
            return None   # warned, data intact: judged by the event below
        self.wrote(last)
        return Outcome.EXT4_WARN_DATA_LOST

    def btrfs_writeback(self, last: int) -> str | None:
        """btrfs's own verdict on the device's writes, when it gave one in the kernel log:
        CSUM_FAILED when a read found a block whose checksum does not match; else
        DIRTY_FOLIO_REJECTED when writeback rejected a folio dirtied without
        ->page_mkwrite (the driver's set_page_dirty_lock at unpin; 7ca3e84980ef, -EUCLEAN)
        and a later fsync or sync of the file reported the error, after the device wrote
        generation ``last``. Whether the page cache still holds that generation after
        drop_caches (the rejected folio may stay cached, dirty) is recorded, not judged:
        the disk does not have it either way. None when btrfs logged neither."""
        csum = self.dm.lines.get("BTRFS_CSUM", [])
        if csum:
            self.f["btrfs_csum"] = csum[:4]
            return Outcome.CSUM_FAILED
        oob = self.dm.lines.get("BTRFS_OOB_DIRTY", [])
        errs = {st[Key.STEP]: st.get(Key.ERRNO_NAME) or st.get(Key.ERRNO)
                for st in self.rep.get(Key.STEPS, []) if isinstance(st, dict)
                and str(st.get(Key.STEP, "")).startswith(("fsync", "sync")) and st.get(Key.ERRNO)}
        errs.update({k: v.get("errno_name") for k, v in self.rep.items()
                     if k.endswith("_error") and isinstance(v, dict)})
        # the writeback error reaches fsync as -EUCLEAN (errseq) or -EIO (AS_EIO,
        # mapping_set_error); the log lines are rate-limited, so a cell seconds after
        # another rejecting cell may have the error without them
        wb = {k: v for k, v in errs.items() if v in ("EUCLEAN", "EIO")}
        if not oob and not wb:
            return None
        self.f["btrfs_oob_dirty"] = oob[:4]
        self.f["writeback_errors"] = errs
        if not errs:
            raise Inconclusive("btrfs rejected folios but no fsync or read reported an error")
        with_gen = self.rep.get(Key.FILE_AFTER)
        if isinstance(with_gen, list) and with_gen:
            self.f["file_after"] = with_gen
        self.wrote(last)
        return Outcome.DIRTY_FOLIO_REJECTED

    # -- large folios (anon-thp, memfd-thp, anon-mthp) --
    def need_thp(self) -> None:
        """The registered range of a THP-backing cell is what the cell claims
        (THP_EVIDENCE): one large folio, from the kpageflags of its registered PFNs and the
        VMA's smaps (guest/pinlab_thp.py evidence, Documentation/admin-guide/mm/pagemap.rst,
        Documentation/admin-guide/mm/transhuge.rst); for an event with
        :attr:`~pinlab.orchestrator.events.Event.thp_small` (madv-collapse) small pages
        instead (THP_SMALL_EVIDENCE). Run for every such cell before its
        class. Records ``thp`` in the facts; raises :class:`Inconclusive` naming what is
        missing (a kernel that gave no huge page never passes as the expected class)."""
        ev = events.event(self.cell.event)
        small = bool(ev is not None and ev.thp_small)
        d = self.rep.get(Key.THP)
        if not isinstance(d, dict):
            raise Inconclusive("no THP proof")
        n = self.npages()
        why = (thp_small_missing(d, n) if small
               else thp_folio_missing(d, n, PMD_MAPPED.get(self.cell.backing)))
        self.f["thp"] = {"kpageflags": d.get(Key.KPAGEFLAGS), "smaps": d.get(Key.SMAPS),
                         "folio_pages": d.get(Key.FOLIO_PAGES), "small": small}
        if why:
            raise Inconclusive(f"THP not proven: {why}")

    # -- fsdax (ext4-dax, xfs-dax) --
    def need_dax(self) -> None:
        """The cell's file was accessed through DAX (DAX_EVIDENCE): STATX_ATTR_DAX set,
        the mount's dax option, and every page of the mapping at a PFN inside a
        "Persistent Memory" range of /proc/iomem (the pages are the pmem itself, no page
        cache; Documentation/filesystems/dax.rst). Run for every cell of a DAX backing.
        Raises :class:`Inconclusive` naming what is missing."""
        d = self.rep.get(Key.DAX)
        if not isinstance(d, dict):
            raise Inconclusive("no DAX evidence")
        opts = str(d.get(Key.MOUNT_OPTIONS, "")).split(",")
        ranges = d.get(Key.PMEM_RANGES)
        pfns = self.rep.get(Key.PFNS_BEFORE)
        inside = None
        if isinstance(ranges, list) and isinstance(pfns, list):
            inside = sum(1 for p in pfns if isinstance(p, int) and not isinstance(p, bool)
                         and any(isinstance(r, list) and len(r) == 2 and r[0] <= p <= r[1]
                                 for r in ranges))
        self.f["dax"] = {"statx_dax": d.get(Key.STATX_DAX), "mount_dax": [
            o for o in opts if o == "dax" or o.startswith("dax=")], "pfns_in_pmem": inside,
            "vmflags": d.get(Key.VMFLAGS), "queue_dax": d.get(Key.QUEUE_DAX)}
        if d.get(Key.STATX_DAX) is not True:
            raise Inconclusive("DAX not proven: STATX_ATTR_DAX not set")
        if not any(o in ("dax", "dax=always") for o in opts):
            raise Inconclusive("DAX not proven: no dax mount option")
        n = self.npages()
        if inside != n or not isinstance(pfns, list) or len(pfns) < n:
            raise Inconclusive(f"DAX not proven: {inside} of {n} PFNs in a pmem range")

    def dax_revoked_whole_file(self) -> bool:
        """odp truncate of a DAX file: the layout break unmaps the whole file before it
        looks for busy pages (fs/dax.c dax_layout_busy_page_range -> unmap_mapping_pages
        over the whole range), so the event's invalidate covers the kept pages too, and the
        driver's re-fault of the region (one hmm_range_fault per PINLAB_MAP_CHUNK pages,
        kmod/pinlab_odp.c) reaches beyond EOF and fails as a whole: the device writes
        nothing. True (REVOKED_IN_TIME) when the backing is DAX, an invalidate caused by the
        event was acknowledged, the DMA step failed on page 0 and the audit shows no
        generation-2 write at all; the facts record it (``kept_not_refaulted``)."""
        if self.cell.backing not in DAX_BACKINGS or not self.acked():
            return False
        g2 = step(self.rep, "dma_write_g2")
        by_gen = self.audit.get("gen_pages")
        if not isinstance(by_gen, dict) or by_gen.get("2") or g2.get(Key.BYTES) != 0:
            return False
        self.f["kept_not_refaulted"] = ("the layout break unmapped the whole file; the "
                                        "driver's chunk re-fault reached beyond EOF")
        return True

    def layout_wait(self) -> dict[str, Any] | None:
        """The workload's record of a truncate / hole punch of a DAX file that did not
        return before the driver's release (or the watch deadline), else None (it returned
        at once, or the cell is not fsdax)."""
        if self.cell.backing not in DAX_BACKINGS:
            return None
        b = self.rep.get(Key.BLOCKED)
        if not isinstance(b, dict):
            return None
        self.f["blocked"] = {k: b.get(k) for k in (
            Key.STEP, Key.MS, Key.HOLD_MS, Key.RELEASED_AT_MS, Key.RETURNED_AFTER_RELEASE,
            Key.NEVER, Key.WATCH_MS, Key.RETURNED_MS, Key.STILL_BLOCKED_AT_MS, Key.KILL_MS,
            Key.KILLED_SIGNAL, Key.STUCK)}
        if b.get(Key.NEVER):
            return b if Key.RETURNED_MS not in b else None
        return b if b.get(Key.RELEASED_AT_MS) is not None else None

    def truncate_blocked(self) -> str | None:
        """TRUNCATE_BLOCKED, or None when the layout step of a DAX cell did not wait
        (:meth:`layout_wait`): the truncate or hole punch of a DAX file waited in the
        filesystem's layout-break path (LAYOUT_WAIT in its wchan or kernel stack) for the
        driver's page references, and returned only after the driver released them
        (deregistration by the workload's helper), or was still waiting at the watch
        deadline and was killed (never-unpin cells). The device wrote generation 1 into
        every page and the audit has the region's destroy (pins dropped). Records the
        wait in ms (``truncate_wait_ms``). Source: Documentation/filesystems/dax.rst,
        fs/dax.c dax_layout_busy_page (6.1, 6.12), dax_break_layout (6.15+)."""
        b = self.layout_wait()
        if b is None:
            return None
        wait = b.get(Key.WAIT)
        if not isinstance(wait, dict):
            raise Inconclusive("where the blocked step waited was not recorded")
        where = [str(wait.get(Key.WCHAN, "")), *[str(x) for x in wait.get(Key.STACK) or []]]
        hits = [w for w in where if LAYOUT_WAIT.search(w)]
        self.f["wait"] = {"state": wait.get(Key.STATE), "wchan": wait.get(Key.WCHAN),
                          "layout_frames": hits[:4]}
        if not hits:
            raise Inconclusive("blocked step not waiting in a layout-break function")
        if b.get(Key.NEVER):
            at, watch = b.get(Key.STILL_BLOCKED_AT_MS), b.get(Key.WATCH_MS)
            if not isinstance(at, (int, float)) or not isinstance(watch, (int, float)) \
                    or at < watch:
                raise Inconclusive("never-unpin: no wait up to the watch deadline")
            if b.get(Key.KILLED_SIGNAL) != 9 and b.get(Key.STUCK) is not True:
                raise Inconclusive("never-unpin: the blocked truncate neither died nor "
                                   "stayed stuck")
            self.f["truncate_wait_ms"] = at
        else:
            rel, ms = b.get(Key.RELEASED_AT_MS), b.get(Key.MS)
            if b.get(Key.RELEASE_ERRNO) != 0:
                raise Inconclusive("the helper's release failed")
            if not isinstance(rel, (int, float)) or not isinstance(ms, (int, float)) \
                    or ms < rel or b.get(Key.RETURNED_AFTER_RELEASE) is not True:
                raise Inconclusive("the blocked step did not return after the release")
            if step_errno(self.rep, str(b.get(Key.STEP))):
                raise Inconclusive(f"{b.get(Key.STEP)} failed after the release")
            self.f["truncate_wait_ms"] = ms
        self.wrote(1)
        if not (self.audit.get("kinds") or {}).get("destroy"):
            raise Inconclusive("audit without the region's destroy")
        return Outcome.TRUNCATE_BLOCKED

    # -- the classification --
    def run(self) -> str:
        rep, cell = self.rep, self.cell
        if "error" in rep:
            self.f["workload_error"] = rep[Key.ERROR]
            return Outcome.ERROR
        if cell.backing in DAX_BACKINGS:
            self.need_dax()
        if rep.get(Key.STEP) == "register":
            e = rep.get(Key.ERRNO)
            if not isinstance(e, int) or isinstance(e, bool) or e == 0:
                raise Inconclusive("register step without an errno")
            return f"PIN_REFUSED({rep.get('errno_name') or e})"
        if "region" not in rep:
            raise Inconclusive("no region in the workload report")
        if cell.backing in THP_BACKINGS:
            self.need_thp()
        if cell.options:
            self.registration()
        ev = events.event(cell.event)
        if ev is not None and not ev.shared_checks:
            return str(ev.classify(self))
        shared = self.shared()
        if shared:
            return shared
        if "readonly" in cell.option_names:
            # the device wrote nothing: no btrfs/ext4 write-back verdicts; the read-only
            # flow's own classifier (orchestrator/readonly.py)
            from . import readonly

            return readonly.classify(self)
        last = ev.last_gen if ev is not None else 2
        if cell.backing == "btrfs":
            judged = self.btrfs_writeback(last)
            if judged:
                return judged
        if ev is None or ev.ext4_check:
            lost = self.ext4_lost(last)
            if lost:
                return lost
        if ev is None:
            self.f["unknown_event"] = cell.event
            return Outcome.ERROR
        if CPU_WRITE_OPTION not in cell.option_names:
            return str(ev.classify(self))
        self.cpu_write_after()
        return self.cpu_write_verdict(str(ev.classify(self)))

    # -- the cpu-write-after option --
    def cpu_write_after(self) -> None:
        """The ``cpu-write-after`` step happened (CPU_WRITE_EVIDENCE): step
        ``cpu_write_after`` returned 0, the mapping scanned right after it holds the
        process's CPU pattern on every registered page ("cpu", guest/pinlab_cell.py
        ``cpu_word``), and the PFNs before and after the write were recorded (every page
        present after it). Records how many present pages the write replaced
        (``moved_by_cpu_write``: a write fault that copied the page) and how many it
        faulted in (``faulted_in_by_cpu_write``: swapped out or unmapped before). Raises
        :class:`Inconclusive` naming what is missing."""
        rep, n = self.rep, self.npages()
        if step_errno(rep, CPU_WRITE_STEP):
            raise Inconclusive("the cpu-write-after step failed")
        mp = view(rep, Key.MAP_CPU)
        sts = states(mp)
        before, after = rep.get(Key.PFNS_BEFORE_CPU_WRITE), rep.get(Key.PFNS_AFTER_CPU_WRITE)
        pairs = list(zip(before, after, strict=False)) if isinstance(before, list) \
            and isinstance(after, list) else []
        self.f["cpu_write"] = {
            "map_after_write": mp,
            # a present page the write replaced (a write fault's copy)
            "moved_by_cpu_write": sum(1 for b, a in pairs if isinstance(b, int) and b != a),
            # a page the write faulted in (swapped out or unmapped before it)
            "faulted_in_by_cpu_write": sum(1 for b, _ in pairs if not isinstance(b, int))}
        if len(sts) != n or any(s != "cpu" for s in sts):
            raise Inconclusive("the mapping does not hold the CPU write on every page")
        if not isinstance(before, list) or len(before) != n:
            raise Inconclusive("PFNs before the CPU write missing")
        if not isinstance(after, list) or len(after) != n or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in after):
            raise Inconclusive("PFNs after the CPU write missing")

    def cpu_write_verdict(self, cls: str) -> str:
        """``cls`` (the event's class of a ``cpu-write-after`` cell) when the audit agrees
        with it: where the process sees the device's write (CPU_WRITE_SEEN) every
        generation-2 PFN is one the process mapped after its CPU write; where the writes
        were lost (CPU_WRITE_LOST) some generation-2 PFN is not (the pin kept a page the
        write fault copied away) and the mapping shows the process's own write ("cpu") on
        at least one page. Other classes pass unchanged. Raises :class:`Inconclusive` on a
        contradiction or when the audit's generation-2 PFNs are missing. Records
        ``gen2_to_unmapped`` and ``cpu_pages_after_g2``."""
        base = base_class(cls)
        if base not in CPU_WRITE_SEEN and base not in CPU_WRITE_LOST:
            return cls
        gen2 = self.audit.get("gen2_pfns")
        if not isinstance(gen2, list):
            raise Inconclusive("audit PFNs of generation 2 missing")
        after = set(self.rep[Key.PFNS_AFTER_CPU_WRITE])
        away = [p for p in gen2 if p not in after]
        g2view = next((self.rep[k] for k in (Key.MAP_G2, Key.MAP_PARENT_G2)
                       if isinstance(self.rep.get(k), list)), None)
        cpu_pages = states(g2view).count("cpu") if g2view is not None else None
        self.f["cpu_write"].update(gen2_pfns=len(gen2), gen2_to_unmapped=len(away),
                                   gen2_unmapped_sample=away[:8],
                                   cpu_pages_after_g2=cpu_pages)
        if base in CPU_WRITE_SEEN:
            if away:
                raise Inconclusive(f"{base}, but the audit has generation 2 in {len(away)} "
                                   "pages the process does not map")
            return cls
        if not away:
            raise Inconclusive(f"{base}, but the audit has generation 2 only in pages the "
                               "process maps")
        if not cpu_pages:
            raise Inconclusive(f"{base}, but no page of the mapping shows the CPU write")
        return cls

    def registration(self, readonly: bool | None = None) -> None:
        """The region was registered as the cell's options (or the event) ask: the
        report's register options (Key.REGISTER_OPTIONS: readonly, fast) and the
        module's ``gup_path`` in the query after registration (kmod/pinlab_uapi.h
        PINLAB_GUP_PATH_*: "fast" for get/pin_user_pages_fast(), "slow" for the other
        pinned entry points, "none" for odp). ``readonly``: what the event needs (default:
        the cell's ``readonly`` option, or True for an event that is read-only by nature:
        ``Event.readonly``). Run for
        every cell with options (:meth:`run`) before any class, PIN_REFUSED excepted; a
        registration that took another path is never the expected class. Raises
        :class:`Inconclusive` naming the mismatch; records ``gup_path`` in the facts."""
        cell = self.cell
        if readonly is None:
            ev = events.event(cell.event)
            readonly = "readonly" in cell.option_names or bool(ev and ev.readonly)
        want_ro = readonly
        fast = "fast" in cell.option_names
        opts = self.rep.get(Key.REGISTER_OPTIONS)
        if not isinstance(opts, dict) or not isinstance(opts.get(Key.READONLY), bool) \
                or not isinstance(opts.get(Key.FAST), bool):
            raise Inconclusive("register options missing")
        if opts[Key.READONLY] != want_ro or opts[Key.FAST] != fast:
            raise Inconclusive(f"register options {dict(opts)} differ from the cell's "
                               f"(readonly={want_ro}, fast={fast})")
        q = self.rep.get(Key.QUERY_REGISTERED)
        path = q.get("gup_path_name") if isinstance(q, dict) else None
        want = ("fast" if fast else "slow") if cell.mode in PINNED_MODES else "none"
        self.f["gup_path"] = path
        if path != want:
            raise Inconclusive(f"the module pinned through the {path} path, the cell "
                               f"asked {want}")

    # -- helpers the event classifiers share --
    def g2_errno(self) -> int:
        g2 = step(self.rep, "dma_write_g2")
        self.f["dma_g2"] = {k: g2.get(k) for k in ("errno", "errno_name", "status", "bytes")}
        return step_errno(self.rep, "dma_write_g2")

    def wrote_pages(self, gen: int, pages: int) -> None:
        """The audit shows generation ``gen`` written into at least ``pages`` pages."""
        by_gen = self.audit.get("gen_pages")
        got = by_gen.get(str(gen), 0) if isinstance(by_gen, dict) else 0
        if not isinstance(got, int) or got < pages:
            raise Inconclusive(f"audit shows gen{gen} in {got} pages, DMA covered {pages}")


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def thp_folio_missing(d: Any, npages: int, pmd_field: str | None) -> str | None:
    """What of THP_EVIDENCE the proof ``d`` (guest/pinlab_thp.py evidence) lacks for a
    range of ``npages`` pages that must be one large folio (PMD-mapped, shown by smaps
    field ``pmd_field``, unless None), or None when it is all there."""
    if not isinstance(d, dict):
        return "no proof"
    kp = d.get(Key.KPAGEFLAGS)
    if not isinstance(kp, dict) or "thp" not in kp:
        return f"kpageflags unreadable ({kp.get(Key.ERROR) if isinstance(kp, dict) else kp})"
    if d.get(Key.FOLIO_PAGES) != npages:
        return f"folio of {d.get(Key.FOLIO_PAGES)} pages for {npages} registered"
    if kp.get("missing") != 0:
        return f"{kp.get('missing')} registered pages without a PFN"
    if kp.get("thp") != npages:
        return f"{kp.get('thp')} of {npages} pages with KPF_THP"
    if kp.get("heads") != [0] or kp.get("tails") != npages - 1:
        return f"compound heads at {kp.get('heads')}, {kp.get('tails')} tails"
    if kp.get("contiguous") is not True or kp.get("first_aligned") is not True:
        return "PFNs not contiguous or the first not aligned to the folio"
    if pmd_field is not None:
        sm = d.get(Key.SMAPS)
        got = sm.get(pmd_field) if isinstance(sm, dict) else None
        if not _int(got) or got < HPAGE:
            return f"smaps {pmd_field} {got} below 2 MiB"
    return None


def thp_small_missing(d: Any, npages: int) -> str | None:
    """What of THP_SMALL_EVIDENCE the proof ``d`` lacks (small pages only), or None."""
    if not isinstance(d, dict):
        return "no proof"
    kp = d.get(Key.KPAGEFLAGS)
    if not isinstance(kp, dict) or "thp" not in kp:
        return "kpageflags unreadable"
    if kp.get("missing") != 0:
        return f"{kp.get('missing')} registered pages without a PFN"
    if kp.get("thp") != 0:
        return f"{kp.get('thp')} of {npages} pages already THP before the collapse"
    return None


def classify_cell(cell: Cell, rep: dict[str, Any], dm: DmesgReport,
                  audit: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One cell's outcome class and the facts that decided it.

    ``rep``: the guest workload's report; ``dm``: the kernel log lines the cell added;
    ``audit``: :func:`audit_facts` for the cell's region (with ``victim`` for exit/oom),
    or ``{"unavailable": reason}``. Never raises for bad input: whatever is missing,
    malformed or contradictory yields ``INCONCLUSIVE(<what>)``.
    """
    j = Judge(cell, rep if isinstance(rep, dict) else {}, dm,
               audit if isinstance(audit, dict) else {})
    try:
        return j.run(), j.f
    except Inconclusive as exc:
        return f"INCONCLUSIVE({exc})", j.f
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"INCONCLUSIVE(malformed evidence: {type(exc).__name__})", j.f
