"""The whole device: guest memory, interrupts, PCI function, engine, audit, events."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .audit import AuditLog
from .engine import Engine
from .faults import Faults
from .irq import IrqTable
from .memory import GuestMemory
from .pci import PciFunction, check_irq_mode

log = logging.getLogger("pinlab.device")

Listener = Callable[[str, dict[str, Any], float], None]


class EventHub:
    """Fan-out of asynchronous device events (to QMP control clients)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def subscribe(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.append(fn)

    def unsubscribe(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        now = time.time()
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(name, data, now)
            except Exception:
                log.exception("event listener failed")


class Device:
    """``irq``: ``"msix"`` (default, MSI-X capability + BAR2) or ``"msi"`` (MSI capability,
    no BAR2; QEMU 11.1's vfio-user-pci aborts on device_del of a device with MSI-X)."""

    def __init__(self, audit_path: str | None = None, irq: str = "msix") -> None:
        self.irq_mode = check_irq_mode(irq)
        self.events = EventHub()
        self.memory = GuestMemory()
        self.irq = IrqTable(irq)
        self.faults = Faults()
        self.audit = AuditLog(audit_path, on_violation=lambda r: self.events.emit("VIOLATION", r))
        self.engine = Engine(self.memory, self.irq, self.audit, self.faults, self.events.emit)
        self.pci = PciFunction(self.engine.bar0_read, self.engine.bar0_write, irq)
        self.connections = 0
        self.connected = False

    def reset(self, source: str) -> None:
        """DEVICE_RESET: the engine drops everything; config space is left to the client."""
        self.engine.reset(source)

    def disconnect_cleanup(self) -> None:
        """Client went away: drop DMA maps and irq fds, keep device state (P17).

        Running streams and commands fail with DMA_ERROR on their next access."""
        self.memory.unmap_all()
        self.irq.close_all()

    def close(self) -> None:
        self.engine.shutdown()
        self.disconnect_cleanup()
        self.audit.close()

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected, "connections": self.connections,
            "engine": self.engine.describe(),
            "regions": self.engine.region_list(), "streams": self.engine.stream_list(),
            "audit": self.audit.stats(), "faults": self.faults.as_dict(),
            "dma_maps": self.memory.mappings(),
            "irq_mode": self.irq_mode,
            # "msix" describes the interrupt vectors of either mode (the name predates MSI)
            "msix": {"enabled": (self.pci.config.msix_enabled if self.irq_mode == "msix"
                                 else self.pci.config.msi_enabled),
                     "assigned": self.irq.assigned(self.irq.index),
                     "triggered": list(self.irq.triggered), "no_fd": self.irq.dropped},
        }
