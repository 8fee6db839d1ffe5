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

from .classify import audit_facts, classify_cell
from .dmesg import DmesgReport, classify
from .expectations import Cell
from .session import GUEST_DIR, GuestSession
from .vm import Guest

AUDIT_LIMIT = 100_000   # records of one cell's audit extract at most
READY_FILE = "/tmp/pinlab-cell.ready"
OUT_FILE = "/tmp/pinlab-cell.out"
# events whose cell the workload can run in one go (the rest need the host mid-cell)
EVENTS = ["dma-write", "truncate", "punch-hole", "punch-hole-partial", "pageout",
          "memcg-reclaim", "drop-caches", "writeback", "2018", "migrate", "fork",
          "fork-dontfork", "munmap", "dontneed", "seal-write", "odirect-write", "exit", "oom"]
# fsdax: a truncate whose pins are never dropped; the guest is rebooted after it when the
# truncate blocked (a killed layout break, a hung-task candidate: nothing of it may reach
# the next cell)
NEVER_UNPIN = "truncate-never-unpin"


@dataclass
class Observation:
    observed: str
    evidence: dict[str, Any] = field(default_factory=dict)


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
        since = s.audit_since
        records = s.audit(limit=AUDIT_LIMIT)
        violations = s.violations()
        with (art / "audit.jsonl").open("w") as fh:   # the cell's extract of the audit log
            for r in records:
                fh.write(json.dumps(r, separators=(",", ":")) + "\n")
        audit = audit_facts(rep, records, violations, since, AUDIT_LIMIT)
        victim = rep.get("victim")
        if isinstance(victim, dict) and victim.get("region") is not None:
            audit["victim"] = audit_facts({"mode": cell.mode, "pfns_before": victim.get("pfns")},
                                          records, violations, since, AUDIT_LIMIT,
                                          region=victim["region"])
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
    """Memory offline of a ZONE_MOVABLE block that holds the registered pages
    (docs/pinning-semantics.md rows 26-28). The host hot-adds a DIMM (hot_add_dimm) that the
    guest onlines movable; the workload touches its pages there, registers, offlines their
    blocks (a blocked offline is interrupted after 3 s); then the host removes the DIMM
    again, so the next cell sees the guest's usual memory layout."""
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


def never_unpin(s: GuestSession, cell: Cell, art: Path) -> Observation:
    """fsdax truncate-never-unpin: the generic cell, whose truncate the guest watches for
    pinlab_dax.NEVER_S seconds and then kills (images/guest/pinlab_dax.py
    watch_never_released). A truncate that blocked gets the guest rebooted before the next
    cell (``needs_reboot``); the wait's state, wchan and stack stay in the cell's report."""
    obs = run_cell(s, cell, art)
    blocked = (obs.evidence.get("facts") or {}).get("blocked")
    if isinstance(blocked, dict) and blocked.get("still_blocked_at_ms") is not None:
        obs.evidence["needs_reboot"] = True
        obs.evidence["reboot_reason"] = "its truncate never returned (killed)"
    return obs


SCENARIOS: dict[str, Callable[[GuestSession, Cell, Path], Observation]] = {
    **dict.fromkeys(EVENTS, run_cell),
    "hot-unplug": hot_unplug,
    "pci-remove": hot_unplug,
    "no-ack": no_ack,
    "mem-offline": mem_offline,
    NEVER_UNPIN: never_unpin,
}
