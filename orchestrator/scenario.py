"""One cell of the matrix: run its experiment in a warm guest, classify what happened.

A scenario returns an ``Observation``: the outcome class it saw and the evidence behind it
(workload report, dmesg classes, audit-log facts). It never decides pass/fail; the verdict
layer compares the class with the expectations table.

Every event runs the guest's ``workload.py cell`` (images/guest/pinlab_cell.py), which
reports raw observations; ``classify_cell`` turns them, the dmesg lines the cell added and
the device's audit facts into one outcome class (the classes are documented in the header
of ``data/expectations.toml``). ``hot-unplug`` and ``no-ack`` also act on the host side
(QMP ``device_del``, device fault injection).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dmesg import DmesgReport, classify
from .expectations import Cell
from .session import GUEST_DIR, GuestSession
from .vm import Guest

PAGE = 4096
AUDIT_LIMIT = 100_000   # GuestSession.audit()'s default limit
READY_FILE = "/tmp/pinlab-cell.ready"
OUT_FILE = "/tmp/pinlab-cell.out"
# events whose cell the workload can run in one go (the rest need the host mid-cell)
EVENTS = ["dma-write", "truncate", "punch-hole", "punch-hole-partial", "pageout",
          "memcg-reclaim", "drop-caches", "writeback", "2018", "migrate", "fork",
          "fork-dontfork", "munmap", "dontneed", "seal-write", "odirect-write", "exit", "oom"]
PRIVATE_BACKINGS = ("anon", "private-file")
# a fence missed by the device is logged by pinlab_odp.c / pinlab_queue.c
ESCALATION_LINES = ("INVALIDATE fence missed", "resetting device")


@dataclass
class Observation:
    observed: str
    evidence: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------- report helpers
def states(scan: list[list[Any]] | None) -> list[str]:
    """Expand a run-length page scan [[state, first, count], ...] to one state per page."""
    out: list[str] = []
    for st, _first, count in scan or []:
        out += [str(st)] * int(count)
    return out


def all_gen(scan: list[list[Any]] | None, gen: int, first: int = 0,
            count: int | None = None) -> bool:
    sts = states(scan)[first:None if count is None else first + count]
    return bool(sts) and all(s == f"g{gen}" for s in sts)


def step(rep: dict[str, Any], name: str) -> dict[str, Any]:
    for st in reversed(rep.get("steps", [])):
        if st.get("step") == name:
            return dict(st)
    return {}


def _pfn_set(*lists: Any) -> set[int]:
    out: set[int] = set()
    for lst in lists:
        for p in lst or []:
            if isinstance(p, int):
                out.add(p)
    return out


# --------------------------------------------------------------------- audit facts
def audit_facts(s: GuestSession, rep: dict[str, Any],
                cell_records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What the device did to this cell's region since the mark (``cell_records``: every
    audit record since the mark, if already fetched)."""
    rid = rep.get("region")
    facts: dict[str, Any] = {}
    if rid is None:
        return facts
    if cell_records is None:
        cell_records = s.audit()
    recs = [r for r in cell_records if r.get("region") == int(rid)]
    kinds: dict[str, int] = {}
    written: set[int] = set()
    gens: dict[int, int] = {}
    inst = None
    for r in recs:
        k = str(r.get("kind"))
        if k == "create":
            inst = r.get("inst")   # the last instance of this id is the cell's region
    for r in recs:
        if inst is not None and r.get("inst") not in (inst, None):
            continue
        k = str(r.get("kind"))
        kinds[k] = kinds.get(k, 0) + 1
        if k == "access" and r.get("dir") == "w":
            written.add(int(r["gpa"]) // PAGE)
            g = int(r.get("gen", 0))
            gens[g] = gens.get(g, 0) + 1
    # the pages the driver registered: FOLL_LONGTERM may have migrated them first (out of
    # ZONE_MOVABLE), so the PFNs after registration are the truth where the workload has them
    registered = _pfn_set(rep.get("pfns_registered") or rep.get("pfns_before"))
    if rep.get("mode") == "odp":   # odp re-faults: any page the process mapped is legal
        registered |= _pfn_set(rep.get("pfns_after"), rep.get("pfns_after_touch"),
                               rep.get("pfns_after_event"), rep.get("pagemap_after_event"),
                               rep.get("pfns_parent_after_write"))
    outside = sorted(written - registered)
    viol = [v for v in s.violations() if inst is None or v.get("inst") == inst]
    resets = [r for r in cell_records if r.get("kind") == "reset"]
    facts.update(records=len(recs), truncated=len(cell_records) >= AUDIT_LIMIT,
                 kinds=kinds, pages_written=len(written), outside_registration=len(outside),
                 outside_pfns=outside[:16], write_gens=gens, violations=len(viol),
                 violation_samples=viol[:5], resets=len(resets))
    return facts


# --------------------------------------------------------------------- classification
def _pins(rep: dict[str, Any]) -> dict[str, int] | None:
    """FOLL_PIN balance: outstanding pins before the cell and after it (at exit)."""
    b, e = rep.get("vmstat_before"), rep.get("vmstat_end")
    if not b or not e:
        return None
    return {"before": b["nr_foll_pin_acquired"] - b["nr_foll_pin_released"],
            "after": e["nr_foll_pin_acquired"] - e["nr_foll_pin_released"]}


def classify_cell(cell: Cell, rep: dict[str, Any], dm: DmesgReport,
                  audit: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(outcome class, the facts that decided it)."""
    f: dict[str, Any] = {}
    sev = dm.severe()
    if "error" in rep:
        return "ERROR", {"workload_error": rep["error"]}
    if rep.get("errno") and rep.get("step") == "register":
        return f"PIN_REFUSED({rep.get('errno_name', rep['errno'])})", f
    if any(k in sev for k in ("BUG", "OOPS", "PANIC", "BAD_PAGE", "HUNG_TASK", "SOFT_LOCKUP",
                              "RCU_STALL")):
        return "KERNEL_ERROR", {"severe": {k: v[:5] for k, v in sev.items()}}
    if dm.lines.get("PAGE_POISON"):
        return "KERNEL_ERROR", {"page_poison": dm.lines["PAGE_POISON"][:5]}
    pins = _pins(rep)
    f["pins"] = pins
    if cell.mode in ("pin", "longterm") and pins and pins["after"] != pins["before"]:
        return "PINS_LEAKED", f
    if audit.get("violations"):
        return "DMA_AFTER_REVOKE", {"violations": audit["violation_samples"]}
    if audit.get("outside_registration"):
        return "DMA_OUTSIDE_REGISTRATION", {"outside_pfns": audit["outside_pfns"]}
    warn = bool(sev.get("WARN"))
    ext4_lines = dm.lines.get("EXT4_NO_BUFFERS", [])
    if ext4_lines and cell.event != "2018":
        # the 2018 bug reached by another path (e.g. reclaim writing the dirty page back
        # through ->writepage on 6.1, ref row 4e): judge it by the data on disk
        f.update(ext4_no_buffers=ext4_lines[:4], warn=sev.get("WARN", [])[:2],
                 file_after=rep.get("file_after"))
        last = 2 if cell.event not in ("dma-write",) else 1
        if not all_gen(rep.get("file_after"), last):
            return "EXT4_WARN_DATA_LOST", f
    if warn and not ext4_lines:
        return "KERNEL_ERROR", {"warn": sev["WARN"][:5]}

    revoked = bool(audit.get("kinds", {}).get("invalidate_ack"))
    f["invalidate_acks"] = audit.get("kinds", {}).get("invalidate_ack", 0)

    def ok(good: bool) -> str:
        if not good:
            return "WRITES_LOST_SILENTLY"
        return "REVOKED_IN_TIME" if cell.mode == "odp" and revoked else "COHERENT"

    ev = cell.event
    g2 = step(rep, "dma_write_g2")
    f["dma_g2"] = {k: g2.get(k) for k in ("errno", "errno_name", "status", "bytes")}
    n = int(rep.get("npages", 0))
    if ev == "dma-write":
        good = all_gen(rep.get("map_g1"), 1)
        if "file_after" in rep:
            good = good and all_gen(rep["file_after"], 1)
        return ok(good), f
    if ev == "truncate":
        kept = int(rep.get("kept_pages", 0))
        f["kept_g2"] = all_gen(rep.get("map_kept_g2"), 2)
        f["truncated_after_extend"] = states(rep.get("map_after_extend"))[kept:]
        if not f["kept_g2"]:
            return "WRITES_LOST_SILENTLY", f
        if g2.get("errno") == 0:
            # the device wrote every page, the file no longer has half of them
            return ok(all_gen(rep.get("map_after_extend"), 2, kept)), f
        return ("REVOKED_IN_TIME" if cell.mode == "odp" and revoked
                else f"DMA_FAILED({g2.get('errno_name')})"), f
    if ev in ("punch-hole", "punch-hole-partial"):
        f["map_after_punch"] = rep.get("map_after_punch")
        f["map_g2"] = rep.get("map_g2")
        f["file_after"] = rep.get("file_after")
        good = all_gen(rep.get("map_g2"), 2) and all_gen(rep.get("file_after"), 2)
        if g2.get("errno"):
            return f"DMA_FAILED({g2.get('errno_name')})", f
        return ok(good), f
    if ev in ("pageout", "memcg-reclaim", "drop-caches", "dontneed"):
        f["map_g2"] = rep.get("map_g2")
        f["pagemap_after_event"] = summarize_pagemap(rep.get("pagemap_after_event"))
        f["vmstat_event"] = rep.get("vmstat_event")
        for k in ("memcg_before", "memcg_registered", "memcg_after_reclaim"):
            if rep.get(k) is not None:
                f[k] = rep[k]
        f["pfns_changed"] = _changed(rep.get("pfns_before"), rep.get("pfns_after_touch"))
        good = all_gen(rep.get("map_g2"), 2)
        if "file_after" in rep:
            good = good and all_gen(rep["file_after"], 2)
        if g2.get("errno"):
            return f"DMA_FAILED({g2.get('errno_name')})", f
        return ok(good), f
    if ev == "writeback":
        f["disk_registered"] = rep.get("disk_registered")
        f["disk_released"] = rep.get("disk_released")
        f["stream_chunks"] = rep.get("stream_chunks")
        reg = all_gen(rep.get("disk_registered"), 2)
        rel = all_gen(rep.get("disk_released"), 2)
        if not rel:
            return "WRITES_LOST_SILENTLY", f
        return ok(True) if reg else "WRITEBACK_STALE", f
    if ev == "2018":
        f["ext4_no_buffers"] = dm.lines.get("EXT4_NO_BUFFERS", [])[:4]
        f["warn"] = sev.get("WARN", [])[:2]
        f["file_after"] = rep.get("file_after")
        f["dirty"] = step(rep, "dirty")
        f["pagemap_after_pageout"] = summarize_pagemap(rep.get("pagemap_after_event"))
        data_ok = all_gen(rep.get("file_after"), 2)
        if warn or f["ext4_no_buffers"]:
            return ("EXT4_WARN_DATA_LOST" if not data_ok else "KERNEL_ERROR"), f
        return ok(data_ok), f
    if ev == "migrate":
        f.update({k: rep.get(k) for k in ("pinned_moved", "control_moved", "vmstat_event")})
        f["soft_offline"] = {st["step"]: st.get("errno_name") or 0
                             for st in rep.get("steps", [])
                             if st["step"].startswith("soft_offline")}
        good = all_gen(rep.get("map_g2"), 2)
        if not good:
            return "WRITES_LOST_SILENTLY", f
        if rep.get("pinned_moved"):
            return ok(True), f
        if cell.mode == "odp":
            return "COHERENT", f   # nothing moved: no evidence either way
        # without an unregistered page that moved, "nothing moved" proves nothing
        return ("MIGRATION_FAILS" if rep.get("control_moved") else
                "MIGRATION_INCONCLUSIVE"), f
    if ev in ("fork", "fork-dontfork"):
        child = rep.get("child") or {}
        parent_ok = all_gen(rep.get("map_parent_g2"), 2)
        child_g2 = bool(child.get("mapped")) and all_gen(child.get("map"), 2)
        f.update(parent_g2=parent_ok, child_g2=child_g2, child_map=child.get("map"),
                 parent_map=rep.get("map_parent_g2"), child_status=rep.get("child_status"),
                 parent_pfns_changed=_changed(rep.get("pfns_before"),
                                              rep.get("pfns_parent_after_write")))
        if "error" in child:
            return "ERROR", f
        if not parent_ok:
            return ("PARENT_LOSES_WRITES" if child_g2 else "WRITES_LOST_SILENTLY"), f
        if child_g2 and cell.backing in PRIVATE_BACKINGS:
            return "CHILD_SEES_WRITES", f
        return ok(True), f
    if ev == "munmap":
        f["remap_g2"] = rep.get("remap_g2")
        if g2.get("errno"):
            return ("REVOKED_IN_TIME" if cell.mode == "odp" and revoked
                    else f"DMA_FAILED({g2.get('errno_name')})"), f
        if "remap_g2" in rep:
            return ok(all_gen(rep.get("remap_g2"), 2)), f
        # anonymous memory nobody maps any more: the device wrote into orphaned pages
        return "WRITES_LOST_SILENTLY", f
    if ev == "odirect-write":
        f.update({k: rep.get(k) for k in ("odirect_pages", "map_after_odirect", "map_g2",
                                          "file_after")})
        f["odirect"] = step(rep, "odirect_write")
        f["pfns_changed"] = _changed(rep.get("pfns_before"), rep.get("pfns_after_touch"))
        if g2.get("errno"):
            return f"DMA_FAILED({g2.get('errno_name')})", f
        return ok(all_gen(rep.get("map_g2"), 2) and all_gen(rep.get("file_after"), 2)), f
    if ev in ("exit", "oom"):
        return _classify_victim(cell, rep, audit, f)
    if ev == "mem-offline":
        off = rep.get("offline")
        f.update(blocks=rep.get("blocks"), offline=off, map_g2=rep.get("map_g2"),
                 movable_pages=rep.get("movable_pages"),
                 moved_at_registration=_changed(rep.get("pfns_before"),
                                                rep.get("pfns_registered")),
                 moved_by_offline=_changed(rep.get("pfns_registered"),
                                           rep.get("pfns_after_touch")),
                 migration_failures=dm.lines.get("MIGRATION_FAILURE", [])[:3])
        if not off:
            return "OFFLINE_INCONCLUSIVE", f   # no page was in a movable block
        if g2.get("errno"):
            return f"DMA_FAILED({g2.get('errno_name')})", f
        good = all_gen(rep.get("map_g2"), 2)
        if not good:
            return "WRITES_LOST_SILENTLY", f
        if all(o.get("result") == "ok" for o in off):
            return ("REVOKED_IN_TIME" if cell.mode == "odp" and revoked
                    else "OFFLINE_SUCCEEDS"), f
        return "OFFLINE_BLOCKED", f
    if ev == "seal-write":
        st = step(rep, "seal_write")
        f["seal"] = st
        f["file_g2"] = rep.get("file_g2")
        if st.get("errno"):
            return f"SEAL_REFUSED({st.get('errno_name')})", f
        return "SEAL_APPLIED", f
    if ev == "no-ack":
        madv = step(rep, "madv_dontneed")
        f["madv_dontneed_ms"] = madv.get("ms")
        f["escalation_lines"] = [ln for ln in dm.pinlab_lines
                                 if any(x in ln for x in ESCALATION_LINES)][:4]
        f["query_after_event"] = rep.get("query_after_event")
        f["resets"] = audit.get("resets")
        failed = (rep.get("query_after_event") or {}).get("state") == 1
        if f["escalation_lines"] and (failed or g2.get("errno")):
            return "ESCALATED_RESET", f
        return ok(all_gen(rep.get("map_g2"), 2)), f
    if ev in ("hot-unplug", "pci-remove"):
        f.update({k: rep.get(k) for k in ("gone", "gone_after_ms", "dev_node_exists")})
        f["deregister"] = step(rep, "deregister")
        f["removed_line"] = [ln for ln in dm.pinlab_lines if "removed" in ln][:2]
        if not rep.get("gone"):
            return "DEVICE_NOT_REMOVED", f
        return "DEVICE_GONE_CLEAN", f
    return "ERROR", {"unknown_event": ev, "n": n}


def _outstanding(vm: dict[str, int] | None) -> int | None:
    if not vm:
        return None
    return vm["nr_foll_pin_acquired"] - vm["nr_foll_pin_released"]


def _classify_victim(cell: Cell, rep: dict[str, Any], audit: dict[str, Any],
                     f: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """exit / oom: a second process registered a region and died without deregistering."""
    victim = rep.get("victim") or {}
    va = audit.get("victim") or {}
    f.update(victim_status=rep.get("victim_status"), victim_signal=rep.get("victim_signal"),
             victim_exit_ms=rep.get("victim_exit_ms"), oom_events=rep.get("oom_events"),
             victim_audit=va.get("kinds"), victim_violations=va.get("violations"),
             pins_victim=[_outstanding(rep.get("vmstat_before_victim")),
                          _outstanding(rep.get("vmstat_victim_registered")),
                          _outstanding(rep.get("vmstat_victim_gone"))])
    before, after = rep.get("nonblock_refused_before"), rep.get("nonblock_refused_after")
    if isinstance(before, int) and isinstance(after, int):
        f["nonblock_invalidations_refused"] = after - before
    if "error" in victim or not isinstance(rep.get("victim_status"), int):
        return "ERROR", {**f, "victim": victim}
    if va.get("violations"):
        return "DMA_AFTER_REVOKE", {**f, "violations": va.get("violation_samples")}
    if cell.event == "oom" and not (rep.get("oom_events") or {}).get("oom_kill"):
        return "OOM_NOT_TRIGGERED", f
    b, _, g = f["pins_victim"]
    if cell.mode in ("pin", "longterm") and b is not None and g != b:
        return "PINS_LEAKED", f
    kinds = va.get("kinds") or {}
    if not kinds.get("destroy"):
        return "REGION_NOT_RELEASED", f
    if cell.mode == "odp" and kinds.get("invalidate_ack"):
        return "REVOKED_IN_TIME", f
    return "RELEASED_AT_EXIT", f


def _changed(a: list[Any] | None, b: list[Any] | None) -> int | None:
    if not a or not b:
        return None
    return sum(1 for x, y in zip(a, b, strict=False) if x != y)


def summarize_pagemap(pm: list[Any] | None) -> dict[str, int] | None:
    if pm is None:
        return None
    out = {"present": 0, "swap": 0, "absent": 0}
    for p in pm:
        out["present" if isinstance(p, int) else "swap" if p == "swap" else "absent"] += 1
    return out


# --------------------------------------------------------------------- running a cell
def _dmesg_since(s: GuestSession, mark: int, art: Path) -> DmesgReport:
    text = s.dmesg_since(mark)
    (art / "dmesg.txt").write_text(text)
    return classify(text)


def _cell_args(cell: Cell) -> list[str]:
    return ["cell", "--mode", cell.mode, "--backing", cell.backing, "--event", cell.event]


def _finish(s: GuestSession, cell: Cell, art: Path, rep: dict[str, Any], mark: int,
            extra: dict[str, Any] | None = None) -> Observation:
    (art / "workload.json").write_text(json.dumps(rep, indent=2, default=str))
    dm = _dmesg_since(s, mark, art)
    try:
        records = s.audit()
        with (art / "audit.jsonl").open("w") as fh:   # the cell's extract of the audit log
            for r in records:
                fh.write(json.dumps(r, separators=(",", ":")) + "\n")
        audit = audit_facts(s, rep, records)
        victim = rep.get("victim")
        if isinstance(victim, dict) and victim.get("region") is not None:
            audit["victim"] = audit_facts(s, {"region": victim["region"], "mode": cell.mode,
                                              "pfns_before": victim.get("pfns")}, records)
    except Exception as exc:  # noqa: BLE001 - the device may be gone (hot-unplug)
        audit = {"unavailable": repr(exc)}
    observed, facts = classify_cell(cell, rep, dm, audit)
    ev: dict[str, Any] = {
        "facts": facts, "dmesg": dm.summary(), "audit": audit,
        "workload": {k: rep.get(k) for k in ("errno", "errno_name", "step", "region",
                                             "error", "cell_ms", "register_ms", "kernel",
                                             "leftover_mounts", "swaps")},
        "steps": rep.get("steps"), "query_final": rep.get("query_final"),
    }
    if dm.pinlab_lines:
        ev["dmesg_pinlab"] = dm.pinlab_lines[:10]
    if extra:
        ev.update(extra)
    return Observation(observed, ev)


def run_cell(s: GuestSession, cell: Cell, art: Path) -> Observation:
    """The generic scenario: the whole cell runs in the guest workload."""
    art.mkdir(parents=True, exist_ok=True)
    s.mark()
    mark = s.dmesg_mark()
    rep = s.workload(*_cell_args(cell), timeout=300)
    return _finish(s, cell, art, rep, mark)


def no_ack(s: GuestSession, cell: Cell, art: Path) -> Observation:
    """odp: the device never acknowledges INVALIDATE; the driver must escalate."""
    art.mkdir(parents=True, exist_ok=True)
    s.mark()
    mark = s.dmesg_mark()
    s.device("set-fault", **{"never-ack-revoke": True})
    try:
        rep = s.workload(*_cell_args(cell), timeout=300)
    finally:
        s.device("clear-fault", names=["never-ack-revoke"])
    return _finish(s, cell, art, rep, mark)


def _pinlab_bdf(s: GuestSession) -> str:
    out = s.guest.ssh.run("ls /sys/bus/pci/drivers/pinlab/ | grep -E '^[0-9a-f]{4}:'",
                          timeout=30).out.split()
    if not out:
        raise RuntimeError("no PCI function bound to pinlab")
    return out[0]


def hot_unplug(s: GuestSession, cell: Cell, art: Path) -> Observation:
    """Remove the device mid-stream.

    ``hot-unplug``: QMP device_del of "pinlab0" (the guest has no device afterwards: the
    runner must reboot). ``pci-remove``: the guest removes the PCI function through sysfs
    (the driver's remove() runs while the device still exists), then rescans, so the
    guest stays usable.
    """
    art.mkdir(parents=True, exist_ok=True)
    s.mark()
    mark = s.dmesg_mark()
    ssh = s.guest.ssh
    bdf = _pinlab_bdf(s)
    cmd = (f"rm -f {READY_FILE} {OUT_FILE}; nohup python3 {GUEST_DIR}/workload.py "
           + " ".join(shlex.quote(a) for a in _cell_args(cell))
           + f" > {OUT_FILE} 2>&1 < /dev/null &")
    ssh.run(cmd, timeout=30, check=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if ssh.run(f"test -e {READY_FILE}", timeout=30).rc == 0:
            break
        time.sleep(0.2)
    else:
        raise RuntimeError("hot-unplug: workload never became ready: "
                           + ssh.run(f"cat {OUT_FILE}", timeout=30).out[-2000:])
    t_del = time.monotonic()
    extra: dict[str, Any] = {"bdf": bdf, "needs_reboot": cell.event == "hot-unplug"}
    if cell.event == "hot-unplug":
        extra["device_del"] = s.guest.qmp.cmd("device_del", id="pinlab0")
    else:
        r = ssh.run(f"echo 1 > /sys/bus/pci/devices/{bdf}/remove", timeout=120)
        extra["sysfs_remove"] = {"rc": r.rc, "err": r.err.strip()[-500:],
                                 "seconds": round(time.monotonic() - t_del, 2)}
    rep: dict[str, Any] | None = None
    while time.monotonic() - t_del < 120:
        dead = s.guest.dead()
        if dead:
            # QEMU (or the device server) died: that is the observation, not an error
            extra["dead"] = dead.splitlines()[-3:]
            qlog = s.guest.artifacts / "qemu.log"
            if qlog.exists():
                extra["qemu_log_tail"] = qlog.read_text(errors="replace").splitlines()[-2:]
            (art / "qemu-tail.txt").write_text(dead)
            return Observation("QEMU_CRASHED", extra)
        try:
            out = ssh.run(f"cat {OUT_FILE}", timeout=30).out
        except Exception:  # noqa: BLE001 - re-checked by dead() on the next pass
            time.sleep(0.5)
            continue
        lines = [ln for ln in out.splitlines() if ln.strip().startswith("{")]
        if lines:
            try:
                rep = json.loads(lines[-1])
                break
            except json.JSONDecodeError:
                pass
        time.sleep(0.5)
    if rep is None:
        raise RuntimeError("hot-unplug: no report from the workload")
    extra["report_after_s"] = round(time.monotonic() - t_del, 1)
    if cell.event == "hot-unplug":
        extra["device_deleted_events"] = len(
            [e for e in s.guest.qmp.events() if e.get("event") == "DEVICE_DELETED"])
    obs = _finish(s, cell, art, rep, mark, extra)
    # bring the device back for the next cell (the guest is rebooted if that fails)
    if cell.event == "pci-remove":
        ssh.run("echo 1 > /sys/bus/pci/rescan; for i in $(seq 100); do "
                "[ -c /dev/pinlab0 ] && exit 0; sleep 0.1; done; exit 1", timeout=60)
    elif not s.guest.dead():
        try:
            s.guest.replug_device()
            obs.evidence["needs_reboot"] = False
            obs.evidence["replugged"] = True
        except Exception as exc:  # noqa: BLE001 - the pool reboots instead
            obs.evidence["replug_error"] = repr(exc)
    return obs


HOTPLUG_MB = 256          # the DIMM a mem-offline cell hot-adds (2 memory blocks on x86)
AUTO_ONLINE = "/sys/devices/system/memory/auto_online_blocks"


MEM_ID, DIMM_ID = "pinlab-hp-mem", "pinlab-hp-dimm"


def hot_add_dimm(g: Guest) -> str:
    """Hot-add a HOTPLUG_MB DIMM (QMP object-add + device_add pc-dimm) that the guest
    onlines as ZONE_MOVABLE. Returns the guest's previous auto_online_blocks policy (for
    remove_dimm). Raises QMPError, SSHError."""
    assert g.qmp
    old = g.ssh.run(f"cat {AUTO_ONLINE}", check=True).out.strip()
    g.ssh.run(f"echo online_movable > {AUTO_ONLINE}", check=True)
    try:
        g.qmp.cmd("object-add", **{"qom-type": "memory-backend-memfd", "id": MEM_ID,
                                   "size": HOTPLUG_MB << 20, "share": True})
        g.qmp.cmd("device_add", driver="pc-dimm", id=DIMM_ID, memdev=MEM_ID)
    except BaseException:
        g.ssh.run(f"echo {shlex.quote(old)} > {AUTO_ONLINE}")
        raise
    return old


def remove_dimm(g: Guest, timeout: float = 30) -> float:
    """device_del the hot-added DIMM, wait until the guest ejected it, drop its memory
    backend. Returns the seconds it took. Raises RuntimeError after ``timeout`` s."""
    assert g.qmp
    t0 = time.monotonic()
    g.qmp.cmd("device_del", id=DIMM_ID)
    while not any(e.get("event") == "DEVICE_DELETED"
                  and (e.get("data") or {}).get("device") == DIMM_ID
                  for e in g.qmp.events()):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the guest did not eject the DIMM within {timeout:.0f} s")
        time.sleep(0.1)
    g.qmp.cmd("object-del", id=MEM_ID)
    return round(time.monotonic() - t0, 2)


def mem_offline(s: GuestSession, cell: Cell, art: Path) -> Observation:
    """Memory offline of a ZONE_MOVABLE block that holds the registered pages (ref rows
    7b/7c). The host hot-adds a DIMM (hot_add_dimm) that the guest onlines movable; the
    workload touches its pages there, registers, offlines their blocks (a blocked offline
    is interrupted after 3 s); then the host removes the DIMM again, so the next cell sees
    the guest's usual memory layout."""
    art.mkdir(parents=True, exist_ok=True)
    s.mark()
    mark = s.dmesg_mark()
    g = s.guest
    extra: dict[str, Any] = {"needs_reboot": True}   # until the DIMM is gone again
    old = hot_add_dimm(g)
    try:
        rep = s.workload(*_cell_args(cell), timeout=300)
    finally:
        g.ssh.run(f"echo {shlex.quote(old)} > {AUTO_ONLINE}")
    try:
        extra.update(needs_reboot=False, dimm_removed_s=remove_dimm(g))
    except Exception as exc:  # noqa: BLE001 - the pool reboots instead
        extra["needs_reboot"] = True
        extra["dimm_remove_error"] = repr(exc)
    return _finish(s, cell, art, rep, mark, extra)


SCENARIOS: dict[str, Callable[[GuestSession, Cell, Path], Observation]] = {
    **dict.fromkeys(EVENTS, run_cell),
    "hot-unplug": hot_unplug,
    "pci-remove": hot_unplug,
    "no-ack": no_ack,
    "mem-offline": mem_offline,
}
