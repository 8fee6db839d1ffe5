"""Which cells the matrix has: every applicable (mode, backing, event) per kernel."""

from __future__ import annotations

from pinlab.images.kernel import KERNELS

from .expectations import Cell

MODES = ["gup", "pin", "longterm", "odp"]

FILE_SHARED = ["memfd", "tmpfs", "ext4", "xfs", "btrfs", "hugetlb"]  # MAP_SHARED files
BACKINGS = ["anon", *FILE_SHARED, "private-file"]

# (backing, event) pairs that make sense; every mode in MODES runs each of them.
# Why the others are left out:
# * truncate / punch-hole: need a file. anon has none; private-file (MAP_PRIVATE ext4)
#   would only zap COW copies that no truncate semantics are documented for.
# * punch-hole-partial: hugetlbfs zeroes the partial part of a huge page in place; btrfs
#   has the events ext4 and xfs have that involve its COW writeback and checksums (a
#   page dirtied behind its back: writeback, 2018, reclaim), not every hole variant.
# * pageout / memcg-reclaim: hugetlb pages are never reclaimed (MADV_PAGEOUT gives EINVAL
#   on VM_HUGETLB); tmpfs behaves as memfd (both shmem). anon and private-file (its pinned
#   pages are anon COW copies, in a file-backed VMA) reclaim to swap and must show that
#   an unregistered control page of the mapping was swapped (classify.py, swap_reached).
# * drop-caches: only the page cache is dropped: anon and private-file COW pages are not
#   page cache; hugetlb is not on the LRU.
# * writeback: only filesystems with writeback (ext4, xfs, btrfs) write anything back.
# * 2018: the reference's recipe is ext4's buffer_head path (row 4d); xfs (iomap) has no
#   buffer_heads to strip. btrfs runs it for its own page-dirtied-without-page_mkwrite
#   path (the COW fixup worker; 7ca3e84980ef rejects such folios where it is built).
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
    *[(b, "pageout") for b in ["anon", "memfd", "ext4", "xfs", "btrfs", "private-file"]],
    *[(b, "memcg-reclaim") for b in ["anon", "memfd", "ext4", "xfs", "btrfs",
                                     "private-file"]],
    *[(b, "drop-caches") for b in ["memfd", "tmpfs", "ext4", "xfs", "btrfs"]],
    ("ext4", "writeback"), ("xfs", "writeback"), ("btrfs", "writeback"),
    ("ext4", "2018"), ("btrfs", "2018"),
    *[(b, "migrate") for b in ["anon", "memfd", "ext4"]],
    *[(b, "fork") for b in ["anon", "memfd", "private-file"]],
    ("anon", "fork-dontfork"),
    *[(b, "munmap") for b in ["anon", "memfd", "ext4"]],
    *[(b, "dontneed") for b in ["anon", "memfd", "ext4", "private-file"]],
    ("memfd", "seal-write"),
    ("anon", "hot-unplug"), ("anon", "pci-remove"),
    ("ext4", "odirect-write"), ("xfs", "odirect-write"), ("btrfs", "odirect-write"),
    *[(b, "exit") for b in ["anon", "memfd"]],
    ("anon", "oom"),
    ("anon", "mem-offline"),
]
# Only odp revokes, so only odp has a revoke to leave unacknowledged.
ODP_ONLY: list[tuple[str, str]] = [("anon", "no-ack"), ("memfd", "no-ack")]

# One cell per event is the smoke slice CI runs on the non-default kernels.
SMOKE_MODE_ORDER = ["pin", "odp", "longterm", "gup"]
# backings the smoke slice takes only for events no other backing has (btrfs sorts before
# ext4, and the smoke slice keeps ext4 for truncate, 2018, writeback, ...)
SMOKE_BACKINGS_LAST = ("btrfs",)


def all_cells(kernel: str) -> list[Cell]:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    return ([Cell(kernel, m, b, e) for b, e in PAIRS for m in MODES]
            + [Cell(kernel, "odp", b, e) for b, e in ODP_ONLY])


def smoke(cells: list[Cell]) -> set[Cell]:
    """The first cell of each event, preferring the modes in SMOKE_MODE_ORDER."""
    out: dict[str, Cell] = {}
    rank = {m: i for i, m in enumerate(SMOKE_MODE_ORDER)}
    for c in sorted(cells, key=lambda c: (c.event, c.backing in SMOKE_BACKINGS_LAST,
                                          rank.get(c.mode, 99), c.backing)):
        out.setdefault(c.event, c)
    return set(out.values())


def cell_tags(c: Cell, smoke_set: set[Cell]) -> list[str]:
    """The Avocado tags of a cell's test (tests/matrix/test_cells.py)."""
    return (["matrix", f"kernel:{c.kernel}", f"mode:{c.mode}", f"backing:{c.backing}",
             f"event:{c.event}"] + (["smoke"] if c in smoke_set else []))


def tags_match(tags: list[str], filters: list[str] | None) -> bool:
    """Avocado's --filter-by-tags semantics for one test's tags: each filter is a
    comma-separated AND of tags (``-tag``: must not have it); several filters are ORed;
    no filter matches everything."""
    if not filters:
        return True
    have = set(tags)
    for f in filters:
        parts = [p for p in f.split(",") if p]
        if all((p[1:] not in have) if p.startswith("-") else (p in have) for p in parts):
            return True
    return False


def select(kernel: str, filters: list[str] | None) -> list[Cell]:
    """The cells of ``kernel`` that the tag filters select (as ``pinlab matrix`` would
    run them)."""
    cells = all_cells(kernel)
    sm = smoke(cells)
    return [c for c in cells if tags_match(cell_tags(c, sm), filters)]


def parse_cell(text: str) -> Cell:
    """A cell from ``KERNEL/MODE/BACKING/EVENT`` (a verdict's cell name, shown in the HTML
    report) or from its Avocado test id (``...test_cells.py:Kernel6_12.test_pin__ext4__2018``).
    Raises ValueError naming what does not exist."""
    text = text.strip()
    if ".test_" in text:
        cls, _, meth = text.rpartition(":")[2].partition(".test_")
        kernel = next((k for k in KERNELS
                       if "Kernel" + "".join(ch if ch.isalnum() else "_" for ch in k) == cls),
                      None)
        if kernel is None:
            raise ValueError(f"no kernel for test class {cls!r}")
        found = [c for c in all_cells(kernel) if "__".join(
            "".join(ch if ch.isalnum() else "_" for ch in x)
            for x in (c.mode, c.backing, c.event)) == meth]
        if not found:
            raise ValueError(f"no matrix cell is tested by {text!r}")
        return found[0]
    parts = text.split("/")
    if len(parts) != 4:
        raise ValueError(f"a cell is KERNEL/MODE/BACKING/EVENT (e.g. 6.12/longterm/ext4/2018), "
                         f"not {text!r}")
    cell = Cell(*parts)
    if cell.kernel not in KERNELS:
        raise ValueError(f"unknown kernel {cell.kernel!r} (known: {', '.join(KERNELS)})")
    if cell not in all_cells(cell.kernel):
        raise ValueError(f"{text} is not a matrix cell (see orchestrator/cells.py: PAIRS)")
    return cell
