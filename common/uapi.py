"""The device and driver contract in Python: the twin of ``kmod/pinlab.h`` and
``kmod/pinlab_uapi.h``.

Standard library only (the guest imports it too). Every constant is named as in C
without the ``PINLAB_`` prefix (``PINLAB_REG_SQ_TAIL`` -> ``REG_SQ_TAIL``), so C's
``PINLAB_REG_READONLY`` (a REGISTER ioctl flag) sits beside the BAR0 register offsets
``REG_*`` exactly as it does in C. ``tests/unit/test_uapi_twin.py`` parses both headers
and fails when any value, struct layout or ioctl number here differs from C.

The meaning of every value is in ``device/REGISTERS.md`` (registers, opcodes, status
codes, events) and in the comments of ``kmod/pinlab_uapi.h`` (ioctls). All integers on
the device side are little-endian.
"""

from __future__ import annotations

import struct

# ------------------------------------------------------------------- PCI identity
VENDOR_ID = 0x1DE5
DEVICE_ID = 0x0001

# ------------------------------------------------------------------- BAR0 registers
# byte offsets in BAR0; registers are 32-bit, the *_BASE registers u64 (low word first)
REG_ID = 0x000
REG_VERSION = 0x004
REG_STATUS = 0x008
REG_CTRL = 0x00C
REG_SQ_BASE = 0x010
REG_SQ_ENTRIES = 0x018
REG_SQ_TAIL = 0x01C
REG_SQ_HEAD = 0x020
REG_CQ_BASE = 0x028
REG_CQ_ENTRIES = 0x030
REG_CQ_HEAD = 0x034
REG_CQ_TAIL = 0x038
REG_EQ_BASE = 0x040
REG_EQ_ENTRIES = 0x048
REG_EQ_HEAD = 0x04C
REG_EQ_TAIL = 0x050
REG_CMDS_DONE = 0x060
REG_ERRORS = 0x064
REG_SCRATCH = 0x080

ID_MAGIC = 0x50494E4C  # "PINL", the value of REG_ID
VERSION = 0x00010000  # the value of REG_VERSION: major 1 (bits 31..16), minor 0

# REG_STATUS bits
STATUS_ENABLED = 1 << 0
STATUS_FATAL = 1 << 1
# REG_CTRL bits
CTRL_ENABLE = 1 << 0
CTRL_RESET = 1 << 1

# ------------------------------------------------------------------- opcodes
OP_NOP = 0x00
OP_CREATE_REGION = 0x01
OP_MAP_PAGES = 0x02
OP_INVALIDATE = 0x03
OP_DESTROY_REGION = 0x04
OP_DMA_WRITE = 0x05
OP_DMA_READ = 0x06
OP_STREAM_START = 0x07
OP_STREAM_STOP = 0x08
OP_FENCE = 0x09

REGION_WRITABLE = 1 << 0  # CREATE_REGION a1
PHASE = 1 << 0  # completion / event entry flags

# ------------------------------------------------------------------- device status codes
STATUS_OK = 0
STATUS_BAD_OPCODE = 1
STATUS_BAD_ARG = 2
STATUS_NO_REGION = 3
STATUS_EXISTS = 4
STATUS_DMA_ERROR = 5
STATUS_PAGE_FAULT = 6
STATUS_ABORTED = 7
STATUS_NO_SPACE = 8
# driver-side pseudo statuses (never sent by the device)
STATUS_TIMEOUT = 0xFFFE
STATUS_NO_DEVICE = 0xFFFF

#: device status code -> name (REGISTERS.md "Status codes"), driver pseudo statuses too
STATUS_NAMES: dict[int, str] = {
    STATUS_OK: "OK", STATUS_BAD_OPCODE: "BAD_OPCODE", STATUS_BAD_ARG: "BAD_ARG",
    STATUS_NO_REGION: "NO_REGION", STATUS_EXISTS: "EXISTS", STATUS_DMA_ERROR: "DMA_ERROR",
    STATUS_PAGE_FAULT: "PAGE_FAULT", STATUS_ABORTED: "ABORTED", STATUS_NO_SPACE: "NO_SPACE",
    STATUS_TIMEOUT: "TIMEOUT", STATUS_NO_DEVICE: "NO_DEVICE",
}

# ------------------------------------------------------------------- events, vectors
EV_PAGE_FAULT = 1
EV_STREAM_STOPPED = 2
EV_DEVICE_ERROR = 3  # reserved, not generated yet

VEC_CQ = 0  # completion queue has new entries
VEC_EQ = 1  # event queue has new entries
MIN_VECS = 1
MAX_VECS = 4

# ------------------------------------------------------------------- limits
MAP_CHUNK = 512  # MAP_PAGES count limit
MAX_PAGES = 262144  # CREATE_REGION npages limit
MAX_REGION_ID = 65535

# ------------------------------------------------------------------- queue entries
SQE = struct.Struct("<BBHI7Q")  # opcode, flags, cid, region, a0..a6 (struct pinlab_sqe)
CQE = struct.Struct("<HHIQQII")  # cid, status, flags, result0, result1, sq_head, rsvd
EQE = struct.Struct("<HHIIIQQ")  # type, rsvd0, flags, region, rsvd1, info0, info1
SQE_SIZE = SQE.size  # 64
CQE_SIZE = CQE.size  # 32
EQE_SIZE = EQE.size  # 32

# ------------------------------------------------------------------- /dev/pinlabN ABI
IOC_MAGIC = ord("P")

MODE_GUP = 0  # get_user_pages(), put_page()
MODE_PIN = 1  # pin_user_pages()
MODE_LONGTERM = 2  # pin_user_pages(FOLL_LONGTERM)
MODE_ODP = 3  # no pin: mmu notifier + hmm

REG_READONLY = 0x1  # struct pinlab_register.flags: no FOLL_WRITE, device read-only
REG_FAST = 0x2  # gup/pin/longterm: get/pin_user_pages_fast()
REG_FLAGS_ALL = REG_READONLY | REG_FAST

# struct pinlab_query.gup_path: the call that took the region's pages
GUP_PATH_NONE = 0  # odp: nothing pinned
GUP_PATH_SLOW = 1  # get/pin_user_pages(), mmap_read_lock
GUP_PATH_FAST = 2  # get/pin_user_pages_fast()
MAX_REGION_BYTES = 0x40000000  # 1 GiB

STATE_ACTIVE = 0
STATE_FAILED = 1  # device reset or removed

# struct layouts (native x86-64 alignment; every field explicit, so "<" is exact)
REGISTER = struct.Struct("<QQIIIHH")  # addr, len, mode, flags, region, status, pad
REGION_OP = struct.Struct("<IHHQ")  # region, status, pad, result
DMA = struct.Struct("<IIQQQIHH")  # region, generation, offset, len, bytes, crc32, status, pad
STREAM = struct.Struct("<IIQQIIH3H")  # region, generation, offset, len, chunk, interval_us,
#                                       status, pad[3]
QUERY = struct.Struct("<IIIIQQQQQQQHH2H")  # region, mode, flags, state, addr, len, pages,
#             pinned, maybe_dma_pinned, invalidations, faults, last_status, gup_path, pad[2]

_IOC_WRITE, _IOC_READ = 1, 2


def iowr(nr: int, size: int) -> int:
    """``_IOWR(PINLAB_IOC_MAGIC, nr, size)`` as <asm-generic/ioctl.h> encodes it:
    direction bits 31..30, size 29..16, type 15..8, number 7..0."""
    return (_IOC_READ | _IOC_WRITE) << 30 | size << 16 | IOC_MAGIC << 8 | nr


IOC_REGISTER = iowr(1, REGISTER.size)
IOC_DEREGISTER = iowr(2, REGION_OP.size)
IOC_DMA_WRITE = iowr(3, DMA.size)
IOC_DMA_READ = iowr(4, DMA.size)
IOC_STREAM_START = iowr(5, STREAM.size)
IOC_STREAM_STOP = iowr(6, REGION_OP.size)
IOC_QUERY = iowr(7, QUERY.size)
IOC_DIRTY = iowr(8, REGION_OP.size)
IOC_FENCE = iowr(9, REGION_OP.size)
