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


KPF_KSM = 21                  # /proc/kpageflags bit (Documentation/admin-guide/mm/pagemap.rst)


def kpageflags(pfns):
    """The /proc/kpageflags word of each PFN (ints; None for an entry that is not a PFN or
    cannot be read). Needs CAP_SYS_ADMIN."""
    out = []
    with open("/proc/kpageflags", "rb") as f:
        for p in pfns:
            if not isinstance(p, int) or isinstance(p, bool):
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
