"""Event ``hot-unplug-loop-msix``.

The ``hot-unplug-loop`` cycles with the device's MSI-X (the device server's default)
instead of MSI: QEMU 11.1.3's vfio-user-pci client aborts on device_del of an MSI-X
device (``memory_region_del_subregion: Assertion 'subregion->container == mr' failed``,
README.md "The matrix", tests/unit/test_device_qemu.py QemuHotUnplugTest), so the known
outcome is QEMU_CRASHED, judged only on positive evidence (QEMU's SIGABRT exit or the
assertion line in qemu.log, hotplug_loop.abort_evidence). The cell's evidence records the
cycle it happened in. The abort is in QEMU's teardown of the device, whatever the guest
registered: one cell per kernel (anon, pin) keeps its cost (a guest boot each) low. The
pool boots an MSI-X guest for it and a fresh MSI guest for the next cell; its order, just
before ``hot-unplug-loop``, makes every run of both events show that recovery.
"""

from __future__ import annotations

from . import Event
from .ev_hot_unplug import classify

EVENT = Event(
    "hot-unplug-loop-msix",
    order=61,
    backings=("anon",),
    modes=("pin",),
    classify=classify,
    scenario="hot_unplug_loop",
    shared_checks=False,
    irq="msix",
)
