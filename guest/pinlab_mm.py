"""What the kernel's memory management did to a process's pages, read from /proc.

Guest API (standard library only; also runs on any Linux host as root). Used by the
matrix's cell code (pinlab_cell.py) and by experiment scripts run with ``pinlab run``:

    import mmap, pinlab_mm
    buf = mmap.mmap(-1, 2 << 20)
    addr = pinlab_mm.address(buf)
    pinlab_mm.pagemap(addr, 4)          # [pfn, pfn, None, "swap"]
    pinlab_mm.smaps(addr)["AnonHugePages"]   # bytes
    pinlab_mm.madvise(addr, 4096, pinlab_mm.MADV_DONTNEED)
    pinlab_mm.pins()                    # outstanding FOLL_PIN pins, system wide

Units: addresses and lengths in bytes, page numbers and PFNs in 4 KiB pages, smaps sizes in
bytes (the file says kB; they are multiplied out). Errors: OSError from the system call or
/proc read (``PermissionError`` without CAP_SYS_ADMIN for PFNs: pagemap then reports 0).

Kernel interfaces: Documentation/admin-guide/mm/pagemap.rst (pagemap bits),
Documentation/filesystems/proc.rst (smaps, vmstat), Documentation/core-api/pin_user_pages.rst
(nr_foll_pin_acquired / nr_foll_pin_released), include/uapi/asm-generic/mman-common.h
(MADV_* values).
"""
import contextlib
import ctypes
import mmap
import os
import struct

from pinlab.guest.pinlab_ioctl import buffer_address

PAGE = mmap.PAGESIZE          # bytes
HPAGE = 2 << 20               # bytes: a PMD-sized transparent or hugetlb huge page on x86-64

# madvise(2) advice values (include/uapi/asm-generic/mman-common.h)
MADV_NORMAL = 0
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_COLLAPSE = 25
MADV_SOFT_OFFLINE = 101       # needs CONFIG_MEMORY_FAILURE and CAP_SYS_ADMIN

# fallocate(2) modes (include/uapi/linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# memfd_create(2) flags and seals (include/uapi/linux/memfd.h, fcntl.h)
MFD_CLOEXEC, MFD_ALLOW_SEALING, MFD_HUGETLB = 0x1, 0x2, 0x4
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_WRITE = 0x0008

# /proc/vmstat counters an experiment usually wants
PIN_KEYS = ("nr_foll_pin_acquired", "nr_foll_pin_released")
VMSTAT_KEYS = (*PIN_KEYS, "pswpin", "pswpout", "pgmigrate_success", "pgmigrate_fail",
               "compact_migrate_scanned", "compact_isolated", "compact_stall", "compact_fail",
               "compact_success", "pgsteal_anon", "pgsteal_file", "pgactivate",
               "thp_split_page", "thp_split_pmd", "thp_fault_alloc", "thp_deferred_split_page")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
PROT_NONE = 0
MAP_NORESERVE = 0x4000


def _check(ret):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def read_file(path):
    with open(path) as f:
        return f.read()


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


# address(buf): start address (int, bytes) of a writable buffer (mmap.mmap, bytearray,
# ctypes array); the one the driver registers (the guest API ships both modules together)
address = buffer_address


# ------------------------------------------------------------------ syscalls on ranges
def madvise(addr, length, advice):
    """madvise(2) on [addr, addr+length) (bytes; addr page aligned). Unlike
    mmap.mmap.madvise it takes any address, so part of a mapping and advice values Python
    does not name (MADV_SOFT_OFFLINE, MADV_COLLAPSE) work. Raises OSError (EINVAL: bad
    alignment or advice the kernel does not know; EPERM; ENOMEM: range not mapped)."""
    _check(_libc.madvise(addr, length, advice))


def mprotect(addr, length, prot):
    """mprotect(2) on [addr, addr+length) (bytes; addr page aligned) with ``prot``
    (mmap.PROT_*). Raises OSError (EINVAL, ENOMEM: range not mapped, EACCES)."""
    _check(_libc.mprotect(addr, length, prot))


def punch_hole(fd, offset, length):
    """fallocate(PUNCH_HOLE | KEEP_SIZE) over [offset, offset+length) bytes of a file.
    Raises OSError (EOPNOTSUPP on filesystems without hole punching)."""
    _check(_libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length))


class AlignedMapping:
    """An mmap of ``length`` bytes whose start address is a multiple of ``align`` bytes
    (a power of two): anonymous (``fd`` None, MAP_PRIVATE) or of file ``fd`` from offset 0
    (MAP_SHARED unless ``shared`` is false). A THP or an mTHP folio can only be mapped
    where the virtual address and the file offset are aligned to its size
    (Documentation/admin-guide/mm/transhuge.rst), and Python's mmap cannot ask for an
    address: this reserves ``length + align`` bytes PROT_NONE, maps the aligned part over
    it with MAP_FIXED and unmaps the rest.

    It offers what the cell code uses of ``mmap.mmap``: ``len``, indexing and slicing
    (bytes), slice assignment, :meth:`view` (a memoryview; also the buffer protocol from
    Python 3.12 on, ``memoryview(m)``),
    ``madvise(option, start=0, length=None)``, ``close()`` and ``closed``; ``addr`` is
    the start address. Raises OSError when mmap fails."""

    def __init__(self, length, align, fd=None, shared=True):
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        res = _libc.mmap(None, length + align, PROT_NONE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if res in (None, MAP_FAILED):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        addr = (res + align - 1) & ~(align - 1)
        if fd is None:
            flags, fd = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1
        else:
            flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        got = _libc.mmap(addr, length, prot, flags | MAP_FIXED, fd, 0)
        if got != addr:
            e = ctypes.get_errno()
            _libc.munmap(res, length + align)
            raise OSError(e, os.strerror(e))
        if addr > res:
            _libc.munmap(res, addr - res)
        if res + length + align > addr + length:
            _libc.munmap(addr + length, res + length + align - (addr + length))
        self.addr, self.length, self.closed = addr, length, False
        self._buf = (ctypes.c_char * length).from_address(addr)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        return self._buf[key]

    def __setitem__(self, key, value):
        self._buf[key] = value

    def view(self):
        """A writable memoryview of bytes (format "B") over the whole mapping."""
        if self.closed:
            raise ValueError("mapping closed")
        return memoryview(self._buf).cast("B")

    def __buffer__(self, flags):
        return self.view()

    def __release_buffer__(self, view):
        pass

    def madvise(self, option, start=0, length=None):
        """madvise(2) on [start, start+length) bytes of the mapping (default: all)."""
        madvise(self.addr + start, self.length - start if length is None else length, option)

    def close(self):
        """munmap; idempotent."""
        if not self.closed:
            self.closed = True
            _libc.munmap(self.addr, self.length)


# ------------------------------------------------------------------ kpageflags
#: /proc/kpageflags bits (Documentation/admin-guide/mm/pagemap.rst)
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17
KPF_KSM = 21
KPF_THP = 22


# ------------------------------------------------------------------ pagemap
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


def pagemap_entries(addr, npages, pid="self"):
    """Raw 64-bit /proc/PID/pagemap entries for npages pages from addr (ints)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek((addr // PAGE) * 8)
        data = f.read(npages * 8)
    return [e for (e,) in struct.iter_unpack("<Q", data)]


def pagemap(addr, npages, pid="self"):
    """Per page from addr: its PFN (int) when present, "swap" when swapped out (or a
    migration/other swap entry), None when not mapped. PFNs read as 0 without
    CAP_SYS_ADMIN."""
    res = []
    for e in pagemap_entries(addr, npages, pid):
        if e & PM_PRESENT:
            res.append(e & PM_PFN_MASK)
        elif e & PM_SWAP:
            res.append("swap")
        else:
            res.append(None)
    return res


def pagemap_detail(addr, npages, pid="self"):
    """Per page: dict(present, swap, pfn, swap_type, swap_offset, file, exclusive,
    soft_dirty). pfn is None unless present; swap_type/swap_offset only for swap entries
    (bits 0-4 and 5-54, pagemap.rst)."""
    out = []
    for e in pagemap_entries(addr, npages, pid):
        d = {"present": bool(e & PM_PRESENT), "swap": bool(e & PM_SWAP),
             "file": bool(e & PM_FILE), "exclusive": bool(e & PM_MMAP_EXCLUSIVE),
             "soft_dirty": bool(e & PM_SOFT_DIRTY), "pfn": None}
        if d["present"]:
            d["pfn"] = e & PM_PFN_MASK
        elif d["swap"]:
            d["swap_type"], d["swap_offset"] = e & 0x1F, (e & PM_PFN_MASK) >> 5
        out.append(d)
    return out


def kpageflags(pfns):
    """The /proc/kpageflags word of each PFN (ints; None for an entry that is not a PFN
    (not present, swapped: 0 or None in pagemap()) or cannot be read). Needs
    CAP_SYS_ADMIN. Raises OSError when the file cannot be opened."""
    out = []
    with open("/proc/kpageflags", "rb") as f:
        for p in pfns:
            if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
                out.append(None)
                continue
            f.seek(p * 8)
            data = f.read(8)
            out.append(struct.unpack("<Q", data)[0] if len(data) == 8 else None)
    return out


def moved(before, after):
    """How many pages differ between two pagemap() lists (migrated, swapped, COW-broken)."""
    return sum(1 for x, y in zip(before, after, strict=False) if x != y)


# ------------------------------------------------------------------ smaps
def smaps(addr, pid="self"):
    """The /proc/PID/smaps block of the VMA containing addr, as a dict: sizes in bytes
    (Rss, AnonHugePages, ShmemPmdMapped, FilePmdMapped, Shared_Hugetlb, Private_Hugetlb,
    Swap, ...), THPeligible as int, VmFlags as a list, plus "start"/"end" (ints) and
    "path". Raises LookupError when no VMA contains addr."""
    cur = None
    for line in read_file(f"/proc/{pid}/smaps").splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            if cur is not None and cur["start"] <= addr < cur["end"]:
                return cur
            lo, hi = head[0].split("-")
            cur = {"start": int(lo, 16), "end": int(hi, 16),
                   "path": head[5] if len(head) > 5 else ""}
        elif cur is not None and head:
            key = head[0].rstrip(":")
            if key == "VmFlags":
                cur[key] = head[1:]
            elif len(head) >= 2 and head[1].isdigit():
                cur[key] = int(head[1]) * (1024 if head[2:3] == ["kB"] else 1)
    if cur is not None and cur["start"] <= addr < cur["end"]:
        return cur
    raise LookupError(f"no mapping contains {addr:#x}")


def huge_pages(addr, pid="self"):
    """PMD-mapped huge pages (count of HPAGE) in the VMA containing addr:
    dict(anon, shmem, file, hugetlb), from smaps' AnonHugePages, ShmemPmdMapped,
    FilePmdMapped and Shared_/Private_Hugetlb."""
    s = smaps(addr, pid)
    return {"anon": s.get("AnonHugePages", 0) // HPAGE,
            "shmem": s.get("ShmemPmdMapped", 0) // HPAGE,
            "file": s.get("FilePmdMapped", 0) // HPAGE,
            "hugetlb": (s.get("Shared_Hugetlb", 0) + s.get("Private_Hugetlb", 0)) // HPAGE}


# ------------------------------------------------------------------ vmstat
def vmstat(keys=VMSTAT_KEYS):
    """/proc/vmstat counters (dict name -> int; keys=None: all), folded first through
    vm.stat_refresh so per-CPU deltas are included. A key the kernel lacks is absent."""
    with contextlib.suppress(OSError):
        write_file("/proc/sys/vm/stat_refresh", "1")
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if keys is None or k in keys:
                out[k] = int(v)
    return out


def delta(a, b):
    """Counters that changed from vmstat() a to vmstat() b: {name: b - a}."""
    return {k: b.get(k, 0) - a.get(k, 0) for k in b if b.get(k, 0) != a.get(k, 0)}


def pins(stat=None):
    """FOLL_PIN pins outstanding system-wide: nr_foll_pin_acquired - nr_foll_pin_released
    (counted per folio: a pinned 2 MiB THP may count once per pinned page or once per
    folio depending on the path, pin_user_pages.rst)."""
    v = stat or vmstat(PIN_KEYS)
    return v["nr_foll_pin_acquired"] - v["nr_foll_pin_released"]


def drop_caches(sync=True):
    """sync(2) (unless sync=False), then drop the page cache and slab (vm.drop_caches=3)."""
    if sync:
        os.sync()
    write_file("/proc/sys/vm/drop_caches", "3")


def thp_setting():
    """The active /sys/kernel/mm/transparent_hugepage/enabled value ("always", "madvise"
    or "never"); None when the kernel has no THP."""
    try:
        text = read_file("/sys/kernel/mm/transparent_hugepage/enabled")
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


# ------------------------------------------------------------------ NUMA
# x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl) and mempolicy modes
# (include/uapi/linux/mempolicy.h); Documentation/admin-guide/mm/numa_memory_policy.rst
SYS_SET_MEMPOLICY = 238
SYS_MOVE_PAGES = 279
MPOL_DEFAULT = 0
MPOL_BIND = 2
NUMA_KEYS = ("numa_pte_updates", "numa_huge_pte_updates", "numa_hint_faults",
             "numa_hint_faults_local", "numa_pages_migrated", "pgmigrate_success",
             "pgmigrate_fail")
_libc.syscall.restype = ctypes.c_long


def set_mempolicy(mode, nodes=()):
    """set_mempolicy(2) for the calling thread: ``mode`` (MPOL_DEFAULT, MPOL_BIND, ...)
    over the node numbers ``nodes`` (empty for MPOL_DEFAULT). Pages the thread faults in
    afterwards come from those nodes. Raises OSError (EINVAL: a node that does not exist
    or has no memory)."""
    mask = 0
    for n in nodes:
        mask |= 1 << n
    m = ctypes.c_ulong(mask)
    ret = _libc.syscall(SYS_SET_MEMPOLICY, ctypes.c_int(mode),
                        ctypes.byref(m) if nodes else None,
                        ctypes.c_ulong(64 if nodes else 0))
    _check(0 if ret == 0 else -1)


def page_nodes(addr, npages):
    """The NUMA node of each page of [addr, addr + npages pages): move_pages(2) with
    nodes=NULL only reports (list of int; a negative value is -errno, e.g. -14 EFAULT
    for a page not present, -2 ENOENT for a page not mapped). Raises OSError."""
    n = npages
    pages = (ctypes.c_void_p * n)(*[addr + i * PAGE for i in range(n)])
    status = (ctypes.c_int * n)()
    ret = _libc.syscall(SYS_MOVE_PAGES, ctypes.c_int(0), ctypes.c_ulong(n), pages, None,
                        status, ctypes.c_int(0))
    _check(0 if ret == 0 else -1)
    return list(status)
