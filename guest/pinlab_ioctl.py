"""User-space wrapper for /dev/pinlabN (kmod/pinlab_uapi.h), standard library only.

Mirrors the kernel ABI exactly: every struct below has the same layout and size as
its C counterpart; the numbers (modes, flags, status codes, ioctl numbers) come from
pinlab.common.uapi, the Python twin of the header.

    dev = PinlabDevice()                       # /dev/pinlab0
    buf = mmap.mmap(-1, 1 << 20)
    rid = dev.register(buffer_address(buf), len(buf), "pin")
    dev.dma_write(rid, 0, len(buf), generation=1)
    assert not check_pattern(buf, rid, 1)
    dev.deregister(rid)

Errors raise PinlabError (an OSError subclass) carrying the kernel errno and, where the
device answered, the raw device status (``.status``) and the output struct (``.result``).
"""

import ctypes
import fcntl
import glob
import os
import struct
import zlib

from pinlab.common import uapi as U
from pinlab.common import vocab

# ---------------------------------------------------------------- constants
# defined once, in the Python twin of kmod/pinlab_uapi.h (tests/unit/test_uapi_twin.py
# checks it against the header)
MODE_GUP, MODE_PIN, MODE_LONGTERM, MODE_ODP = U.MODE_GUP, U.MODE_PIN, U.MODE_LONGTERM, U.MODE_ODP
MODES = dict(zip(vocab.MODES, (MODE_GUP, MODE_PIN, MODE_LONGTERM, MODE_ODP), strict=True))
MODE_NAMES = {v: k for k, v in MODES.items()}

REG_READONLY = U.REG_READONLY
REG_FAST = U.REG_FAST        # gup/pin/longterm: get/pin_user_pages_fast()
GUP_PATH_NONE, GUP_PATH_SLOW, GUP_PATH_FAST = U.GUP_PATH_NONE, U.GUP_PATH_SLOW, U.GUP_PATH_FAST
GUP_PATH_NAMES = {GUP_PATH_NONE: "none", GUP_PATH_SLOW: "slow", GUP_PATH_FAST: "fast"}
MAX_REGION_BYTES = U.MAX_REGION_BYTES

STATUS_OK = U.STATUS_OK
STATUS_BAD_OPCODE = U.STATUS_BAD_OPCODE
STATUS_BAD_ARG = U.STATUS_BAD_ARG
STATUS_NO_REGION = U.STATUS_NO_REGION
STATUS_EXISTS = U.STATUS_EXISTS
STATUS_DMA_ERROR = U.STATUS_DMA_ERROR
STATUS_PAGE_FAULT = U.STATUS_PAGE_FAULT
STATUS_ABORTED = U.STATUS_ABORTED
STATUS_NO_SPACE = U.STATUS_NO_SPACE
STATUS_TIMEOUT = U.STATUS_TIMEOUT        # driver pseudo status: command timed out, reset
STATUS_NO_DEVICE = U.STATUS_NO_DEVICE    # driver pseudo status: device gone
STATUS_NAMES = dict(U.STATUS_NAMES)

STATE_ACTIVE, STATE_FAILED = U.STATE_ACTIVE, U.STATE_FAILED


# ---------------------------------------------------------------- structs (uapi mirror)
class _Struct(ctypes.Structure):
    _pack_ = 8

    def as_dict(self):
        out = {}
        for name, _ in self._fields_:
            if name.startswith("pad"):
                continue
            out[name] = getattr(self, name)
        return out

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"{type(self).__name__}({fields})"


class PinlabRegister(_Struct):
    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("region", ctypes.c_uint32), ("status", ctypes.c_uint16),
                ("pad", ctypes.c_uint16)]


class PinlabRegionOp(_Struct):
    _fields_ = [("region", ctypes.c_uint32), ("status", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("result", ctypes.c_uint64)]


class PinlabDma(_Struct):
    _fields_ = [("region", ctypes.c_uint32), ("generation", ctypes.c_uint32),
                ("offset", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("bytes", ctypes.c_uint64), ("crc32", ctypes.c_uint32),
                ("status", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class PinlabStream(_Struct):
    _fields_ = [("region", ctypes.c_uint32), ("generation", ctypes.c_uint32),
                ("offset", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("chunk", ctypes.c_uint32), ("interval_us", ctypes.c_uint32),
                ("status", ctypes.c_uint16), ("pad", ctypes.c_uint16 * 3)]


class PinlabQuery(_Struct):
    _fields_ = [("region", ctypes.c_uint32), ("mode", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("state", ctypes.c_uint32),
                ("addr", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("pages", ctypes.c_uint64), ("pinned", ctypes.c_uint64),
                ("maybe_dma_pinned", ctypes.c_uint64),
                ("invalidations", ctypes.c_uint64), ("faults", ctypes.c_uint64),
                ("last_status", ctypes.c_uint16), ("gup_path", ctypes.c_uint16),
                ("pad", ctypes.c_uint16 * 2)]


# the ctypes structs must have the twin's layouts (kmod/pinlab_uapi.h)
assert ctypes.sizeof(PinlabRegister) == U.REGISTER.size
assert ctypes.sizeof(PinlabRegionOp) == U.REGION_OP.size
assert ctypes.sizeof(PinlabDma) == U.DMA.size
assert ctypes.sizeof(PinlabStream) == U.STREAM.size
assert ctypes.sizeof(PinlabQuery) == U.QUERY.size

PINLAB_IOC_REGISTER = U.IOC_REGISTER
PINLAB_IOC_DEREGISTER = U.IOC_DEREGISTER
PINLAB_IOC_DMA_WRITE = U.IOC_DMA_WRITE
PINLAB_IOC_DMA_READ = U.IOC_DMA_READ
PINLAB_IOC_STREAM_START = U.IOC_STREAM_START
PINLAB_IOC_STREAM_STOP = U.IOC_STREAM_STOP
PINLAB_IOC_QUERY = U.IOC_QUERY
PINLAB_IOC_DIRTY = U.IOC_DIRTY
PINLAB_IOC_FENCE = U.IOC_FENCE


class PinlabError(OSError):
    """OSError with the kernel errno plus the raw device status and output struct."""

    def __init__(self, err, op, result=None):
        status = getattr(result, "status", None) if result is not None else None
        msg = f"{op}: {os.strerror(err)}"
        if status:
            msg += f" (device status {STATUS_NAMES.get(status, status)})"
        super().__init__(err, msg)
        self.op = op
        self.status = status
        self.result = result


# ---------------------------------------------------------------- helpers
def buffer_address(buf):
    """Address of a writable buffer (mmap.mmap, bytearray, ctypes array)."""
    if isinstance(buf, ctypes.Array):
        return ctypes.addressof(buf)
    c = (ctypes.c_char * len(buf)).from_buffer(buf)
    addr = ctypes.addressof(c)
    del c   # release the export so an mmap can still be closed
    return addr


def dma_crc32(data):
    """The checksum DMA_READ returns for ``data`` (bytes-like: the raw bytes of the range,
    in region-offset order): CRC-32 of IEEE 802.3, the value of zlib.crc32(data) (start
    0), an int in [0, 2**32). Defined in device/REGISTERS.md (Opcodes, DMA_READ)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def mmap_address(m):
    """Address of an mmap.mmap object (alias of buffer_address)."""
    return buffer_address(m)


def pattern_word(region, generation, offset):
    """The 8-byte word the device writes at byte `offset` (REGISTERS.md, Data pattern)."""
    return ((region & 0xFFFF) << 48) | ((generation & 0xFFFF) << 32) | \
        ((offset >> 3) & 0xFFFFFFFF)


def decode_word(word):
    """(region, generation, offset) encoded in a pattern word."""
    return (word >> 48) & 0xFFFF, (word >> 32) & 0xFFFF, (word & 0xFFFFFFFF) << 3


def check_pattern(buf, region, generation, offset=0, length=None, buf_offset=None,
                  max_mismatches=None):
    """Check that buf holds the pattern of (region, generation) over [offset, offset+length).

    `offset` is the byte offset inside the region (it selects the expected words);
    `buf_offset` is where that region byte sits in `buf` (default: same as offset,
    i.e. buf is the whole registered range).  `generation` may be an int or a
    callable(offset) -> generation (for streams), or None to accept any generation.
    Returns a list of mismatches (byte_offset_in_region, expected, found, decoded_found).
    """
    if offset & 7:
        raise ValueError("offset must be 8-byte aligned")
    mv = memoryview(buf).cast("B")
    if buf_offset is None:
        buf_offset = offset
    if length is None:
        length = len(mv) - buf_offset
    if length & 7:
        raise ValueError("length must be a multiple of 8")
    if buf_offset < 0 or buf_offset + length > len(mv):
        raise ValueError("range outside buffer")
    words = struct.unpack_from(f"<{length // 8}Q", mv, buf_offset)
    bad = []
    for i, found in enumerate(words):
        off = offset + 8 * i
        if generation is None:
            r, g, o = decode_word(found)
            ok = r == (region & 0xFFFF) and o == off
            expected = pattern_word(region, g, off)
        else:
            gen = generation(off) if callable(generation) else generation
            expected = pattern_word(region, gen, off)
            ok = found == expected
        if not ok:
            bad.append((off, expected, found, decode_word(found)))
            if max_mismatches is not None and len(bad) >= max_mismatches:
                break
    return bad


# ---------------------------------------------------------------- device
def find_device():
    """The first /dev/pinlabN (str). After a hot-unplug and replug the driver names the
    new device pinlab1 when a file of the removed pinlab0 was still open. Raises
    FileNotFoundError when there is none (device not plugged or pinlab.ko not loaded)."""
    nodes = sorted(glob.glob("/dev/pinlab[0-9]*"), key=lambda n: int(n[len("/dev/pinlab"):]))
    if not nodes:
        raise FileNotFoundError(2, "no /dev/pinlabN (is pinlab.ko loaded and the device "
                                "plugged?)")
    return nodes[0]


class PinlabDevice:
    """One open file of /dev/pinlabN (``path``; None: find_device()); regions belong to
    it and die with close(). Raises OSError from open(2) (ENOENT: no such node)."""

    def __init__(self, path=None):
        self.path = path or find_device()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fileno(self):
        return self.fd

    def _ioctl(self, op, req, arg):
        try:
            fcntl.ioctl(self.fd, req, arg, True)
        except OSError as e:
            raise PinlabError(e.errno, op, arg) from None
        return arg

    def register(self, addr, length, mode="pin", readonly=False, fast=False):
        """Register [addr, addr+length) -> region id.  mode: gup|pin|longterm|odp.
        readonly: no FOLL_WRITE, the device may only read (REG_READONLY); fast: take the
        pages with get/pin_user_pages_fast() (REG_FAST; EINVAL with odp). query()'s
        ``gup_path`` says which entry point pinned."""
        if isinstance(mode, str):
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}")
            mode = MODES[mode]
        flags = (REG_READONLY if readonly else 0) | (REG_FAST if fast else 0)
        arg = PinlabRegister(addr=addr, len=length, mode=mode, flags=flags)
        return self._ioctl("REGISTER", PINLAB_IOC_REGISTER, arg).region

    def deregister(self, region):
        """Deregister; returns the DESTROY_REGION device status."""
        return self._ioctl("DEREGISTER", PINLAB_IOC_DEREGISTER,
                           PinlabRegionOp(region=region)).status

    def dma_write(self, region, offset, length, generation=1):
        """Device writes the pattern; returns bytes written."""
        arg = PinlabDma(region=region, offset=offset, len=length, generation=generation)
        return self._ioctl("DMA_WRITE", PINLAB_IOC_DMA_WRITE, arg).bytes

    def dma_read(self, region, offset, length):
        """The device reads [offset, offset+length) of the region (bytes); returns
        (crc32, bytes_read): crc32 is dma_crc32() of the bytes the device saw in the pages
        the driver mapped for it, which differ from what the process sees through its
        mapping when the two no longer share pages (e.g. after a COW break).
        Raises PinlabError (EFAULT with device status PAGE_FAULT: a page in the range is
        not mapped for the device; EINVAL: range outside the region)."""
        arg = PinlabDma(region=region, offset=offset, len=length)
        arg = self._ioctl("DMA_READ", PINLAB_IOC_DMA_READ, arg)
        return arg.crc32, arg.bytes

    def stream_start(self, region, offset, length, generation=1, chunk=0, interval_us=0):
        arg = PinlabStream(region=region, offset=offset, len=length, generation=generation,
                           chunk=chunk, interval_us=interval_us)
        self._ioctl("STREAM_START", PINLAB_IOC_STREAM_START, arg)

    def stream_stop(self, region):
        """Returns the number of chunks the stream wrote."""
        return self._ioctl("STREAM_STOP", PINLAB_IOC_STREAM_STOP,
                           PinlabRegionOp(region=region)).result

    def query(self, region):
        """dict: region, mode, mode_name, flags, state, addr, len, pages, pinned,
        maybe_dma_pinned, invalidations, faults, last_status, gup_path and
        gup_path_name (none/slow/fast: the entry point that pinned the region)."""
        d = self._ioctl("QUERY", PINLAB_IOC_QUERY, PinlabQuery(region=region)).as_dict()
        d["mode_name"] = MODE_NAMES.get(d["mode"], str(d["mode"]))
        d["gup_path_name"] = GUP_PATH_NAMES.get(d["gup_path"], str(d["gup_path"]))
        return d

    def dirty(self, region):
        """set_page_dirty_lock() on every pinned page; returns pages dirtied."""
        return self._ioctl("DIRTY", PINLAB_IOC_DIRTY, PinlabRegionOp(region=region)).result

    def fence(self):
        """Device FENCE; returns the device status (0)."""
        return self._ioctl("FENCE", PINLAB_IOC_FENCE, PinlabRegionOp()).status


__all__ = [
    "PinlabDevice", "PinlabError", "buffer_address", "mmap_address", "pattern_word",
    "dma_crc32", "find_device",
    "decode_word", "check_pattern", "MODES", "STATUS_NAMES",
    "PINLAB_IOC_REGISTER", "PINLAB_IOC_DEREGISTER", "PINLAB_IOC_DMA_WRITE",
    "PINLAB_IOC_DMA_READ", "PINLAB_IOC_STREAM_START", "PINLAB_IOC_STREAM_STOP",
    "PINLAB_IOC_QUERY", "PINLAB_IOC_DIRTY", "PINLAB_IOC_FENCE",
]
