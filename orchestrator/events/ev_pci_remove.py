"""Event ``pci-remove``.

The guest removes the PCI function through sysfs (then rescans): the same driver
remove() path as hot-unplug without QMP device_del, which crashes QEMU 11.1's
vfio-user-pci. anon, as hot-unplug.
"""

from __future__ import annotations

from . import Event
from .ev_hot_unplug import classify

EVENT = Event(
    "pci-remove",
    order=17,
    backings=("anon",),
    classify=classify,
    scenario="hot_unplug",
    shared_checks=False,
)
