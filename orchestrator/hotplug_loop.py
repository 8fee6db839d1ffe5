"""The verdict logic of the device hot-unplug loop (events ``hot-unplug-loop`` and
``hot-unplug-loop-msix``): what one plug/unplug cycle showed, which cycle failed first,
and whether a QEMU that went away left positive evidence of an abort.

Pure functions of the evidence the scenario (``scenario.hot_unplug_loop``) collects, so
that they can be tested without a guest. The loop itself: CYCLES times, a registration
streams (guest ``Cell.stream_until_removed``), QMP ``device_del`` removes the device, the
workload reports and exits, QMP ``device_add`` plugs it back in and the driver binds again.

QEMU 11.1.3's vfio-user-pci client aborts on ``device_del`` of an MSI-X device
(``memory_region_del_subregion: Assertion 'subregion->container == mr' failed``, from
``vfio_user_instance_finalize``); README.md ("The matrix") and
tests/unit/test_device_qemu.py ``QemuHotUnplugTest`` record it.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from pinlab.common.vocab import Outcome

CYCLES = 10                 # device_del + device_add per cell (issue 12 item 6)
DELETED_TIMEOUT_S = 60.0    # QMP DEVICE_DELETED after the workload saw the removal
REPLUG_TIMEOUT_S = 30.0     # device_add until the driver's char device is back
LOOP_DEADLINE_S = 480.0     # no cycle starts later (a cell may take 900 s, celltest.py)
# glibc's assert(): "<prog>: <file>:<line>: <func>: Assertion `<expr>' failed."
ASSERTION = re.compile(r"^.*Assertion [`'].*' failed\.?\s*$", re.MULTILINE)


def abort_evidence(returncode: int | None, log_text: str) -> dict[str, Any] | None:
    """Positive evidence that QEMU aborted, or None.

    ``returncode``: QEMU's exit status as ``subprocess.Popen.poll()`` gives it (None:
    still running; ``-N``: killed by signal N; a shell's ``128+N`` is read the same way);
    ``log_text``: QEMU's stderr (qemu.log). Evidence is an exit by SIGABRT together with
    glibc's ``Assertion ... failed`` line, or either one alone when the other is
    unavailable. Returns ``{"signal": name or None, "returncode": int, "assertion": line or
    None}``; None when QEMU runs, exited normally without an assertion line, or was killed
    by another signal (SIGTERM/SIGKILL from teardown, the OOM killer) without one."""
    if returncode is None:
        return None
    signo = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    sig = signal.Signals(signo).name if signo in {s.value for s in signal.Signals} else None
    found = ASSERTION.findall(log_text or "")
    assertion = found[-1].strip() if found else None
    if sig != "SIGABRT" and assertion is None:
        return None
    return {"signal": sig, "returncode": returncode, "assertion": assertion}


def cycle_outcome(guest_class: str, host: dict[str, Any]) -> str:
    """The outcome of one cycle.

    ``guest_class``: the removal's class from the workload report, dmesg and audit (the
    ``hot-unplug`` classifier: KERNEL_ERROR, DEVICE_NOT_REMOVED, DMA_AFTER_REVOKE,
    PINS_LEAKED, DEVICE_GONE_CLEAN or INCONCLUSIVE(...)). ``host``: what the host saw
    around it: ``device_deleted`` (QMP DEVICE_DELETED for the device: the guest ejected it
    and QEMU finalized it), ``module_refs`` (/sys/module/pinlab/refcnt once the workload
    exited: 0 means every file of the driver was released, and with it every region's
    pins and mmu_interval_notifier: kmod/pinlab_cdev.c pinlab_release, pinlab_region.c),
    ``rebound`` (after device_add a PCI function is bound to pinlab and /dev/pinlab0 is
    back),
    ``replug_severe`` (dmesg classes of a BUG/WARN/Oops logged around the device_add).
    Raises KeyError for a missing fact. A later check only runs when the earlier ones
    passed, so the class names the first thing that went wrong."""
    if guest_class != Outcome.DEVICE_GONE_CLEAN:
        return guest_class
    if not host["device_deleted"]:
        return Outcome.DEVICE_NOT_REMOVED
    if host["module_refs"] != 0:
        return Outcome.REGION_NOT_RELEASED
    if host["replug_severe"]:
        return Outcome.KERNEL_ERROR
    if not host["rebound"]:
        return Outcome.DEVICE_NOT_REPLUGGED
    return Outcome.DEVICE_GONE_CLEAN


def loop_outcome(cycles: list[dict[str, Any]], planned: int = CYCLES) -> tuple[str, int | None]:
    """The cell's class and the first failing cycle (1-based; None when all passed).

    ``cycles``: one ``{"cycle": n, "observed": class}`` per cycle run, in order (the loop
    stops after the first one that is not DEVICE_GONE_CLEAN). DEVICE_GONE_CLEAN only when
    ``planned`` cycles all ended clean; fewer clean cycles and no failure (the loop was cut
    short) is INCONCLUSIVE. Raises ValueError for cycles out of order."""
    for i, c in enumerate(cycles, 1):
        if c.get("cycle") != i:
            raise ValueError(f"cycle {i} reported as {c.get('cycle')!r}")
        if c.get("observed") != Outcome.DEVICE_GONE_CLEAN:
            return str(c.get("observed")), i
    if len(cycles) < planned:
        return f"INCONCLUSIVE(only {len(cycles)} of {planned} cycles ran)", None
    return Outcome.DEVICE_GONE_CLEAN, None
