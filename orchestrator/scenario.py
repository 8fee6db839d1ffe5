"""One cell of the matrix: run its experiment in a warm guest, classify what happened.

A scenario returns an ``Observation``: the outcome class it saw and the evidence behind it
(workload report, dmesg classes, audit-log facts). It never decides pass/fail; the verdict
layer compares the class with the expectations table.

Every event runs the guest's ``pinlab.guest.workload cell`` (guest/pinlab_cell.py and the
event's steps, guest/events/), which reports raw observations; ``classify_cell`` turns
them, the dmesg lines the cell added and the device's audit facts into one outcome class
(the classes are documented in the header of ``data/expectations.toml``). Which function
here runs an event is its ``Event.scenario`` (orchestrator/events/): ``run_cell`` for most;
``hot_unplug``, ``no_ack`` and ``mem_offline`` also act on the host side (QMP
``device_del``, device fault injection, a hot-added DIMM).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pinlab.common import jsonlines
from pinlab.common.vocab import Key, Outcome

from . import hotplug_loop
from .classify import audit_facts, classify_cell
from .dmesg import DmesgReport, classify
from .expectations import Cell
from .guestenv import irq_of
from .qmp import QMPError
from .session import GuestSession, WorkloadError
from .vm import DEVICE_ID, Guest

AUDIT_LIMIT = 100_000   # records of one cell's audit extract at most
PINLAB_DRIVER_DIR = "/sys/bus/pci/drivers/pinlab"
PCI_DEVICES = "/sys/bus/pci/devices"
PCI_RESCAN = "/sys/bus/pci/rescan"
BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


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
    return (["cell", "--mode", cell.mode, "--backing", cell.backing, "--event", cell.event]
            + (["--options", cell.options] if cell.options else []))


def _finish(s: GuestSession, cell: Cell, art: Path, rep: dict[str, Any], mark: int,
            extra: dict[str, Any] | None = None) -> Observation:
    (art / "workload.json").write_text(json.dumps(rep, indent=2, default=str))
    dm = _dmesg_since(s, mark, art)
    try:
        since = s.audit_since
        records = s.audit(limit=AUDIT_LIMIT)
        violations = s.violations()
        with (art / "audit.jsonl").open("wb") as fh:   # the cell's extract of the audit log
            for r in records:
                fh.write(jsonlines.encode(r, compact=True))
        audit = audit_facts(rep, records, violations, since, AUDIT_LIMIT)
        victim = rep.get(Key.VICTIM)
        if isinstance(victim, dict) and victim.get(Key.REGION) is not None:
            audit["victim"] = audit_facts({"mode": cell.mode, "pfns_before": victim.get(Key.PFNS)},
                                          records, violations, since, AUDIT_LIMIT,
                                          region=victim[Key.REGION])
    except Exception as exc:  # noqa: BLE001 - the device may be gone (hot-unplug)
        audit = {"unavailable": repr(exc)}
    observed, facts = classify_cell(cell, rep, dm, audit)
    ev: dict[str, Any] = {
        "facts": facts, "dmesg": dm.summary(), "audit": audit,
        "workload": {k: rep.get(k) for k in ("errno", "errno_name", "step", "region",
                                             "error", "cell_ms", "register_ms", "kernel",
                                             "leftover_mounts", "swaps")},
        "steps": rep.get(Key.STEPS), "query_final": rep.get(Key.QUERY_FINAL),
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
    names = s.agent.checked("listdir", path=PINLAB_DRIVER_DIR)["names"]
    bdfs = [n for n in names if BDF.match(n)]
    if not bdfs:
        raise RuntimeError("no PCI function bound to pinlab")
    return bdfs[0]


def hot_unplug(s: GuestSession, cell: Cell, art: Path) -> Observation:
    """Remove the device mid-stream.

    ``hot-unplug``: QMP device_del of "pinlab0" (the guest has no device afterwards: the
    runner must reboot). ``pci-remove``: the guest removes the PCI function through sysfs
    (the driver's remove() runs while the device still exists), then rescans, so the
    guest stays usable.

    The workload runs as an asynchronous request to the guest agent: ``start``, then
    ``wait`` until it says it streams (pinlab_cell.notify_ready), then the removal, then
    ``wait`` for its report. Raises WorkloadError when the workload fails before the
    removal.
    """
    art.mkdir(parents=True, exist_ok=True)
    s.mark()
    mark = s.dmesg_mark()
    bdf = _pinlab_bdf(s)
    args = _cell_args(cell)
    job = s.workload_start(*args, timeout=300)
    extra: dict[str, Any] = {"bdf": bdf, "needs_reboot": cell.event == "hot-unplug",
                             "ready_ms": s.workload_ready(job, *args, timeout=60)}
    t_del = time.monotonic()
    if cell.event == "hot-unplug":
        extra["device_del"] = s.guest.qmp.cmd("device_del", id="pinlab0")
    else:
        r = s.agent.request("write", wait=150, path=f"{PCI_DEVICES}/{bdf}/remove", text="1")
        extra["sysfs_remove"] = {"rc": 0 if r.get("ok") else 1,
                                 "err": str(r.get("error", ""))[-500:],
                                 "seconds": round(time.monotonic() - t_del, 2)}
    try:
        rep = s.workload_wait(job, *args, timeout=120)
    except WorkloadError:
        dead = s.guest.dead()
        if not dead:
            raise
        # QEMU (or the device server) died: that is the observation, not an error
        extra["dead"] = dead.splitlines()[-3:]
        qlog = s.guest.artifacts / "qemu.log"
        if qlog.exists():
            extra["qemu_log_tail"] = qlog.read_text(errors="replace").splitlines()[-2:]
        (art / "qemu-tail.txt").write_text(dead)
        return Observation(Outcome.QEMU_CRASHED, extra)
    extra["report_after_s"] = round(time.monotonic() - t_del, 1)
    if cell.event == "hot-unplug":
        extra["device_deleted_events"] = len(
            [e for e in s.guest.qmp.events() if e.get("event") == "DEVICE_DELETED"])
    obs = _finish(s, cell, art, rep, mark, extra)
    # bring the device back for the next cell (the guest is rebooted if that fails)
    if cell.event == "pci-remove":
        s.agent.request("write", wait=90, path=PCI_RESCAN, text="1",
                        wait_for="/dev/pinlab0", wait_timeout=10)
    elif not s.guest.dead():
        try:
            s.guest.replug_device()
            obs.evidence["needs_reboot"] = False
            obs.evidence["replugged"] = True
        except Exception as exc:  # noqa: BLE001 - the pool reboots instead
            obs.evidence["replug_error"] = repr(exc)
    return obs


MODULE_REFCNT = "/sys/module/pinlab/refcnt"


def _qemu_death(s: GuestSession, art: Path, where: str,
                wait: float = 0.0) -> Observation | None:
    """None while QEMU and the device server live (after waiting up to ``wait`` s for
    them to be gone: a guest connection can break a moment before QEMU's exit status is
    there); else the observation of their death: QEMU_CRASHED only with positive evidence
    of an abort (hotplug_loop.abort_evidence: SIGABRT or glibc's assertion line in
    qemu.log), otherwise INCONCLUSIVE naming what exited. The tail of qemu.log is kept in
    ``art``/qemu-tail.txt."""
    g = s.guest
    t0 = time.monotonic()
    dead = g.dead()
    while not dead and time.monotonic() - t0 < wait:
        time.sleep(0.1)
        dead = g.dead()
    if not dead:
        return None
    qlog = g.artifacts / "qemu.log"
    text = qlog.read_text(errors="replace") if qlog.exists() else ""
    (art / "qemu-tail.txt").write_text(dead + "\n--- qemu.log tail ---\n" + text[-4000:])
    rc = g.qemu.returncode() if g.qemu else None
    ev: dict[str, Any] = {"dead": dead.splitlines()[-3:], "where": where,
                          "qemu_returncode": rc, "qemu_log_tail": text.splitlines()[-3:]}
    abort = hotplug_loop.abort_evidence(rc, text)
    if abort:
        ev["abort"] = abort
        return Observation(Outcome.QEMU_CRASHED, ev)
    return Observation(f"INCONCLUSIVE(guest died without an abort of QEMU: {dead[:80]})", ev)


def _deleted(s: GuestSession, timeout: float) -> bool:
    """Wait (at most ``timeout`` s) for QMP DEVICE_DELETED of the pinlab device; False
    at the deadline or when QEMU died."""
    assert s.guest.qmp
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(e.get("event") == "DEVICE_DELETED"
               and (e.get("data") or {}).get("device") == DEVICE_ID
               for e in s.guest.qmp.events()):
            return True
        if s.guest.dead():
            return False
        time.sleep(0.1)
    return False


def _unplug_cycle(s: GuestSession, cell: Cell, art: Path, n: int) -> tuple[Observation, bool]:
    """One cycle of the loop: a registration streams, QMP device_del, the workload's
    report, DEVICE_DELETED, the driver's module references, QMP device_add and the
    rebind. Returns (the cycle's observation, whether the guest still has the device)."""
    art.mkdir(parents=True, exist_ok=True)
    s.mark()
    mark = s.dmesg_mark()
    args = _cell_args(cell)
    t0 = time.monotonic()
    host: dict[str, Any] = {"cycle": n, "bdf": _pinlab_bdf(s)}
    s.guest.qmp.events()                      # drain: this cycle's DEVICE_DELETED only
    job = s.workload_start(*args, timeout=300)
    host["ready_ms"] = s.workload_ready(job, *args, timeout=60)
    try:
        s.guest.qmp.cmd("device_del", id=DEVICE_ID, timeout=30)
    except QMPError as exc:
        host["device_del_error"] = str(exc)
    try:
        rep = s.workload_wait(job, *args, timeout=120)
    except WorkloadError:
        died = _qemu_death(s, art, "device_del", wait=10)
        if died is None:
            raise
        died.evidence.update(host)
        return died, False
    host["device_deleted"] = _deleted(s, hotplug_loop.DELETED_TIMEOUT_S)
    died = _qemu_death(s, art, "device_del")
    if died is not None:
        died.evidence.update(host)
        return died, False
    refs = s.agent.checked("read", path=MODULE_REFCNT)["text"].strip()
    host["module_refs"] = int(refs) if refs.isdigit() else refs
    replug_mark = s.dmesg_mark()              # marks are read once: _finish reads ``mark``
    obs = _finish(s, cell, art, rep, mark)
    host["removed_s"] = round(time.monotonic() - t0, 2)
    guest_class = obs.observed
    plugged = False
    host.update(rebound=False, replug_severe=[])
    if guest_class == Outcome.DEVICE_GONE_CLEAN and host["device_deleted"]:
        t1 = time.monotonic()
        try:
            host["node"] = s.guest.replug_device(timeout=hotplug_loop.REPLUG_TIMEOUT_S)
            plugged = True
            host["rebound_bdf"] = _pinlab_bdf(s)
            host["rebound"] = host["node"] == "/dev/pinlab0"
        except Exception as exc:  # noqa: BLE001 - judged below: dead QEMU or no rebind
            host["replug_error"] = repr(exc)[-500:]
        host["replug_s"] = round(time.monotonic() - t1, 2)
        died = _qemu_death(s, art, "device_add")
        if died is not None:
            died.evidence.update(host)
            return died, False
        text = s.dmesg_since(replug_mark)
        (art / "dmesg-replug.txt").write_text(text)
        host["replug_severe"] = sorted(classify(text).severe())
    obs.evidence["host"] = host
    obs.observed = hotplug_loop.cycle_outcome(guest_class, host)
    return obs, plugged


def hot_unplug_loop(s: GuestSession, cell: Cell, art: Path) -> Observation:
    """Plug and unplug the device hotplug_loop.CYCLES times while a registration streams
    (events ``hot-unplug-loop``, MSI, and ``hot-unplug-loop-msix``, an MSI-X device that
    QEMU 11.1.3 aborts on). Each cycle (``_unplug_cycle``, artifacts in ``cycle-NN/``):
    the workload registers and streams, QMP device_del, the workload's report (the region
    failed or ENODEV), QMP DEVICE_DELETED, /sys/module/pinlab/refcnt 0 once the workload
    exited (every file of the driver released, with its pins and notifiers), the
    hot-unplug classifier on the report, dmesg and audit (kernel errors, DMA after the
    removal, FOLL_PIN counters), then QMP device_add and the driver bound again with
    /dev/pinlab0 and no kernel error. The loop stops at the first cycle that is not
    DEVICE_GONE_CLEAN; the cell's class is that cycle's (``failed_cycle``), or
    DEVICE_GONE_CLEAN. Every wait is bounded; a QEMU that died is QEMU_CRASHED only with
    positive evidence of an abort (``_qemu_death``); a cycle that raised (a hung guest, an
    agent that stopped answering) ends the loop as ERROR with the cycles so far and the
    console's tail; no cycle starts after hotplug_loop.LOOP_DEADLINE_S (INCONCLUSIVE).
    Unless the device is back in the guest, the pool reboots it (``needs_reboot``)."""
    art.mkdir(parents=True, exist_ok=True)
    cycles: list[dict[str, Any]] = []
    last: Observation | None = None
    plugged = True                            # the device is in the guest
    t0 = time.monotonic()
    for n in range(1, hotplug_loop.CYCLES + 1):
        if time.monotonic() - t0 > hotplug_loop.LOOP_DEADLINE_S:
            break                             # loop_outcome: INCONCLUSIVE, cut short
        t1 = time.monotonic()
        cart = art / f"cycle-{n:02d}"
        try:
            last, plugged = _unplug_cycle(s, cell, cart, n)
        except Exception as exc:  # noqa: BLE001 - a hung guest or agent: keep the loop's record
            died = _qemu_death(s, cart, "cycle", wait=5)
            last = died or Observation(Outcome.ERROR, {
                "exception": repr(exc)[-2000:], "broken": s.broken,
                "trace": traceback.format_exc()[-4000:]})
            with contextlib.suppress(Exception):
                (cart / "console-tail.txt").write_text(s.guest.console.tail(200))
            plugged = False
        cycles.append({"cycle": n, "observed": last.observed,
                       "seconds": round(time.monotonic() - t1, 1)})
        if last.observed != Outcome.DEVICE_GONE_CLEAN:
            break
    observed, failed = hotplug_loop.loop_outcome(cycles)
    ev = dict(last.evidence) if last is not None else {}
    ev.update(cycles=cycles, failed_cycle=failed, loop_s=round(time.monotonic() - t0, 1),
              irq=irq_of(s.guest.cfg.device_args), needs_reboot=not plugged)
    (art / "cycles.json").write_text(json.dumps(cycles, indent=2))
    return Observation(observed, ev)


HOTPLUG_MB = 256          # the DIMM a mem-offline cell hot-adds (2 memory blocks on x86)
AUTO_ONLINE = "/sys/devices/system/memory/auto_online_blocks"


MEM_ID, DIMM_ID = "pinlab-hp-mem", "pinlab-hp-dimm"


def hot_add_dimm(s: GuestSession) -> str:
    """Hot-add a HOTPLUG_MB DIMM (QMP object-add + device_add pc-dimm) that the guest
    onlines as ZONE_MOVABLE (its auto_online_blocks policy set through the guest agent).
    Returns the guest's previous policy (for restore_auto_online). Raises QMPError,
    AgentError."""
    g = s.guest
    assert g.qmp
    old = s.agent.checked("read", path=AUTO_ONLINE)["text"].strip()
    s.agent.checked("write", path=AUTO_ONLINE, text="online_movable")
    try:
        g.qmp.cmd("object-add", **{"qom-type": "memory-backend-memfd", "id": MEM_ID,
                                   "size": HOTPLUG_MB << 20, "share": True})
        g.qmp.cmd("device_add", driver="pc-dimm", id=DIMM_ID, memdev=MEM_ID)
    except BaseException:
        restore_auto_online(s, old)
        raise
    return old


def restore_auto_online(s: GuestSession, old: str) -> None:
    """Put back the guest's auto_online_blocks policy (best effort: a guest that went is
    rebooted anyway)."""
    with contextlib.suppress(Exception):
        s.agent.request("write", wait=30, path=AUTO_ONLINE, text=old)


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
    old = hot_add_dimm(s)
    try:
        rep = s.workload(*_cell_args(cell), timeout=300)
    finally:
        restore_auto_online(s, old)
    try:
        extra.update(needs_reboot=False, dimm_removed_s=remove_dimm(g))
    except Exception as exc:  # noqa: BLE001 - the pool reboots instead
        extra["needs_reboot"] = True
        extra["dimm_remove_error"] = repr(exc)
    return _finish(s, cell, art, rep, mark, extra)


def never_unpin(s: GuestSession, cell: Cell, art: Path) -> Observation:
    """fsdax truncate-never-unpin: the guest workload in one go, whose truncate the guest
    watches for pinlab_dax.NEVER_S seconds and then kills (guest/pinlab_dax.py
    watch_never_released). A truncate that was still blocked at the deadline gets the
    guest rebooted before the next cell (``needs_reboot``, ``reboot_reason``: a killed
    layout break, a hung-task candidate; nothing of it may reach the next cell); the
    wait's state, wchan and stack stay in the cell's report."""
    art.mkdir(parents=True, exist_ok=True)
    s.mark()
    mark = s.dmesg_mark()
    rep = s.workload(*_cell_args(cell), timeout=300)
    blocked = rep.get(Key.BLOCKED)
    extra: dict[str, Any] = {}
    if isinstance(blocked, dict) and blocked.get(Key.STILL_BLOCKED_AT_MS) is not None:
        extra = {"needs_reboot": True,
                 "reboot_reason": "its truncate never returned (killed)"}
    return _finish(s, cell, art, rep, mark, extra)
