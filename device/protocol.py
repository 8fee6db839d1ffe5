"""vfio-user wire protocol: constants, struct layouts and message framing.

The protocol is specified in QEMU's docs/interop/vfio-user.rst; the layouts here are the
ones QEMU's client sends and expects (hw/vfio-user/protocol.h, proxy.c, device.c,
container.c), since that client is the peer. All integers are little-endian (x86 host).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass, field

HDR = struct.Struct("<HHIII")
HDR_SIZE = HDR.size

# commands
VERSION = 1
DMA_MAP = 2
DMA_UNMAP = 3
DEVICE_GET_INFO = 4
DEVICE_GET_REGION_INFO = 5
DEVICE_GET_REGION_IO_FDS = 6
DEVICE_GET_IRQ_INFO = 7
DEVICE_SET_IRQS = 8
REGION_READ = 9
REGION_WRITE = 10
DMA_READ = 11
DMA_WRITE = 12
DEVICE_RESET = 13
REGION_WRITE_MULTI = 15

COMMAND_NAMES = {
    VERSION: "VERSION", DMA_MAP: "DMA_MAP", DMA_UNMAP: "DMA_UNMAP",
    DEVICE_GET_INFO: "DEVICE_GET_INFO", DEVICE_GET_REGION_INFO: "DEVICE_GET_REGION_INFO",
    DEVICE_GET_REGION_IO_FDS: "DEVICE_GET_REGION_IO_FDS",
    DEVICE_GET_IRQ_INFO: "DEVICE_GET_IRQ_INFO", DEVICE_SET_IRQS: "DEVICE_SET_IRQS",
    REGION_READ: "REGION_READ", REGION_WRITE: "REGION_WRITE", DMA_READ: "DMA_READ",
    DMA_WRITE: "DMA_WRITE", DEVICE_RESET: "DEVICE_RESET",
    REGION_WRITE_MULTI: "REGION_WRITE_MULTI",
}

# header flags
FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0
TYPE_REPLY = 1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

# transport limits we advertise
MAX_MSG_FDS = 8
MAX_DATA_XFER = 1 << 20
PGSIZE = 4096
MAX_DMA_MAPS = 65535
# largest message we accept: a REGION_WRITE of MAX_DATA_XFER bytes plus its 32-byte head
MAX_MSG_SIZE = MAX_DATA_XFER + 32
# how many fds we are prepared to receive with one message (P4: ask for >= 16)
RECV_FDS = 16

# DMA_MAP / DMA_UNMAP
DMA_MAP_S = struct.Struct("<IIQQQ")  # argsz, flags, offset, iova, size
DMA_UNMAP_S = struct.Struct("<IIQQ")  # argsz, flags, iova, size
DMA_FLAG_READ = 1
DMA_FLAG_WRITE = 2
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1
DMA_UNMAP_FLAG_ALL = 2

# DEVICE_GET_INFO
DEVICE_INFO_S = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
DEVICE_FLAGS_RESET = 1
DEVICE_FLAGS_PCI = 2

# DEVICE_GET_REGION_INFO
REGION_INFO_S = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
REGION_INFO_FLAG_READ = 1
REGION_INFO_FLAG_WRITE = 2
REGION_INFO_FLAG_MMAP = 4
REGION_INFO_FLAG_CAPS = 8
# <linux/vfio.h>: struct vfio_info_cap_header {u16 id, u16 version, u32 next} followed by
# struct vfio_region_info_cap_sparse_mmap {u32 nr_areas, u32 reserved, {u64 offset, size}[]}
REGION_INFO_CAP_SPARSE_MMAP = 1
CAP_HEADER_S = struct.Struct("<HHI")
SPARSE_MMAP_S = struct.Struct("<II")
SPARSE_AREA_S = struct.Struct("<QQ")

# DEVICE_GET_IRQ_INFO
IRQ_INFO_S = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_INFO_EVENTFD = 1
IRQ_INFO_MASKABLE = 2
IRQ_INFO_AUTOMASKED = 4
IRQ_INFO_NORESIZE = 8

# DEVICE_SET_IRQS
IRQ_SET_S = struct.Struct("<IIIII")  # argsz, flags, index, start, count
IRQ_SET_DATA_NONE = 1
IRQ_SET_DATA_BOOL = 2
IRQ_SET_DATA_EVENTFD = 4
IRQ_SET_DATA_MASK = 7
IRQ_SET_ACTION_MASK = 8
IRQ_SET_ACTION_UNMASK = 0x10
IRQ_SET_ACTION_TRIGGER = 0x20
IRQ_SET_ACTION_MASK_ALL = 0x38

# REGION_READ / REGION_WRITE
REGION_RW_S = struct.Struct("<QII")  # offset, region, count

# PCI region and irq indexes
PCI_BAR0 = 0
PCI_BAR2 = 2
PCI_ROM = 6
PCI_CONFIG = 7
PCI_NUM_REGIONS = 9
IRQ_INTX = 0
IRQ_MSI = 1
IRQ_MSIX = 2
IRQ_ERR = 3
IRQ_REQ = 4
PCI_NUM_IRQS = 5


class ProtocolError(Exception):
    """The peer broke framing; the connection cannot continue."""


class MessageError(Exception):
    """A well-framed message is invalid: answer with an error reply carrying ``errno``."""

    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


@dataclass
class Message:
    msg_id: int
    command: int
    flags: int
    error_no: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def msg_type(self) -> int:
        return self.flags & FLAG_TYPE_MASK

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def size(self) -> int:
        return HDR_SIZE + len(self.payload)

    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, f"CMD{self.command}")

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            close_quietly(fd)


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def pack(msg_id: int, command: int, flags: int, payload: bytes = b"", error_no: int = 0) -> bytes:
    return HDR.pack(msg_id, command, HDR_SIZE + len(payload), flags, error_no) + payload


def reply(msg: Message, payload: bytes = b"") -> bytes:
    return pack(msg.msg_id, msg.command, TYPE_REPLY, payload)


def error_reply(msg: Message, err: int) -> bytes:
    """P3: error replies are header-only with flags = REPLY | ERROR."""
    return pack(msg.msg_id, msg.command, TYPE_REPLY | FLAG_ERROR, b"", err)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        data = sock.recv(min(n, 1 << 20))
        if not data:
            raise ProtocolError("EOF inside a message")
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def recv_message(sock: socket.socket, max_size: int = MAX_MSG_SIZE) -> Message | None:
    """Receive one message with its fds (P4: fds come with the first recvmsg).

    Returns None on a clean EOF at a message boundary. Raises ProtocolError when the
    stream can no longer be trusted (short header, bad size, bad type).
    """
    fds: list[int] = []
    try:
        data, fds, msg_flags, _ = socket.recv_fds(sock, HDR_SIZE, RECV_FDS)
    except ValueError as exc:  # malformed ancillary data
        raise ProtocolError(f"bad ancillary data: {exc}") from exc
    try:
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many fds (control data truncated)")
        if not data:
            if fds:
                raise ProtocolError("fds without data")
            return None
        if len(data) < HDR_SIZE:
            data += _recv_exact(sock, HDR_SIZE - len(data))
        msg_id, command, size, flags, error_no = HDR.unpack(data)
        if size < HDR_SIZE or size > max_size:
            raise ProtocolError(f"bad message size {size}")
        if flags & FLAG_TYPE_MASK not in (TYPE_COMMAND, TYPE_REPLY):
            raise ProtocolError(f"bad message type in flags {flags:#x}")
        payload = _recv_exact(sock, size - HDR_SIZE) if size > HDR_SIZE else b""
    except BaseException:
        for fd in fds:
            close_quietly(fd)
        raise
    return Message(msg_id, command, flags, error_no, payload, list(fds))


def send_message(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def expect_size(msg: Message, size: int, at_least: bool = False) -> None:
    n = len(msg.payload)
    if (n < size) if at_least else (n != size):
        raise MessageError(errno.EINVAL, f"{msg.name()}: payload {n} bytes, expected {size}")


def expect_no_fds(msg: Message) -> None:
    if msg.fds:
        msg.close_fds()
        raise MessageError(errno.EINVAL, f"{msg.name()}: unexpected fds")
