"""PCI function: config space with real masks, the MSI-X BAR, and region dispatch.

Two interrupt modes (``irq``): ``"msix"`` (default) has an MSI-X capability whose table
and PBA live in BAR2; ``"msi"`` has an MSI capability instead and no BAR2. QEMU emulates
the body of either capability and tells us the eventfds with DEVICE_SET_IRQS.
"""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Callable

from pinlab.common.uapi import DEVICE_ID, VENDOR_ID

from . import protocol as P
from .protocol import MessageError

REVISION = 0x01
CLASS_CODE = 0x088000
CONFIG_SIZE = 256
BAR0_SIZE = 8192  # page 0: trapped registers; page 1: their mirror, mapped (mirror.py)
BAR2_SIZE = 4096
MSIX_CAP = 0x40
MSIX_VECTORS = 4
MSIX_TABLE_OFFSET = 0x000
MSIX_PBA_OFFSET = 0x800
# MSI mode: the capability sits where MSI-X would (0x40); 64-bit address, 4 vectors
# (Multiple Message Capable = 2), no per-vector masking
MSI_CAP = 0x40
MSI_VECTORS = 4
MSI_FLAGS_64BIT = 0x0080
MSI_FLAGS_QMASK = 0x000E  # Multiple Message Capable (log2 of the vectors)
MSI_FLAGS_QSIZE = 0x0070  # Multiple Message Enable (written by the guest)
MSI_FLAGS_ENABLE = 0x0001

IRQ_MODES = ("msix", "msi")
BAR_SIZES = {P.PCI_BAR0: BAR0_SIZE, P.PCI_BAR2: BAR2_SIZE}
MSI_BAR_SIZES = {P.PCI_BAR0: BAR0_SIZE}
REGION_FLAGS_RW = P.REGION_INFO_FLAG_READ | P.REGION_INFO_FLAG_WRITE


def check_irq_mode(irq: str) -> str:
    if irq not in IRQ_MODES:
        raise ValueError(f"irq mode {irq!r}: expected one of {', '.join(IRQ_MODES)}")
    return irq


def bar_sizes(irq: str = "msix") -> dict[int, int]:
    return BAR_SIZES if check_irq_mode(irq) == "msix" else MSI_BAR_SIZES


def region_info(index: int, irq: str = "msix", mirror: bool = False) -> tuple[int, int]:
    """(flags, size) of a vfio region. Unused regions have size 0 and no flags. With
    ``mirror`` BAR0 offers its page 1 as a sparse mmap area (mirror.py)."""
    sizes = bar_sizes(irq)
    if index == P.PCI_BAR0 and mirror:
        return REGION_FLAGS_RW | P.REGION_INFO_FLAG_MMAP | P.REGION_INFO_FLAG_CAPS, BAR0_SIZE
    if index in sizes:
        return REGION_FLAGS_RW, sizes[index]
    if index == P.PCI_CONFIG:
        return REGION_FLAGS_RW, CONFIG_SIZE
    if 0 <= index < P.PCI_NUM_REGIONS:
        return 0, 0
    raise MessageError(errno.EINVAL, f"region index {index} out of range")


class ConfigSpace:
    """256-byte type-0 header plus an MSI-X (or MSI) capability. Writes honour a per-byte
    mask."""

    def __init__(self, irq: str = "msix") -> None:
        self.irq = check_irq_mode(irq)
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self._build()

    def _put(self, fmt: str, off: int, value: int, mask: int = 0) -> None:
        struct.pack_into(fmt, self.data, off, value)
        struct.pack_into(fmt, self.wmask, off, mask)

    def _build(self) -> None:
        self._put("<H", 0x00, VENDOR_ID)
        self._put("<H", 0x02, DEVICE_ID)
        # COMMAND: IO, MEM, MASTER, PARITY, SERR, INTX_DISABLE are writable
        self._put("<H", 0x04, 0, 0x0547)
        self._put("<H", 0x06, 0x0010)  # STATUS: capability list
        self._put("<I", 0x08, CLASS_CODE << 8 | REVISION)
        self._put("<B", 0x0C, 0, 0xFF)  # cache line size
        self._put("<B", 0x0E, 0x00)  # header type 0, single function
        for index, size in bar_sizes(self.irq).items():  # mem32, non-prefetchable, aligned
            self._put("<I", 0x10 + 4 * index, 0, ~(size - 1) & 0xFFFFFFFF)
        self._put("<H", 0x2C, VENDOR_ID)
        self._put("<H", 0x2E, DEVICE_ID)
        self._put("<I", 0x30, 0)  # P11: no ROM, reads 0 whatever is written
        self._put("<B", 0x3C, 0, 0xFF)  # interrupt line (scratch for firmware)
        self._put("<B", 0x3D, 0)  # P14: interrupt pin 0, no INTx
        if self.irq == "msi":
            self._build_msi()
            return
        self._put("<B", 0x34, MSIX_CAP)
        self._put("<B", MSIX_CAP, 0x11)
        self._put("<B", MSIX_CAP + 1, 0)  # end of list
        self._put("<H", MSIX_CAP + 2, MSIX_VECTORS - 1, 0xC000)  # enable, function mask
        self._put("<I", MSIX_CAP + 4, MSIX_TABLE_OFFSET | P.PCI_BAR2)
        self._put("<I", MSIX_CAP + 8, MSIX_PBA_OFFSET | P.PCI_BAR2)

    def _build_msi(self) -> None:
        """MSI capability, 64-bit, no per-vector mask (QEMU's msi_init layout, 14 bytes).

        QEMU emulates it (the guest's accesses go to QEMU's copy); writes are still
        forwarded here, so enable, Multiple Message Enable, address and data are writable
        to mirror the guest's view."""
        mmc = (MSI_VECTORS.bit_length() - 1) << 1
        self._put("<B", 0x34, MSI_CAP)
        self._put("<B", MSI_CAP, 0x05)
        self._put("<B", MSI_CAP + 1, 0)  # end of list
        self._put("<H", MSI_CAP + 2, MSI_FLAGS_64BIT | mmc, MSI_FLAGS_QSIZE | MSI_FLAGS_ENABLE)
        self._put("<I", MSI_CAP + 4, 0, 0xFFFFFFFC)  # message address, low
        self._put("<I", MSI_CAP + 8, 0, 0xFFFFFFFF)  # message address, high
        self._put("<H", MSI_CAP + 12, 0, 0xFFFF)  # message data

    def read(self, off: int, count: int) -> bytes:
        return bytes(self.data[off:off + count])

    def write(self, off: int, data: bytes) -> None:
        for i, b in enumerate(data):
            m = self.wmask[off + i]
            self.data[off + i] = (self.data[off + i] & ~m) | (b & m)

    def u16(self, off: int) -> int:
        return int.from_bytes(self.data[off:off + 2], "little")

    @property
    def msix_enabled(self) -> bool:
        return self.irq == "msix" and bool(self.u16(MSIX_CAP + 2) & 0x8000)

    @property
    def msi_enabled(self) -> bool:
        return self.irq == "msi" and bool(self.u16(MSI_CAP + 2) & MSI_FLAGS_ENABLE)

    @property
    def msi_vectors_enabled(self) -> int:
        """Vectors the guest enabled (Multiple Message Enable), 0 when MSI is off."""
        if not self.msi_enabled:
            return 0
        return 1 << ((self.u16(MSI_CAP + 2) & MSI_FLAGS_QSIZE) >> 4)


class MsixBar:
    """BAR2: MSI-X table (emulated by QEMU; kept as plain storage here) and PBA."""

    def __init__(self) -> None:
        self.table = bytearray(MSIX_PBA_OFFSET)

    def read(self, off: int, count: int) -> bytes:
        out = bytearray(count)
        for i in range(count):
            o = off + i
            out[i] = self.table[o] if o < MSIX_PBA_OFFSET else 0  # PBA: nothing pending
        return bytes(out)

    def write(self, off: int, data: bytes) -> None:
        end = min(off + len(data), MSIX_PBA_OFFSET)
        if off < end:
            self.table[off:end] = data[:end - off]  # PBA writes are dropped


class PciFunction:
    """Dispatches REGION_READ/WRITE to config space, BAR0 (registers) and BAR2 (MSI-X)."""

    def __init__(self, bar0_read: Callable[[int, int], bytes],
                 bar0_write: Callable[[int, bytes], None], irq: str = "msix",
                 mirror: bool = False) -> None:
        self.lock = threading.RLock()
        self.irq = check_irq_mode(irq)
        self.mirror = mirror
        self.mirror = mirror
        self.config = ConfigSpace(irq)
        self.msix = MsixBar()
        self._bar0_read = bar0_read
        self._bar0_write = bar0_write

    def region_info(self, index: int) -> tuple[int, int]:
        return region_info(index, self.irq, self.mirror)

    def _check(self, index: int, off: int, count: int) -> None:
        flags, size = region_info(index, self.irq)
        if not flags or count == 0 or off >= size or count > size - off:
            raise MessageError(errno.EINVAL, f"region {index}: bad access {off:#x}+{count}")

    def read(self, index: int, off: int, count: int) -> bytes:
        self._check(index, off, count)
        if index == P.PCI_BAR0:
            return self._bar0_read(off, count)
        with self.lock:
            if index == P.PCI_CONFIG:
                return self.config.read(off, count)
            return self.msix.read(off, count)

    def write(self, index: int, off: int, data: bytes) -> None:
        self._check(index, off, len(data))
        if index == P.PCI_BAR0:
            self._bar0_write(off, data)
            return
        with self.lock:
            if index == P.PCI_CONFIG:
                self.config.write(off, data)
            else:
                self.msix.write(off, data)
