"""Which cells the matrix has: every applicable (mode, backing, event) per kernel."""

from __future__ import annotations

from pinlab.images.kernel import KERNELS, is_kernel_id

from .expectations import Cell

MODES = ["gup", "pin", "longterm", "odp"]

FILE_SHARED = ["memfd", "tmpfs", "ext4", "xfs", "btrfs", "hugetlb"]  # MAP_SHARED files
# MAP_SHARED files on fsdax: ext4 and xfs on emulated persistent memory, -o dax=always
# (images/guest/pinlab_dax.py; orchestrator/guestenv.py PMEM)
DAX_BACKINGS = ["ext4-dax", "xfs-dax"]
BACKINGS = ["anon", *FILE_SHARED, "private-file", *DAX_BACKINGS]

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
#   btrfs memcg-reclaim is left out until it is deterministic: 6.12 gup gave
#   DIRTY_FOLIO_REJECTED in one run and COHERENT in the next (2026-11-30, the CI-equivalent
#   run: the folio was not cleaned before the driver dirtied it), depending on what
#   memory.reclaim wrote back first; it needs a writeback step of its own first.
# * drop-caches: only the page cache is dropped: anon and private-file COW pages are not
#   page cache; hugetlb is not on the LRU.
# * writeback: only filesystems with writeback (ext4, xfs, btrfs) write anything back.
# * 2018: the 2018 recipe is ext4's buffer_head path (docs/pinning-semantics.md row 17);
#   xfs (iomap) has no buffer_heads to strip. btrfs runs it for its own
#   page-dirtied-without-page_mkwrite path (the COW fixup worker; 7ca3e84980ef rejects such
#   folios where it is built).
# * migrate: compaction does not move hugetlb pages; tmpfs = memfd; xfs = ext4 (file pages).
# * fork: MAP_SHARED backings other than memfd behave alike (docs/pinning-semantics.md
#   row 31); fork-dontfork is only meaningful where fork COWs (anon).
# * munmap / dontneed: one shmem (memfd) and one disk file (ext4) stand for their kinds.
# * seal-write: only memfd has seals.
# * hot-unplug / pci-remove: the backing does not matter for device removal; anon is the
#   simplest. pci-remove (guest sysfs remove + rescan) runs the same driver remove() path
#   without QMP device_del, which crashes QEMU 11.1's vfio-user-pci (see the report).
# * odirect-write: only disk filesystems have O_DIRECT over a page cache
#   (docs/pinning-semantics.md row 13).
# * exit / oom: a second process dies with a region registered; anon and memfd stand for
#   private and shared memory; oom needs only one (the memcg OOM killer picks the victim).
# * ext4-dax / xfs-dax: the events that change a DAX file's layout under the pins (truncate,
#   the hole punches: the filesystem waits for the pages' references before it frees the
#   blocks, dax_layout_busy_page / dax_break_layout) and the ones that end a mapping
#   (munmap, exit), plus dma-write; truncate-never-unpin is the truncate whose pins are never
#   dropped (the device never stops). DAX has no page cache: no reclaim, writeback,
#   drop-caches, O_DIRECT or migration of its pages to compare.
# * mem-offline: anonymous pages in a hot-added ZONE_MOVABLE DIMM (file pages behave alike
#   for offline: migration is refused on the extra reference either way,
#   docs/pinning-semantics.md row 24).
PAIRS: list[tuple[str, str]] = [
    *[(b, "dma-write") for b in BACKINGS],
    *[(b, "truncate") for b in FILE_SHARED],
    *[(b, "punch-hole") for b in FILE_SHARED],
    *[(b, "punch-hole-partial") for b in ["memfd", "tmpfs", "ext4", "xfs", "hugetlb"]],
    *[(b, "pageout") for b in ["anon", "memfd", "ext4", "xfs", "btrfs", "private-file"]],
    *[(b, "memcg-reclaim") for b in ["anon", "memfd", "ext4", "xfs", "private-file"]],
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
    *[(b, e) for b in DAX_BACKINGS for e in ["truncate", "punch-hole",
                                              "punch-hole-partial", "munmap", "exit",
                                              "truncate-never-unpin"]],
]
# Only odp revokes, so only odp has a revoke to leave unacknowledged.
ODP_ONLY: list[tuple[str, str]] = [("anon", "no-ack"), ("memfd", "no-ack")]

# One cell per event is the smoke slice CI runs on the non-default kernels.
SMOKE_MODE_ORDER = ["pin", "odp", "longterm", "gup"]
# backings the smoke slice takes only for events no other backing has (btrfs sorts before
# ext4, and the smoke slice keeps ext4 for truncate, 2018, writeback, ...)
SMOKE_BACKINGS_LAST = ("btrfs",)


def all_cells(kernel: str, known_only: bool = True) -> list[Cell]:
    """Every cell of the matrix on ``kernel``: a Debian kernel (KERNELS) or a built one
    (``build:<key>``, images/kbuild.py). Raises ValueError for anything else unless
    ``known_only`` is false."""
    if known_only and kernel not in KERNELS and not is_kernel_id(kernel):
        raise ValueError(f"unknown kernel {kernel!r}")
    return ([Cell(kernel, m, b, e) for b, e in PAIRS for m in MODES]
            + [Cell(kernel, "odp", b, e) for b, e in ODP_ONLY])


def cell_tags(cell: Cell, smoke_set: set[Cell]) -> list[str]:
    """The Avocado tags of a cell's test, in the order the generated test file lists them:
    ``matrix``, ``kernel:``, ``mode:``, ``backing:``, ``event:`` and ``smoke`` if the cell is
    in ``smoke_set``."""
    return (["matrix", f"kernel:{cell.kernel}", f"mode:{cell.mode}", f"backing:{cell.backing}",
             f"event:{cell.event}"] + (["smoke"] if cell in smoke_set else []))


def smoke(cells: list[Cell]) -> set[Cell]:
    """The first cell of each event, preferring the modes in SMOKE_MODE_ORDER."""
    out: dict[str, Cell] = {}
    rank = {m: i for i, m in enumerate(SMOKE_MODE_ORDER)}
    for c in sorted(cells, key=lambda c: (c.event, c.backing in SMOKE_BACKINGS_LAST,
                                          rank.get(c.mode, 99), c.backing)):
        out.setdefault(c.event, c)
    return set(out.values())


def select(cells: list[Cell], filters: list[str] | None) -> list[Cell]:
    """The cells whose Avocado tags (:func:`cell_tags`) pass ``filters``, with Avocado's own
    semantics (``avocado.core.tags.filter_tags_on_runnables``): each filter is a
    comma-separated AND (``-tag`` negates), repeated filters are ORed; ``None`` or ``[]``:
    every cell. This is how ``pinlab matrix``, ``validate`` and ``up --cell`` choose cells,
    and what ``avocado run tests/matrix --filter-by-tags`` runs. Raises ValueError on an
    empty tag."""
    if not filters:
        return list(cells)
    for f in filters:
        if any(not w.strip() or w.strip() == "-" for w in f.split(",")):
            raise ValueError(f"empty tag in filter {f!r}")
    from types import SimpleNamespace

    from avocado.core.resolver import ReferenceResolutionResult  # only when filtering
    from avocado.core.tags import filter_tags_on_runnables

    # the smoke slice is defined over a kernel's whole matrix, whatever subset is given
    smoke_set = {s for k in {c.kernel for c in cells}
                 for s in smoke(all_cells(k, known_only=False))}
    runnables = []
    for c in cells:
        tag_map: dict[str, set[str] | None] = {}
        for t in cell_tags(c, smoke_set):
            key, sep, val = t.partition(":")
            if sep:
                tag_map[key] = (tag_map.get(key) or set()) | {val}
            else:
                tag_map[key] = None
        runnables.append(SimpleNamespace(tags=tag_map, cell=c))
    resolution = SimpleNamespace(result=ReferenceResolutionResult.SUCCESS,
                                 resolutions=runnables)
    kept = {id(r) for r in filter_tags_on_runnables([resolution], filters)}
    return [r.cell for r in runnables if id(r) in kept]


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
