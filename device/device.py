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
from .limits import AUDIT_FILE_MAX, MAX_DMA_MAPS, MAX_FD_DMA_MAPS
from .memory import GuestMemory
from .pci import PciFunction, check_irq_mode

log = logging.getLogger("pinlab.device")

Listener = Callable[[str, dict[str, Any], float], None]
# query-status lists at most this many DMA maps (``dma_map_count`` has them all)
STATUS_MAPS = 64


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

    def __init__(self, audit_path: str | None = None, irq: str = "msix",
                 audit_max: int = AUDIT_FILE_MAX, mirror: bool = False) -> None:
        self.irq_mode = check_irq_mode(irq)
        self.events = EventHub()
        # set by the vfio-user server: disconnects the client (never blocks)
        self.fail_client: Callable[[str], None] | None = None
        self.mappings_lost = 0
        self._lost_reported = -1
        self.memory = GuestMemory(MAX_DMA_MAPS, on_lost=self._mapping_lost,
                                  max_fd_maps=MAX_FD_DMA_MAPS)
        self.irq = IrqTable(irq)
        self.faults = Faults()
        self.audit = AuditLog(audit_path, on_violation=lambda r: self.events.emit("VIOLATION", r),
                              file_max=audit_max)
        self.engine = Engine(self.memory, self.irq, self.audit, self.faults, self.events.emit)
        self.pci = PciFunction(self.engine.bar0_read, self.engine.bar0_write, irq, mirror)
        self.connections = 0
        self.connected = False

    def _mapping_lost(self, why: str) -> None:
        """A guest RAM file shrank under an access (GuestMemory holds its lock): fail the
        connection; the accesses already fail with DMA_ERROR / a fatal device error."""
        self.mappings_lost += 1
        if self._lost_reported != self.connections:  # one event per connection
            self._lost_reported = self.connections
            self.events.emit("CLIENT_ERROR", {"reason": why})
        if self.fail_client is not None:
            self.fail_client(why)

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
            "dma_maps": self.memory.mappings(STATUS_MAPS), "dma_map_count": len(self.memory),
            "mappings_lost": self.mappings_lost,
            "irq_mode": self.irq_mode,
            # "msix" describes the interrupt vectors of either mode (the name predates MSI)
            "msix": {"enabled": (self.pci.config.msix_enabled if self.irq_mode == "msix"
                                 else self.pci.config.msi_enabled),
                     "assigned": self.irq.assigned(self.irq.index),
                     "triggered": list(self.irq.triggered), **self.irq.counters()},
        }
