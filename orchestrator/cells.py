"""Which cells the matrix has: every applicable (mode, backing, event) per kernel."""

from __future__ import annotations

from pinlab.images.kbuild import is_kernel_id
from pinlab.images.kernel import KERNELS

from .expectations import Cell

MODES = ["gup", "pin", "longterm", "odp"]

FILE_SHARED = ["memfd", "tmpfs", "ext4", "xfs", "hugetlb"]  # MAP_SHARED file backings
BACKINGS = ["anon", *FILE_SHARED, "private-file"]

# (backing, event) pairs that make sense; every mode in MODES runs each of them.
# Why the others are left out:
# * truncate / punch-hole: need a file. anon has none; private-file (MAP_PRIVATE ext4)
#   would only zap COW copies that no truncate semantics are documented for.
# * punch-hole-partial: hugetlbfs zeroes the partial part of a huge page in place.
# * pageout / memcg-reclaim: hugetlb pages are never reclaimed (MADV_PAGEOUT gives EINVAL
#   on VM_HUGETLB); tmpfs behaves as memfd (both shmem); private-file pins anon COW pages
#   (= anon).
# * drop-caches: only the page cache is dropped: anon and private-file COW pages are not
#   page cache; hugetlb is not on the LRU.
# * writeback: only filesystems with writeback (ext4, xfs) write anything back.
# * 2018: the reference's recipe is ext4's buffer_head path (row 4d); xfs (iomap) has no
#   buffer_heads to strip.
# * migrate: compaction does not move hugetlb pages; tmpfs = memfd; xfs = ext4 (file pages).
# * fork: MAP_SHARED backings other than memfd behave alike (row 8c); fork-dontfork is
#   only meaningful where fork COWs (anon).
# * munmap / dontneed: one shmem (memfd) and one disk file (ext4) stand for their kinds.
# * seal-write: only memfd has seals.
# * hot-unplug / pci-remove: the backing does not matter for device removal; anon is the
#   simplest. pci-remove (guest sysfs remove + rescan) runs the same driver remove() path
#   without QMP device_del, which crashes QEMU 11.1's vfio-user-pci (see the report).
# * odirect-write: only disk filesystems have O_DIRECT over a page cache (ref row 5b).
# * exit / oom: a second process dies with a region registered; anon and memfd stand for
#   private and shared memory; oom needs only one (the memcg OOM killer picks the victim).
# * mem-offline: anonymous pages in a hot-added ZONE_MOVABLE DIMM (file pages behave alike
#   for offline: migration is refused on the extra reference either way, ref row 7).
PAIRS: list[tuple[str, str]] = [
    *[(b, "dma-write") for b in BACKINGS],
    *[(b, "truncate") for b in FILE_SHARED],
    *[(b, "punch-hole") for b in FILE_SHARED],
    *[(b, "punch-hole-partial") for b in ["memfd", "tmpfs", "ext4", "xfs", "hugetlb"]],
    *[(b, "pageout") for b in ["anon", "memfd", "ext4", "xfs"]],
    *[(b, "memcg-reclaim") for b in ["anon", "memfd", "ext4", "xfs"]],
    *[(b, "drop-caches") for b in ["memfd", "tmpfs", "ext4", "xfs"]],
    ("ext4", "writeback"), ("xfs", "writeback"),
    ("ext4", "2018"),
    *[(b, "migrate") for b in ["anon", "memfd", "ext4"]],
    *[(b, "fork") for b in ["anon", "memfd", "private-file"]],
    ("anon", "fork-dontfork"),
    *[(b, "munmap") for b in ["anon", "memfd", "ext4"]],
    *[(b, "dontneed") for b in ["anon", "memfd", "ext4", "private-file"]],
    ("memfd", "seal-write"),
    ("anon", "hot-unplug"), ("anon", "pci-remove"),
    ("ext4", "odirect-write"), ("xfs", "odirect-write"),
    *[(b, "exit") for b in ["anon", "memfd"]],
    ("anon", "oom"),
    ("anon", "mem-offline"),
]
# Only odp revokes, so only odp has a revoke to leave unacknowledged.
ODP_ONLY: list[tuple[str, str]] = [("anon", "no-ack"), ("memfd", "no-ack")]

# One cell per event is the smoke slice CI runs on the non-default kernels.
SMOKE_MODE_ORDER = ["pin", "odp", "longterm", "gup"]


def all_cells(kernel: str) -> list[Cell]:
    if kernel not in KERNELS and not is_kernel_id(kernel):
        raise ValueError(f"unknown kernel {kernel!r}")
    return ([Cell(kernel, m, b, e) for b, e in PAIRS for m in MODES]
            + [Cell(kernel, "odp", b, e) for b, e in ODP_ONLY])


def smoke(cells: list[Cell]) -> set[Cell]:
    """The first cell of each event, preferring the modes in SMOKE_MODE_ORDER."""
    out: dict[str, Cell] = {}
    rank = {m: i for i, m in enumerate(SMOKE_MODE_ORDER)}
    for c in sorted(cells, key=lambda c: (c.event, rank.get(c.mode, 99), c.backing)):
        out.setdefault(c.event, c)
    return set(out.values())
