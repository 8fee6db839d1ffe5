"""Event ``hot-unplug-loop``.

QMP device_del and device_add of the device ten times (hotplug_loop.CYCLES) while a
registration streams, with MSI (the matrix's device). Each cycle is judged like
``hot-unplug`` (kernel errors, the removal seen by the workload, no DMA after it in the
audit, FOLL_PIN counters back for pin and longterm) and on the host (QMP DEVICE_DELETED,
no file of the driver left open once the workload exited, so every region's pins and
mmu_interval_notifier are gone, and the driver bound again after device_add); the cell's
class is the first failing cycle's (scenario.hot_unplug_loop, orchestrator/hotplug_loop.py).
The loop exercises the device and its driver, not memory management: anon, the simplest
backing, in every mode (each mode tears its registration down differently).
"""

from __future__ import annotations

from . import Event
from .ev_hot_unplug import classify

EVENT = Event(
    "hot-unplug-loop",
    order=62,
    backings=("anon",),
    classify=classify,
    scenario="hot_unplug_loop",
    shared_checks=False,
)
