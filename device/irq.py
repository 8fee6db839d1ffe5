"""Interrupts: the DEVICE_SET_IRQS eventfd table and vector triggering.

Every fd a client hands us for an interrupt is switched to non-blocking when it arrives,
so signalling it never blocks the device: an eventfd whose counter is at its maximum, or
a pipe or socket that is full, is an interrupt *coalesced* with the ones still pending
(counted in ``coalesced``); any other write error (e.g. the read end of a pipe) is
counted in ``write_errors``. Only eventfds, pipes/FIFOs and sockets are accepted
(eventfd(2) is what the vfio-user spec asks for); anything else is refused with EINVAL.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading

from . import protocol as P
from .protocol import MessageError, close_quietly

log = logging.getLogger("pinlab.device.irq")

# number of sub-indexes per irq index: INTx (pin 0, never used), MSI, MSI-X, ERR, REQ.
# Only one of MSI and MSI-X exists, depending on the device's irq mode.
VECTORS = 4
IRQ_COUNTS = {P.IRQ_INTX: 1, P.IRQ_MSI: 0, P.IRQ_MSIX: VECTORS, P.IRQ_ERR: 1, P.IRQ_REQ: 0}
MSI_IRQ_COUNTS = {**IRQ_COUNTS, P.IRQ_MSI: VECTORS, P.IRQ_MSIX: 0}
IRQ_FLAGS = {
    P.IRQ_INTX: P.IRQ_INFO_EVENTFD | P.IRQ_INFO_MASKABLE | P.IRQ_INFO_AUTOMASKED,
    P.IRQ_MSI: P.IRQ_INFO_EVENTFD,
    P.IRQ_MSIX: P.IRQ_INFO_EVENTFD,  # P: leave NORESIZE clear for MSI-X
    P.IRQ_ERR: P.IRQ_INFO_EVENTFD,
    P.IRQ_REQ: P.IRQ_INFO_EVENTFD,
}


class IrqTable:
    """eventfds per (index, sub-index). Thread-safe: triggers may come from any thread.

    ``irq`` is the device's interrupt mode: ``"msix"`` (4 MSI-X vectors, no MSI) or
    ``"msi"`` (4 MSI vectors, no MSI-X). The engine raises its vectors with
    :meth:`signal`, which picks the index of the mode."""

    def __init__(self, irq: str = "msix") -> None:
        if irq not in ("msix", "msi"):
            raise ValueError(f"irq mode {irq!r}")
        self.mode = irq
        self.index = P.IRQ_MSIX if irq == "msix" else P.IRQ_MSI
        self.counts = IRQ_COUNTS if irq == "msix" else MSI_IRQ_COUNTS
        self._lock = threading.Lock()
        self._fds: dict[int, list[int | None]] = {i: [None] * n for i, n in self.counts.items()}
        self.triggered = [0] * VECTORS  # engine vectors raised (delivered or not)
        self.dropped = 0  # raised with no fd assigned
        self.coalesced = 0  # the fd was full (EAGAIN): merged with a pending interrupt
        self.write_errors = 0  # the fd refused the write otherwise

    def info(self, index: int) -> tuple[int, int]:
        if index not in self.counts:
            raise MessageError(errno.EINVAL, f"irq index {index} out of range")
        return IRQ_FLAGS[index], self.counts[index]

    def _set(self, index: int, sub: int, fd: int | None) -> None:
        old = self._fds[index][sub]
        self._fds[index][sub] = fd
        if old is not None and old != fd:
            close_quietly(old)

    def set_irqs(self, flags: int, index: int, start: int, count: int, fds: list[int],
                 data: bytes) -> None:
        """Apply one DEVICE_SET_IRQS. Takes ownership of ``fds`` (closed on error)."""
        try:
            self._set_irqs(flags, index, start, count, fds, data)
        except BaseException:
            for fd in fds:
                close_quietly(fd)
            raise

    def _set_irqs(self, flags: int, index: int, start: int, count: int, fds: list[int],
                  data: bytes) -> None:
        if index not in self.counts:
            raise MessageError(errno.EINVAL, f"irq index {index} out of range")
        dtype, action = flags & P.IRQ_SET_DATA_MASK, flags & P.IRQ_SET_ACTION_MASK_ALL
        if flags & ~(P.IRQ_SET_DATA_MASK | P.IRQ_SET_ACTION_MASK_ALL):
            raise MessageError(errno.EINVAL, f"unknown SET_IRQS flags {flags:#x}")
        if dtype not in (P.IRQ_SET_DATA_NONE, P.IRQ_SET_DATA_BOOL, P.IRQ_SET_DATA_EVENTFD):
            raise MessageError(errno.EINVAL, f"bad SET_IRQS data type {flags:#x}")
        if action not in (P.IRQ_SET_ACTION_MASK, P.IRQ_SET_ACTION_UNMASK,
                          P.IRQ_SET_ACTION_TRIGGER):
            raise MessageError(errno.EINVAL, f"bad SET_IRQS action {flags:#x}")
        total = self.counts[index]
        if start > total or count > total - start:
            raise MessageError(errno.EINVAL, f"irq range {start}+{count} > {total}")
        if dtype != P.IRQ_SET_DATA_EVENTFD and fds:
            raise MessageError(errno.EINVAL, "fds with a non-eventfd SET_IRQS")
        if dtype == P.IRQ_SET_DATA_BOOL and len(data) < count:
            raise MessageError(errno.EINVAL, "SET_IRQS bool data too short")
        for fd in fds:
            _prepare_fd(fd)
        with self._lock:
            if action == P.IRQ_SET_ACTION_TRIGGER:
                if dtype == P.IRQ_SET_DATA_EVENTFD:
                    if fds and len(fds) != count:
                        raise MessageError(errno.EINVAL, f"{len(fds)} fds for {count} irqs")
                    for i in range(count):  # P13: 0 fds de-assigns
                        self._set(index, start + i, fds[i] if fds else None)
                    return
                if dtype == P.IRQ_SET_DATA_NONE and count == 0:
                    for i in range(total):  # disable the whole index
                        self._set(index, i, None)
                    return
            elif dtype == P.IRQ_SET_DATA_EVENTFD:
                # EVENTFD|UNMASK carries the INTx resample fd: we have no INTx, drop it
                if len(fds) > count:
                    raise MessageError(errno.EINVAL, "too many fds")
                for fd in fds:
                    close_quietly(fd)
                return
        if action == P.IRQ_SET_ACTION_TRIGGER:  # loopback trigger (NONE or BOOL)
            for i in range(count):
                if dtype == P.IRQ_SET_DATA_NONE or data[i]:
                    self.trigger(index, start + i)
        # MASK/UNMASK with NONE/BOOL: only meaningful for INTx, which we do not have

    def trigger(self, index: int, sub: int) -> bool:
        """Signal one sub-index of one irq index (SET_IRQS loopback triggers). Returns
        False if no eventfd is assigned."""
        with self._lock:
            fds = self._fds.get(index)
            fd = fds[sub] if fds is not None and sub < len(fds) else None
            if index == self.index and sub < len(self.triggered):
                self.triggered[sub] += 1
            return self._write(fd, index, sub)

    def signal(self, vector: int) -> bool:
        """Raise engine vector ``vector`` (0 = CQ, 1 = EQ). Returns False if no eventfd
        is assigned.

        MSI-X: the vector's own eventfd. MSI: the guest may have enabled fewer vectors
        than the device offers (x86 Linux grants one MSI vector without interrupt
        remapping); a vector without an eventfd is then sent on vector 0."""
        with self._lock:
            fds = self._fds[self.index]
            fd = fds[vector] if vector < len(fds) else None
            if fd is None and self.mode == "msi" and vector:
                fd = fds[0]
            if vector < len(self.triggered):
                self.triggered[vector] += 1
            return self._write(fd, self.index, vector)

    def _write(self, fd: int | None, index: int, sub: int) -> bool:
        """Caller holds ``_lock``."""
        if fd is None:
            self.dropped += 1
            return False
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:  # counter at its maximum, pipe full: coalesced
            self.coalesced += 1
            return False
        except OSError as exc:
            self.write_errors += 1
            if self.write_errors <= 10:
                log.warning("irq %d/%d: eventfd write failed: %s", index, sub, exc)
            return False
        return True

    def counters(self) -> dict[str, int]:
        """Interrupts not delivered: ``no_fd``, ``coalesced`` (fd full), ``write_errors``."""
        return {"no_fd": self.dropped, "coalesced": self.coalesced,
                "write_errors": self.write_errors}

    def assigned(self, index: int) -> list[bool]:
        with self._lock:
            return [fd is not None for fd in self._fds[index]]

    def close_all(self) -> None:
        with self._lock:
            for index, fds in self._fds.items():
                for i in range(len(fds)):
                    self._set(index, i, None)


def _prepare_fd(fd: int) -> None:
    """Refuse an fd that is not an eventfd, pipe/FIFO or socket; make it non-blocking.

    Raises MessageError(EINVAL)."""
    try:
        mode = os.fstat(fd).st_mode
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise MessageError(errno.EINVAL, f"SET_IRQS fd: {exc}") from exc
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or kind == "anon_inode:[eventfd]"):
        raise MessageError(errno.EINVAL, f"SET_IRQS fd is not an eventfd ({kind})")
    try:
        os.set_blocking(fd, False)  # O_NONBLOCK: a full fd is EAGAIN, never a hang
    except OSError as exc:
        raise MessageError(errno.EINVAL, f"SET_IRQS fd: {exc}") from exc
