"""Turning one cell's raw observations into an outcome class, on positive evidence only.

Inputs, all gathered by ``scenario.py`` after the cell ran:

* the guest workload's report (``images/guest/pinlab_cell.py``): step errnos, page scans
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

from .dmesg import DmesgReport
from .expectations import Cell

PAGE = 4096
PINNED_MODES = ("gup", "pin", "longterm")
FOLL_PIN_MODES = ("pin", "longterm")       # counted in nr_foll_pin_* (FOLL_PIN)
PRIVATE_BACKINGS = ("anon", "private-file")
# backings whose final file contents the workload reads back (file_after)
FILE_BACKINGS = ("memfd", "tmpfs", "ext4", "xfs", "btrfs", "hugetlb", "ext4-dax", "xfs-dax")
# fsdax backings (images/guest/pinlab_dax.py): every cell must prove DAX (need_dax)
DAX_BACKINGS = ("ext4-dax", "xfs-dax")
# where a truncate / hole punch of a DAX file waits for the pages' references: 6.1 and 6.12
# ext4_break_layouts / xfs_break_dax_layouts around dax_layout_busy_page, 6.15+
# dax_break_layout (fs/dax.c; Documentation/filesystems/dax.rst)
LAYOUT_WAIT = re.compile(r"ext4_break_layouts|xfs_break_(?:dax_)?layouts|dax_break_layout"
                         r"|dax_layout_busy_page|(?:ext4|xfs)_wait_dax_page|wait_page_idle")
# reclaim cells of anonymous memory must show that reclaim reached the mapping: an
# unregistered control page of the same mapping went to swap (pinlab_cell.SWAP_CONTROL)
SWAP_CONTROL_BACKINGS = ("anon", "private-file")
SWAP_CONTROL_EVENTS = ("pageout", "memcg-reclaim")
F_SEAL_WRITE = 0x0008
# a fence missed by the device is logged by pinlab_odp.c / pinlab_queue.c
ESCALATION_LINES = ("INVALIDATE fence missed", "resetting device")
# a WARN the ext4 dirty-folio path raises for a page dirtied without ->page_mkwrite
# (fs/ext4/inode.c ext4_dirty_folio, WARN_ON_ONCE(!folio_buffers(folio)); 6.x and 7.x formats)
EXT4_WARN = re.compile(r"fs/ext4/\S+ (?:at )?ext4_\w+")
SEVERE_CLASSES = ("BUG", "OOPS", "PANIC", "BAD_PAGE", "HUNG_TASK", "SOFT_LOCKUP", "RCU_STALL")

#: What each class needs, in the words of the expectations header (kept in sync by a unit
#: test). The classifier enforces each item; the property test removes or corrupts each.
EVIDENCE: dict[str, tuple[str, ...]] = {
    "PIN_REFUSED": ("register step errno",),
    "KERNEL_ERROR": ("dmesg lines of the error",),
    "PINS_LEAKED": ("vmstat pin counters before and at the end", "audit"),
    "DMA_AFTER_REVOKE": ("audit violation records",),
    "DMA_OUTSIDE_REGISTRATION": ("audit writes", "registered PFNs"),
    "COHERENT": ("audit: the later generation written to every registered page",
                 "the DMA step's errno 0", "every view scanned showing that generation",
                 "anon reclaim: a control page swapped, pswpout, control pages intact"),
    "REVOKED_IN_TIME": ("audit: an invalidate acknowledged after the event's step",
                        "no violation", "the outcome's views",
                        "anon reclaim: a control page swapped, pswpout, control pages "
                        "intact"),
    "WRITES_LOST_SILENTLY": ("audit: the later generation written to the registered pages",
                             "the DMA step's errno 0",
                             "a view showing something else on at least one page"),
    "WRITEBACK_STALE": ("audit: generation 2 written", "disk scan while registered (stale)",
                        "disk scan after release (generation 2)"),
    "EXT4_WARN_DATA_LOST": ("ext4 WARN or buffer-warning lines",
                            "audit: the later generation written",
                            "file scan after drop_caches without it"),
    "DIRTY_FOLIO_REJECTED": ("btrfs 'marked dirty without notifying the fs' lines or an "
                             "fsync EUCLEAN/EIO",
                             "an fsync, sync or file read step's error",
                             "audit: the later generation written"),
    "CSUM_FAILED": ("btrfs 'csum failed' lines",),
    "MIGRATION_FAILS": ("control pages moved", "registered pages not moved",
                        "audit: generation 2 written", "mapping scan"),
    "PARENT_LOSES_WRITES": ("child report", "child status 0", "parent and child scans",
                            "audit: generation 2 written"),
    "CHILD_SEES_WRITES": ("child report", "child status 0", "parent and child scans",
                          "audit: generation 2 written"),
    "SEAL_REFUSED": ("seal step errno",),
    "SEAL_APPLIED": ("seal step errno 0", "F_GET_SEALS showing F_SEAL_WRITE"),
    "ESCALATED_RESET": ("escalation lines in dmesg", "audit reset record",
                        "region failed or DMA refused"),
    "DEVICE_GONE_CLEAN": ("the workload saw the device go", "audit: reset or destroy",
                          "no violation", "pins back (pin, longterm)"),
    "DEVICE_NOT_REMOVED": ("the workload's removal wait",),
    "DMA_FAILED": ("the DMA step's errno",),
    "RELEASED_AT_EXIT": ("victim status", "audit: the victim region destroyed",
                         "pins back (pin, longterm)"),
    "REGION_NOT_RELEASED": ("victim status", "victim audit without destroy"),
    "OFFLINE_BLOCKED": ("offline results", "audit: generation 2 written", "mapping scan"),
    "OFFLINE_SUCCEEDS": ("offline results", "audit: generation 2 written", "mapping scan"),
    "TRUNCATE_BLOCKED": ("DAX evidence", "the truncate or hole punch step waiting in a "
                         "layout-break function (wchan or kernel stack)",
                         "the step returning only after the driver's release (the wait in "
                         "ms), or still blocked at the watch deadline and then killed",
                         "audit: generation 1 written", "audit: the region destroyed"),
}
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
    steps = rep.get("steps")
    for st in reversed(steps if isinstance(steps, list) else []):
        if isinstance(st, dict) and st.get("step") == name:
            return dict(st)
    return {}


def step_errno(rep: dict[str, Any], name: str) -> int:
    """The errno a step recorded; :class:`Inconclusive` when the step or its errno is
    missing."""
    st = step(rep, name)
    if not st:
        raise Inconclusive(f"step {name} missing")
    e = st.get("errno")
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


def _changed(a: Any, b: Any) -> int | None:
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


def _outstanding(vm: Any) -> int | None:
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
    ``region``: the region id (default ``rep["region"]``). The extract is ``complete``
    only when its seqs run without a gap from ``since + 1`` and the limit was not reached
    (the device keeps a bounded ring, and a truncated extract cannot prove an absence).

    Returns counts per record kind, ``gen_pages`` (generation, as a string like every JSON
    key -> distinct guest pages written with it), ``outside_registration`` (written pages
    that were not registered: for odp any page the process mapped counts as registered),
    ``event_acks`` (invalidate acknowledgements after the region's last generation-1 write
    and before its first generation-2 write, i.e. caused by the event between them),
    ``ack_before_destroy``, ``violations`` and ``resets``.
    """
    rid = rep.get("region") if region is None else region
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
    last_g1 = first_g2 = destroy = None
    acks: list[int] = []
    for r in recs:
        k = str(r.get("kind"))
        kinds[k] = kinds.get(k, 0) + 1
        seq = int(r.get("seq", 0))
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
    registered = _pfn_set(rep.get("pfns_registered") or rep.get("pfns_before"))
    if rep.get("mode") == "odp":   # odp re-faults: any page the process mapped is legal
        registered |= _pfn_set(rep.get("pfns_after"), rep.get("pfns_after_touch"),
                               rep.get("pfns_after_event"), rep.get("pagemap_after_event"),
                               rep.get("pfns_parent_after_write"))
    written = set().union(*pages_by_gen.values()) if pages_by_gen else set()
    outside = sorted(written - registered)
    viol = [v for v in violations if inst is None or v.get("inst") == inst]
    viol += [r for r in recs if r.get("kind") == "violation" and r not in viol]
    facts.update(kinds=kinds, registered_known=bool(registered),
                 gen_pages={str(g): len(p) for g, p in sorted(pages_by_gen.items())},
                 pages_written=len(written), outside_registration=len(outside),
                 outside_pfns=outside[:16], event_acks=event_acks,
                 ack_before_destroy=any(destroy is None or a < destroy for a in acks),
                 violations=len(viol), violation_samples=viol[:5])
    return facts


# --------------------------------------------------------------------- the classifier
class _Judge:
    """One classification: the cell, its inputs, and the facts that decided it."""

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
        n = self.rep.get("npages")
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
            return "WRITES_LOST_SILENTLY"
        if self.cell.mode == "odp" and self.acked():
            return "REVOKED_IN_TIME"
        return "COHERENT"

    def revoked_failure(self, errname: Any) -> str:
        """The DMA step failed: for odp that is the revoke working (the device found no
        page where the process has none) when the event's invalidate was acknowledged;
        otherwise the failure itself is the outcome."""
        if self.cell.mode == "odp" and self.acked():
            return "REVOKED_IN_TIME"
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
            out.append("file_after")
        return out

    # -- shared checks --
    def shared(self) -> str | None:
        dm = self.dm
        sev = dm.severe()
        if any(k in sev for k in SEVERE_CLASSES):
            self.f["severe"] = {k: v[:5] for k, v in sev.items()}
            return "KERNEL_ERROR"
        if dm.lines.get("PAGE_POISON"):
            self.f["page_poison"] = dm.lines["PAGE_POISON"][:5]
            return "KERNEL_ERROR"
        warns = sev.get("WARN", [])
        other = [w for w in warns if not self.ext4_path_warn(w)]
        if other:
            self.f["warn"] = other[:5]
            return "KERNEL_ERROR"
        self.need_audit()
        if self.pins_leaked():
            return "PINS_LEAKED"
        if self.audit["violations"]:
            self.f["violations"] = self.audit.get("violation_samples")
            return "DMA_AFTER_REVOKE"
        if self.audit["outside_registration"]:
            if not self.audit.get("registered_known"):
                raise Inconclusive("registered PFNs missing")
            self.f["outside_pfns"] = self.audit.get("outside_pfns")
            return "DMA_OUTSIDE_REGISTRATION"
        if not self.audit.get("registered_known"):
            raise Inconclusive("registered PFNs missing")
        return None

    def pins_leaked(self) -> bool:
        """pin/longterm: outstanding FOLL_PINs (vmstat) differ at the end of the cell from
        before it. Raises Inconclusive when the counters are missing; False for gup and odp
        (FOLL_GET and notifiers are not counted there)."""
        if self.cell.mode not in FOLL_PIN_MODES:
            return False
        b = _outstanding(self.rep.get("vmstat_before"))
        e = _outstanding(self.rep.get("vmstat_end"))
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
        if self.views_g(["file_after"], last):
            return None   # warned, data intact: judged by the event below
        self.wrote(last)
        return "EXT4_WARN_DATA_LOST"

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
            return "CSUM_FAILED"
        oob = self.dm.lines.get("BTRFS_OOB_DIRTY", [])
        errs = {st["step"]: st.get("errno_name") or st.get("errno")
                for st in self.rep.get("steps", []) if isinstance(st, dict)
                and str(st.get("step", "")).startswith(("fsync", "sync")) and st.get("errno")}
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
        with_gen = self.rep.get("file_after")
        if isinstance(with_gen, list) and with_gen:
            self.f["file_after"] = with_gen
        self.wrote(last)
        return "DIRTY_FOLIO_REJECTED"

    def need_dax(self) -> None:
        """The cell's file was accessed through DAX (DAX_EVIDENCE): STATX_ATTR_DAX set,
        the mount's dax option, and every page of the mapping at a PFN inside a
        "Persistent Memory" range of /proc/iomem (the pages are the pmem itself, no page
        cache). Raises :class:`Inconclusive` naming what is missing."""
        d = self.rep.get("dax")
        if not isinstance(d, dict):
            raise Inconclusive("no DAX evidence")
        opts = str(d.get("mount_options", "")).split(",")
        ranges = d.get("pmem_ranges")
        pfns = self.rep.get("pfns_before")
        inside = None
        if isinstance(ranges, list) and isinstance(pfns, list):
            inside = sum(1 for p in pfns if isinstance(p, int) and not isinstance(p, bool)
                         and any(isinstance(r, list) and len(r) == 2 and r[0] <= p <= r[1]
                                 for r in ranges))
        self.f["dax"] = {"statx_dax": d.get("statx_dax"), "mount_dax": [
            o for o in opts if o == "dax" or o.startswith("dax=")], "pfns_in_pmem": inside,
            "vmflags": d.get("vmflags"), "queue_dax": d.get("queue_dax")}
        if d.get("statx_dax") is not True:
            raise Inconclusive("DAX not proven: STATX_ATTR_DAX not set")
        if not any(o in ("dax", "dax=always") for o in opts):
            raise Inconclusive("DAX not proven: no dax mount option")
        n = self.npages()
        if inside != n or len(pfns) < n:
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
        if not isinstance(by_gen, dict) or by_gen.get("2") or g2.get("bytes") != 0:
            return False
        self.f["kept_not_refaulted"] = ("the layout break unmapped the whole file; the "
                                        "driver's chunk re-fault reached beyond EOF")
        return True

    def layout_wait(self) -> dict[str, Any] | None:
        """The workload's record of a truncate / hole punch that did not return before the
        driver's release (or the watch deadline), else None (it returned at once)."""
        b = self.rep.get("blocked")
        if not isinstance(b, dict):
            return None
        self.f["blocked"] = {k: b.get(k) for k in (
            "step", "ms", "hold_ms", "released_at_ms", "returned_after_release", "never",
            "watch_ms", "returned_ms", "still_blocked_at_ms", "kill_ms", "killed_signal",
            "stuck")}
        if b.get("never"):
            return b if "returned_ms" not in b else None
        return b if b.get("released_at_ms") is not None else None

    def truncate_blocked(self) -> str:
        """TRUNCATE_BLOCKED: the truncate or hole punch of a DAX file waited in the
        filesystem's layout-break path (LAYOUT_WAIT in its wchan or kernel stack) for the
        driver's page references, and returned only after the driver released them
        (deregistration by the workload's helper), or was still waiting at the watch
        deadline and was killed (never-unpin cells). The device wrote generation 1 into
        every page and the audit has the region's destroy (pins dropped). Records the
        wait in ms (``truncate_wait_ms``)."""
        b = self.layout_wait()
        assert b is not None
        wait = b.get("wait")
        if not isinstance(wait, dict):
            raise Inconclusive("where the blocked step waited was not recorded")
        where = [str(wait.get("wchan", "")), *[str(x) for x in wait.get("stack") or []]]
        hits = [w for w in where if LAYOUT_WAIT.search(w)]
        self.f["wait"] = {"state": wait.get("state"), "wchan": wait.get("wchan"),
                          "layout_frames": hits[:4]}
        if not hits:
            raise Inconclusive("blocked step not waiting in a layout-break function")
        if b.get("never"):
            at, watch = b.get("still_blocked_at_ms"), b.get("watch_ms")
            if not isinstance(at, (int, float)) or not isinstance(watch, (int, float)) \
                    or at < watch:
                raise Inconclusive("never-unpin: no wait up to the watch deadline")
            if b.get("killed_signal") != 9 and b.get("stuck") is not True:
                raise Inconclusive("never-unpin: the blocked truncate neither died nor "
                                   "stayed stuck")
            self.f["truncate_wait_ms"] = at
        else:
            rel, ms = b.get("released_at_ms"), b.get("ms")
            if b.get("release_errno") != 0:
                raise Inconclusive("the helper's release failed")
            if not isinstance(rel, (int, float)) or not isinstance(ms, (int, float)) \
                    or ms < rel or b.get("returned_after_release") is not True:
                raise Inconclusive("the blocked step did not return after the release")
            if step_errno(self.rep, str(b.get("step"))):
                raise Inconclusive(f"{b.get('step')} failed after the release")
            self.f["truncate_wait_ms"] = ms
        self.wrote(1)
        if not (self.audit.get("kinds") or {}).get("destroy"):
            raise Inconclusive("audit without the region's destroy")
        return "TRUNCATE_BLOCKED"

    # -- the classification --
    def run(self) -> str:
        rep, cell = self.rep, self.cell
        if "error" in rep:
            self.f["workload_error"] = rep["error"]
            return "ERROR"
        if cell.backing in DAX_BACKINGS:
            self.need_dax()
        if rep.get("step") == "register":
            e = rep.get("errno")
            if not isinstance(e, int) or isinstance(e, bool) or e == 0:
                raise Inconclusive("register step without an errno")
            return f"PIN_REFUSED({rep.get('errno_name') or e})"
        if "region" not in rep:
            raise Inconclusive("no region in the workload report")
        if cell.event in ("hot-unplug", "pci-remove"):
            return self.removal()
        shared = self.shared()
        if shared:
            return shared
        if cell.backing in DAX_BACKINGS and self.layout_wait():
            return self.truncate_blocked()
        if cell.backing == "btrfs":
            judged = self.btrfs_writeback(1 if cell.event == "dma-write" else 2)
            if judged:
                return judged
        if cell.event != "2018":
            lost = self.ext4_lost(1 if cell.event == "dma-write" else 2)
            if lost:
                return lost
        method = getattr(self, "ev_" + cell.event.replace("-", "_"), None)
        if method is None:
            self.f["unknown_event"] = cell.event
            return "ERROR"
        return str(method())

    # -- per event --
    def g2_errno(self) -> int:
        g2 = step(self.rep, "dma_write_g2")
        self.f["dma_g2"] = {k: g2.get(k) for k in ("errno", "errno_name", "status", "bytes")}
        return step_errno(self.rep, "dma_write_g2")

    def ev_dma_write(self) -> str:
        return self.outcome(self.views_g(self.file_views("map_g1"), 1), gen=1)

    def ev_truncate(self) -> str:
        kept = self.rep.get("kept_pages")
        if not isinstance(kept, int) or kept <= 0:
            raise Inconclusive("kept_pages missing")
        e = self.g2_errno()
        kept_g2 = self.views_g(["map_kept_g2"])
        if e:
            if self.cell.mode == "odp":
                # the device re-faulted and wrote the kept half, then found no page
                # beyond EOF
                if not kept_g2 and self.dax_revoked_whole_file():
                    return "REVOKED_IN_TIME"
                if not kept_g2:
                    raise Inconclusive("odp DMA failed and the kept pages lack gen2")
                self.wrote_pages(2, kept)
            return self.revoked_failure(step(self.rep, "dma_write_g2").get("errno_name"))
        if not kept_g2:
            return self.outcome(False)
        after = states(view(self.rep, "map_after_extend"))[kept:]
        self.f["truncated_after_extend"] = after
        if not after:
            raise Inconclusive("map_after_extend: page scan empty")
        return self.outcome(all(s == "g2" for s in after))

    def wrote_pages(self, gen: int, pages: int) -> None:
        """The audit shows generation ``gen`` written into at least ``pages`` pages."""
        by_gen = self.audit.get("gen_pages")
        got = by_gen.get(str(gen), 0) if isinstance(by_gen, dict) else 0
        if not isinstance(got, int) or got < pages:
            raise Inconclusive(f"audit shows gen{gen} in {got} pages, DMA covered {pages}")

    def ev_punch_hole(self) -> str:
        self.f["map_after_punch"] = self.rep.get("map_after_punch")
        if self.g2_errno():
            return self.revoked_failure(step(self.rep, "dma_write_g2").get("errno_name"))
        return self.outcome(self.views_g(self.file_views("map_g2")))

    ev_punch_hole_partial = ev_punch_hole
    ev_truncate_never_unpin = ev_truncate

    def _reclaim(self) -> str:
        rep = self.rep
        self.f["pagemap_after_event"] = summarize_pagemap(rep.get("pagemap_after_event"))
        self.f["vmstat_event"] = rep.get("vmstat_event")
        for k in ("memcg_before", "memcg_registered", "memcg_after_reclaim"):
            if rep.get(k) is not None:
                self.f[k] = rep[k]
        self.f["pfns_changed"] = _changed(rep.get("pfns_before"), rep.get("pfns_after_touch"))
        if (self.cell.backing in SWAP_CONTROL_BACKINGS
                and self.cell.event in SWAP_CONTROL_EVENTS):
            self.swap_reached()
        if self.g2_errno():
            return self.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
        return self.outcome(self.views_g(self.file_views("map_g2")))

    ev_pageout = ev_memcg_reclaim = ev_drop_caches = ev_dontneed = _reclaim

    def swap_reached(self) -> None:
        """Reclaim of anonymous memory reached the mapping: at least one of its
        unregistered control pages is a swap entry in pagemap after the event
        (Documentation/admin-guide/mm/pagemap.rst, bit 62), /proc/vmstat pswpout grew by at
        least that many pages, and every control page reads back its own words after
        swap-in. Without that a COHERENT cell proves nothing (nothing was reclaimed), so
        :class:`Inconclusive` names what is missing. Records ``swapped`` (registered and
        control pages that were swap entries) and ``pswpout`` in the facts."""
        rep = self.rep
        n = rep.get("control_pages")
        ctl = rep.get("control_pagemap_after_event")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise Inconclusive("control_pages missing")
        if not isinstance(ctl, list) or len(ctl) != n:
            raise Inconclusive("control pagemap missing")
        reg = summarize_pagemap(rep.get("pagemap_after_event"))
        if reg is None:
            raise Inconclusive("pagemap after the event missing")
        ctl_swapped = sum(1 for p in ctl if p == "swap")
        ev = rep.get("vmstat_event")
        pswpout = ev.get("pswpout", 0) if isinstance(ev, dict) else None
        self.f["swapped"] = {"registered": reg["swap"], "control": ctl_swapped,
                             "control_pages": n, "pswpout": pswpout}
        if not ctl_swapped:
            raise Inconclusive("reclaim did not reach the mapping: no control page swapped")
        if not isinstance(pswpout, int) or pswpout < ctl_swapped:
            raise Inconclusive(f"pswpout {pswpout} below the {ctl_swapped} swapped "
                               "control pages")
        intact = rep.get("control_intact")
        if intact != n:
            raise Inconclusive(f"control pages intact after swap-in: {intact} of {n}")

    def ev_writeback(self) -> str:
        self.f["stream_chunks"] = self.rep.get("stream_chunks")
        if self.g2_errno():
            return self.revoked_failure(step(self.rep, "dma_write_g2").get("errno_name"))
        self.wrote(2)
        reg = self.views_g(["disk_registered"])
        rel = self.views_g(["disk_released"])
        if not rel:
            return "WRITES_LOST_SILENTLY"
        return self.outcome(True) if reg else "WRITEBACK_STALE"

    def ev_2018(self) -> str:
        self.f["dirty"] = step(self.rep, "dirty")
        self.f["pagemap_after_pageout"] = summarize_pagemap(self.rep.get("pagemap_after_event"))
        lines = self.dm.lines.get("EXT4_NO_BUFFERS", [])
        warns = [w for w in self.dm.severe().get("WARN", []) if self.ext4_path_warn(w)]
        self.f.update(ext4_no_buffers=lines[:4], warn=warns[:2])
        data_ok = self.views_g(["file_after"])
        if lines or warns:
            if data_ok:
                return "KERNEL_ERROR"   # the kernel complained although the data is there
            self.wrote(2)
            return "EXT4_WARN_DATA_LOST"
        return self.outcome(data_ok)

    def ev_migrate(self) -> str:
        rep = self.rep
        self.f.update({k: rep.get(k) for k in ("pinned_moved", "control_moved",
                                                "vmstat_event")})
        self.f["soft_offline"] = {st["step"]: st.get("errno_name") or 0
                                  for st in rep.get("steps", []) if isinstance(st, dict)
                                  and str(st.get("step", "")).startswith("soft_offline")}
        pinned, control = rep.get("pinned_moved"), rep.get("control_moved")
        if not isinstance(pinned, int) or not isinstance(control, int):
            raise Inconclusive("migration counts missing")
        if self.g2_errno():
            return self.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
        good = self.views_g(["map_g2"])
        if not good or pinned or self.cell.mode == "odp":
            return self.outcome(good)
        if not control:
            raise Inconclusive("no page migrated, not even the unregistered control")
        self.wrote(2)
        return "MIGRATION_FAILS"

    def ev_fork(self) -> str:
        rep, cell = self.rep, self.cell
        child = rep.get("child")
        status = rep.get("child_status")
        if not isinstance(child, dict) or not child or "error" in child:
            raise Inconclusive("child report missing")
        if status != 0:
            raise Inconclusive(f"child exited with status {status}")
        if not isinstance(child.get("mapped"), bool):
            raise Inconclusive("child report lacks 'mapped'")
        parent_ok = self.views_g(["map_parent_g2"])
        child_g2 = False
        if child["mapped"]:
            self.f["child_map"] = view(child, "map")
            child_g2 = all_gen(child["map"], 2)
        self.f.update(parent_g2=parent_ok, child_g2=child_g2, child_status=status,
                      parent_pfns_changed=_changed(rep.get("pfns_before"),
                                                   rep.get("pfns_parent_after_write")))
        if self.g2_errno():
            return self.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
        if not parent_ok:
            self.wrote(2)
            return "PARENT_LOSES_WRITES" if child_g2 else "WRITES_LOST_SILENTLY"
        if child_g2 and cell.backing in PRIVATE_BACKINGS:
            self.wrote(2)
            return "CHILD_SEES_WRITES"
        return self.outcome(True)

    ev_fork_dontfork = ev_fork

    def ev_munmap(self) -> str:
        if step_errno(self.rep, "munmap"):
            raise Inconclusive("munmap failed")
        if self.g2_errno():
            return self.revoked_failure(step(self.rep, "dma_write_g2").get("errno_name"))
        if self.cell.backing == "anon":
            # anonymous memory nobody maps any more: the device wrote into orphaned pages
            self.wrote(2)
            return "WRITES_LOST_SILENTLY"
        return self.outcome(self.views_g(["remap_g2"]))

    def ev_odirect_write(self) -> str:
        rep = self.rep
        self.f.update({k: rep.get(k) for k in ("odirect_pages", "map_after_odirect")})
        self.f["odirect"] = step(rep, "odirect_write")
        if step_errno(rep, "odirect_write"):
            raise Inconclusive("O_DIRECT write failed")
        self.f["pfns_changed"] = _changed(rep.get("pfns_before"), rep.get("pfns_after_touch"))
        if self.g2_errno():
            return self.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
        return self.outcome(self.views_g(["map_g2", "file_after"]))

    def ev_mem_offline(self) -> str:
        rep = self.rep
        off = rep.get("offline")
        self.f.update(blocks=rep.get("blocks"), offline=off,
                      movable_pages=rep.get("movable_pages"),
                      moved_at_registration=_changed(rep.get("pfns_before"),
                                                     rep.get("pfns_registered")),
                      moved_by_offline=_changed(rep.get("pfns_registered"),
                                                rep.get("pfns_after_touch")),
                      migration_failures=self.dm.lines.get("MIGRATION_FAILURE", [])[:3])
        if not isinstance(off, list) or not off:
            raise Inconclusive("no registered page was in a movable block")
        if not all(isinstance(o, dict) and "result" in o for o in off):
            raise Inconclusive("offline results malformed")
        if self.g2_errno():
            return self.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
        good = self.views_g(["map_g2"])
        if not good:
            return self.outcome(False)
        self.wrote(2)
        if all(o["result"] == "ok" for o in off):
            if self.cell.mode == "odp" and self.acked():
                return "REVOKED_IN_TIME"
            return "OFFLINE_SUCCEEDS"
        return "OFFLINE_BLOCKED"

    def ev_seal_write(self) -> str:
        st = step(self.rep, "seal_write")
        self.f["seal"] = st
        e = step_errno(self.rep, "seal_write")
        if e:
            return f"SEAL_REFUSED({st.get('errno_name') or e})"
        seals = self.rep.get("seals")
        self.f["seals"] = seals
        if not isinstance(seals, int) or not seals & F_SEAL_WRITE:
            raise Inconclusive("F_GET_SEALS does not show F_SEAL_WRITE")
        return "SEAL_APPLIED"

    def ev_no_ack(self) -> str:
        rep, dm = self.rep, self.dm
        self.f["madv_dontneed_ms"] = step(rep, "madv_dontneed").get("ms")
        self.f["escalation_lines"] = [ln for ln in dm.pinlab_lines
                                      if any(x in ln for x in ESCALATION_LINES)][:4]
        q = rep.get("query_after_event")
        self.f["query_after_event"] = q
        self.f["resets"] = self.audit.get("resets")
        failed = isinstance(q, dict) and q.get("state") == 1
        refused = bool(step(rep, "dma_write_g2").get("errno"))
        if self.f["escalation_lines"] and (failed or refused):
            if not self.audit.get("resets"):
                raise Inconclusive("escalation logged but no reset in the audit")
            return "ESCALATED_RESET"
        if self.g2_errno():
            return self.revoked_failure(step(rep, "dma_write_g2").get("errno_name"))
        return self.outcome(self.views_g(["map_g2"]))

    def removal(self) -> str:
        """hot-unplug / pci-remove: kernel errors first, then the removal itself."""
        rep, dm = self.rep, self.dm
        sev = dm.severe()
        if sev or dm.lines.get("PAGE_POISON"):
            self.f["severe"] = {k: v[:5] for k, v in sev.items()}
            return "KERNEL_ERROR"
        self.f.update({k: rep.get(k) for k in ("gone", "gone_after_ms", "dev_node_exists")})
        self.f["deregister"] = step(rep, "deregister")
        self.f["removed_line"] = [ln for ln in dm.pinlab_lines if "removed" in ln][:2]
        if "gone" not in rep:
            raise Inconclusive("the workload did not report the removal wait")
        if not rep.get("gone"):
            return "DEVICE_NOT_REMOVED"
        a = self.need_audit()
        if a["violations"]:
            self.f["violations"] = a.get("violation_samples")
            return "DMA_AFTER_REVOKE"
        if not a.get("resets") and not a.get("kinds", {}).get("destroy"):
            raise Inconclusive("audit shows neither a reset nor the region's destroy")
        if self.pins_leaked():
            return "PINS_LEAKED"
        return "DEVICE_GONE_CLEAN"

    def ev_exit(self) -> str:
        return self.victim()

    ev_oom = ev_exit

    def victim(self) -> str:
        """exit / oom: a second process registered a region and died without
        deregistering; its region (audit ``victim``) is what is judged."""
        rep, cell = self.rep, self.cell
        victim = rep.get("victim")
        va = self.audit.get("victim")
        self.f.update(victim_status=rep.get("victim_status"),
                      victim_signal=rep.get("victim_signal"),
                      victim_exit_ms=rep.get("victim_exit_ms"), oom_events=rep.get("oom_events"),
                      pins_victim=[_outstanding(rep.get("vmstat_before_victim")),
                                   _outstanding(rep.get("vmstat_victim_registered")),
                                   _outstanding(rep.get("vmstat_victim_gone"))])
        before, after = rep.get("nonblock_refused_before"), rep.get("nonblock_refused_after")
        if isinstance(before, int) and isinstance(after, int):
            self.f["nonblock_invalidations_refused"] = after - before
        if not isinstance(victim, dict) or "error" in victim or "region" not in victim:
            raise Inconclusive("victim report missing")
        if not isinstance(rep.get("victim_status"), int):
            raise Inconclusive(f"victim did not die: {rep.get('victim_status')}")
        va = self.need_audit(va, "victim region")
        self.f.update(victim_audit=va.get("kinds"), victim_violations=va.get("violations"))
        if va["violations"]:
            self.f["violations"] = va.get("violation_samples")
            return "DMA_AFTER_REVOKE"
        if cell.event == "oom" and not (rep.get("oom_events") or {}).get("oom_kill"):
            raise Inconclusive("the memcg OOM killer did not kill the victim")
        b, r, g = self.f["pins_victim"]
        if cell.mode in FOLL_PIN_MODES:
            if b is None or r is None or g is None:
                raise Inconclusive("vmstat pin counters missing")
            if r <= b:
                raise Inconclusive("the victim's registration added no pin")
            if g != b:
                return "PINS_LEAKED"
        kinds = va.get("kinds") or {}
        if not kinds.get("destroy"):
            return "REGION_NOT_RELEASED"
        if cell.mode == "odp":
            if kinds.get("invalidate_ack") and va.get("ack_before_destroy"):
                return "REVOKED_IN_TIME"
            raise Inconclusive("odp victim destroyed without an acknowledged invalidate")
        return "RELEASED_AT_EXIT"


def classify_cell(cell: Cell, rep: dict[str, Any], dm: DmesgReport,
                  audit: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One cell's outcome class and the facts that decided it.

    ``rep``: the guest workload's report; ``dm``: the kernel log lines the cell added;
    ``audit``: :func:`audit_facts` for the cell's region (with ``victim`` for exit/oom),
    or ``{"unavailable": reason}``. Never raises for bad input: whatever is missing,
    malformed or contradictory yields ``INCONCLUSIVE(<what>)``.
    """
    j = _Judge(cell, rep if isinstance(rep, dict) else {}, dm,
               audit if isinstance(audit, dict) else {})
    try:
        return j.run(), j.f
    except Inconclusive as exc:
        return f"INCONCLUSIVE({exc})", j.f
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"INCONCLUSIVE(malformed evidence: {type(exc).__name__})", j.f
