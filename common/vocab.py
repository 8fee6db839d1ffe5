"""The words host and guest share: guest paths, modes, backings, events, outcome classes,
report keys and ready files. Standard library only: the guest imports it as
``from pinlab.common import vocab`` exactly as the host does.

Guest layout: everything pinlab puts into a guest lives under :data:`GUEST_HOME`, as a
Python import root::

    GUEST_HOME/pinlab/__init__.py     a minimal package (not the host's)
    GUEST_HOME/pinlab/common/*.py     this package
    GUEST_HOME/pinlab/guest/*.py      the guest code (agent, workload, cells, guest API)

and guest programs run as ``python3 -m pinlab.guest.<module>`` with GUEST_HOME on
PYTHONPATH (:func:`guest_python`).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

# ------------------------------------------------------------------ guest paths
#: The guest's install directory: the one place that names it.
GUEST_HOME = "/root/pinlab"
#: Import name of the guest code.
GUEST_PACKAGE = "pinlab.guest"
#: The packages pushed into the guest, by import name (each below GUEST_HOME/pinlab/).
GUEST_SUBPACKAGES = ("common", "guest")
#: Where ``pinlab run`` copies a user's script.
GUEST_RUN_DIR = f"{GUEST_HOME}/run"


def guest_python(module: str, *args: str, unbuffered: bool = False,
                 interactive: bool = False) -> str:
    """The shell command that runs guest module ``pinlab.guest.<module>`` with ``args``
    (each shell-quoted) with GUEST_HOME on PYTHONPATH: ``env PYTHONPATH=<GUEST_HOME> python3
    -m pinlab.guest.kcheck ...``. Usable after ``nohup``, ``setsid`` or ``exec``."""
    flags = ("-u " if unbuffered else "") + ("-i " if interactive else "")
    return (f"env PYTHONPATH={GUEST_HOME} python3 {flags}-m {GUEST_PACKAGE}.{module}"
            + "".join(" " + shlex.quote(a) for a in args))


def guest_script(path: str, *args: str, unbuffered: bool = False) -> str:
    """The shell command that runs a script file in the guest with the guest packages
    importable (``pinlab run``)."""
    flags = "-u " if unbuffered else ""
    return (f"env PYTHONPATH={GUEST_HOME} python3 {flags}{shlex.quote(path)}"
            + "".join(" " + shlex.quote(a) for a in args))


# ------------------------------------------------------------------ the matrix's words
#: Pin modes of pinlab.ko (kmod/pinlab_uapi.h PINLAB_MODE_*), in the matrix's order.
MODES = ("gup", "pin", "longterm", "odp")
#: Modes that hold page references for the registration's life (odp holds none).
PINNED_MODES = ("gup", "pin", "longterm")
#: Modes counted in nr_foll_pin_* (FOLL_PIN; Documentation/core-api/pin_user_pages.rst).
FOLL_PIN_MODES = ("pin", "longterm")

#: MAP_SHARED file backings, in the matrix's order.
FILE_SHARED = ("memfd", "tmpfs", "ext4", "xfs", "btrfs", "hugetlb")
#: MAP_SHARED files on fsdax: ext4 and xfs on the guest's legacy e820 pmem, mounted
#: ``-o dax=always`` (guest/pinlab_dax.py; orchestrator/guestenv.py PMEM). No page cache:
#: the mapping's pages are the pmem itself.
DAX_BACKINGS = ("ext4-dax", "xfs-dax")
#: Size in MiB of the pmem range of each fsdax backing: the guest tells its /dev/pmemN
#: apart by it, the host carves the ranges out of guest RAM (orchestrator/guestenv.py).
PMEM_MIB = {"ext4-dax": 128, "xfs-dax": 320}
#: Large folios (transparent huge pages): ``anon-thp`` a 2 MiB-aligned anonymous mapping
#: with MADV_HUGEPAGE (one PMD-mapped THP), ``memfd-thp`` a memfd (shmem) with
#: shmem_enabled=advise and MADV_HUGEPAGE (one PMD-mapped shmem THP), ``anon-mthp`` a
#: 64 KiB-aligned anonymous mapping of 64 KiB folios (multi-size THP, hugepages-64kB).
#: guest/pinlab_thp.py sets the THP sysfs knobs per cell and records the proof
#: (Key.THP) that the registered range is one large folio; Documentation/admin-guide/mm/
#: transhuge.rst.
THP_BACKINGS = ("anon-thp", "memfd-thp", "anon-mthp")
#: Every backing, in the matrix's order (cells and test names follow it).
BACKINGS = ("anon", *FILE_SHARED, "private-file", *DAX_BACKINGS, *THP_BACKINGS)
#: Backings a kernel must be at least this (major, minor) to have; the matrix makes no
#: cell of them on an older kernel (orchestrator/cells.py ``backing_applies``). Multi-size
#: anonymous THP arrived in 6.8 (19eaf44954df "mm: thp: support allocation of anonymous
#: multi-size THP"): 6.1 has no /sys/kernel/mm/transparent_hugepage/hugepages-64kB.
BACKING_MIN_KERNEL = {"anon-mthp": (6, 8)}
#: Backings whose final file contents the workload reads back (``Key.FILE_AFTER``).
FILE_BACKINGS = (*FILE_SHARED, *DAX_BACKINGS, "memfd-thp")
#: Backings whose registered pages are private (anon, or COW copies of a MAP_PRIVATE file).
PRIVATE_BACKINGS = ("anon", "private-file")
#: Backings on a filesystem with its own scratch disk (writeback, O_DIRECT, drop_caches).
DISK_BACKINGS = ("ext4", "xfs", "btrfs")

#: Options of a cell beside its mode, backing and event, in their canonical order: how
#: the region is registered, and what the workload does after the event.
#: ``readonly``: no FOLL_WRITE (PINLAB_REG_READONLY; the device may only read). ``fast``:
#: the pages are taken by get/pin_user_pages_fast() (PINLAB_REG_FAST).
#: ``cpu-write-after``: after the event, before the device's generation-2 write, the
#: process writes a CPU pattern (guest/pinlab_cell.py ``cpu_word``, never a device
#: generation) over every registered page through its mapping and records the PFNs after
#: that write; a write fault that copies a pinned page away (COW) then shows as lost
#: device writes (classify.py ``Judge.cpu_write_after``). A cell's options are one
#: string, these names joined by ``+`` in this order ("" = none; :func:`join_options`).
#: Which events run with which options is each event's ``variants``
#: (orchestrator/events/).
OPTIONS = ("readonly", "fast", "cpu-write-after")
#: The option name of the CPU write after the event.
CPU_WRITE_OPTION = "cpu-write-after"
#: The modes each option applies to (odp takes no page references, so no fast path).
OPTION_MODES = {"readonly": MODES, "fast": PINNED_MODES, "cpu-write-after": MODES}
#: The backings each option applies to (default: every backing of the event). A write
#: fault copies a page only in a private mapping (anon, MAP_PRIVATE file): a MAP_SHARED
#: page is written in place, so ``cpu-write-after`` runs on the private backings only.
#: The read-only flow (guest/pinlab_readonly.py) is not run on fsdax: a truncate there
#: waits for the pins, and read-only DAX registrations were never observed.
OPTION_BACKINGS: dict[str, tuple[str, ...]] = {
    "readonly": tuple(b for b in BACKINGS if b not in DAX_BACKINGS),
    "cpu-write-after": PRIVATE_BACKINGS,
}


def split_options(options: str) -> tuple[str, ...]:
    """The option names of an options string (``"readonly+fast"`` -> both; ``""`` -> none).
    Raises ValueError for an unknown name, a repeated one or a non-canonical order."""
    names = tuple(options.split("+")) if options else ()
    for n in names:
        if n not in OPTIONS:
            raise ValueError(f"unknown cell option {n!r} (known: {', '.join(OPTIONS)})")
    if join_options(names) != options:
        raise ValueError(f"cell options {options!r} are not in canonical form "
                         f"({join_options(names)!r})")
    return names


def join_options(names: Iterable[str]) -> str:
    """The canonical options string of ``names`` (OPTIONS order, each once). Raises
    ValueError for an unknown name."""
    names = list(names)
    unknown = set(names) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown cell option(s) {sorted(unknown)} (known: {', '.join(OPTIONS)})")
    return "+".join(o for o in OPTIONS if o in names)


# Events are not listed here: each is a module of its own on both sides (guest/events/,
# orchestrator/events/), and the two registries name them (tests/unit/test_events.py).

class Outcome:
    """Outcome classes (documented in the header of orchestrator/data/expectations.toml;
    orchestrator/classify.py and the event classifiers decide them). A class may carry a
    detail in parentheses: ``PIN_REFUSED(EFAULT)``, ``INCONCLUSIVE(<what was missing>)``."""

    INCONCLUSIVE = "INCONCLUSIVE"
    ERROR = "ERROR"
    PIN_REFUSED = "PIN_REFUSED"
    KERNEL_ERROR = "KERNEL_ERROR"
    PINS_LEAKED = "PINS_LEAKED"
    DMA_AFTER_REVOKE = "DMA_AFTER_REVOKE"
    DMA_OUTSIDE_REGISTRATION = "DMA_OUTSIDE_REGISTRATION"
    COHERENT = "COHERENT"
    REVOKED_IN_TIME = "REVOKED_IN_TIME"
    WRITES_LOST_SILENTLY = "WRITES_LOST_SILENTLY"
    WRITEBACK_STALE = "WRITEBACK_STALE"
    EXT4_WARN_DATA_LOST = "EXT4_WARN_DATA_LOST"
    DIRTY_FOLIO_REJECTED = "DIRTY_FOLIO_REJECTED"
    CSUM_FAILED = "CSUM_FAILED"
    MIGRATION_FAILS = "MIGRATION_FAILS"
    PARENT_LOSES_WRITES = "PARENT_LOSES_WRITES"
    CHILD_SEES_WRITES = "CHILD_SEES_WRITES"
    SEAL_REFUSED = "SEAL_REFUSED"
    SEAL_APPLIED = "SEAL_APPLIED"
    ESCALATED_RESET = "ESCALATED_RESET"
    DEVICE_GONE_CLEAN = "DEVICE_GONE_CLEAN"
    DEVICE_NOT_REMOVED = "DEVICE_NOT_REMOVED"
    DMA_FAILED = "DMA_FAILED"
    DEVICE_READS_STALE = "DEVICE_READS_STALE"
    RELEASED_AT_EXIT = "RELEASED_AT_EXIT"
    REGION_NOT_RELEASED = "REGION_NOT_RELEASED"
    OFFLINE_BLOCKED = "OFFLINE_BLOCKED"
    OFFLINE_SUCCEEDS = "OFFLINE_SUCCEEDS"
    QEMU_CRASHED = "QEMU_CRASHED"
    TRUNCATE_BLOCKED = "TRUNCATE_BLOCKED"
    DEVICE_NOT_REPLUGGED = "DEVICE_NOT_REPLUGGED"
    PINNED_IN_MOVABLE = "PINNED_IN_MOVABLE"


#: Every outcome class, in the order of the expectations header.
OUTCOME_CLASSES = tuple(v for k, v in vars(Outcome).items() if k.isupper())


class Key:
    """Keys of the cell report (guest/pinlab_cell.py writes it, orchestrator/classify.py
    and the event classifiers read it), including the keys of its nested records: a step
    (``steps``), the fork child's report (``child``), the victim's (``victim``), the
    removal wait (``gone``), an offline result (``offline``), the fsdax evidence
    (``dax``: guest/pinlab_dax.py dax_evidence) and a layout wait (``blocked``, with
    ``wait``: pinlab_dax.release_after, watch_never_released, task_wait). A page scan key's read
    error is ``key + ERROR_SUFFIX``, its byte count ``key + BYTES_SUFFIX``."""

    AGENT_MS = "agent_ms"
    BACKING = "backing"
    BLOCK = "block"
    BLOCKED = "blocked"
    BLOCKS = "blocks"
    BYTES = "bytes"
    CELL_MS = "cell_ms"
    CHILD = "child"
    CHILD_PID = "child_pid"
    CHILD_STATUS = "child_status"
    CONTROL_INTACT = "control_intact"
    CONTROL_MOVED = "control_moved"
    CONTROL_PAGEMAP_AFTER_EVENT = "control_pagemap_after_event"
    CONTROL_PAGES = "control_pages"
    CONTROL_PFNS_AFTER = "control_pfns_after"
    CONTROL_PFNS_BEFORE = "control_pfns_before"
    CRC_CHILD_AFTER = "crc_child_after"
    CRC_MAP_AFTER = "crc_map_after"
    CRC_MAP_BEFORE = "crc_map_before"
    CRC_NEW = "crc_new"
    CRC_OLD = "crc_old"
    DAX = "dax"
    DEVICE_CRC_AFTER = "device_crc_after"
    DEVICE_CRC_BEFORE = "device_crc_before"
    DEV_NODE_EXISTS = "dev_node_exists"
    DIRTY_PAGES = "dirty_pages"
    DISK_REGISTERED = "disk_registered"
    DISK_RELEASED = "disk_released"
    ERRNO = "errno"
    ERRNO_NAME = "errno_name"
    ERROR = "error"
    EVENT = "event"
    EXIT = "exit"
    FAST = "fast"
    FILE_AFTER = "file_after"
    FILE_G2 = "file_g2"
    GONE = "gone"
    GONE_AFTER_MS = "gone_after_ms"
    HOLD_MS = "hold_ms"
    HOLE_BYTES = "hole_bytes"
    HOLE_PAGES = "hole_pages"
    HOW = "how"
    IN_LAYOUT_WAIT = "in_layout_wait"
    KEPT_PAGES = "kept_pages"
    KERNEL = "kernel"
    KILLED_SIGNAL = "killed_signal"
    KILLED_STATUS = "killed_status"
    KILL_MS = "kill_ms"
    LEFTOVER_MOUNTS = "leftover_mounts"
    MAP = "map"
    MAPPED = "mapped"
    MAP_AFTER = "map_after"
    MAP_AFTER_EXTEND = "map_after_extend"
    MAP_AFTER_ODIRECT = "map_after_odirect"
    MAP_AFTER_PUNCH = "map_after_punch"
    MAP_G1 = "map_g1"
    MAP_G2 = "map_g2"
    MAP_KEPT_G2 = "map_kept_g2"
    MAP_PARENT_G2 = "map_parent_g2"
    MEMCG_AFTER_RECLAIM = "memcg_after_reclaim"
    MEMCG_BEFORE = "memcg_before"
    MEMCG_REGISTERED = "memcg_registered"
    MODE = "mode"
    MOUNT_OPTIONS = "mount_options"
    MOVABLE_PAGES = "movable_pages"
    MS = "ms"
    MSG = "msg"
    NEVER = "never"
    NONBLOCK_REFUSED_AFTER = "nonblock_refused_after"
    NONBLOCK_REFUSED_BEFORE = "nonblock_refused_before"
    NOTES = "notes"
    NPAGES = "npages"
    ODIRECT_PAGES = "odirect_pages"
    OFFLINE = "offline"
    OOM_EVENTS = "oom_events"
    PAGEMAP = "pagemap"
    PAGEMAP_AFTER_EVENT = "pagemap_after_event"
    PATH = "path"
    PFNS = "pfns"
    PFNS_AFTER = "pfns_after"
    PFNS_AFTER_EVENT = "pfns_after_event"
    PFNS_AFTER_TOUCH = "pfns_after_touch"
    PFNS_AFTER_WRITE = "pfns_after_write"
    PFNS_BEFORE = "pfns_before"
    PFNS_IN_PMEM = "pfns_in_pmem"
    PFNS_PARENT_AFTER_WRITE = "pfns_parent_after_write"
    PFNS_REGISTERED = "pfns_registered"
    PID = "pid"
    PINNED_MOVED = "pinned_moved"
    PMEM_RANGES = "pmem_ranges"
    QUERY = "query"
    QUERY_AFTER_EVENT = "query_after_event"
    QUERY_FINAL = "query_final"
    QUERY_REGISTERED = "query_registered"
    QUEUE_DAX = "queue_dax"
    READONLY = "readonly"
    REGION = "region"
    REGISTER_MS = "register_ms"
    REGISTER_OPTIONS = "register_options"
    RELEASED_AT_MS = "released_at_ms"
    RELEASE_ERRNO = "release_errno"
    REMAP_G2 = "remap_g2"
    RESULT = "result"
    RETURNED_AFTER_RELEASE = "returned_after_release"
    RETURNED_MS = "returned_ms"
    SEALS = "seals"
    STACK = "stack"
    STATE = "state"
    STATUS = "status"
    STATX_ATTRIBUTES = "statx_attributes"
    STATX_DAX = "statx_dax"
    STDERR = "stderr"
    STEP = "step"
    STEPS = "steps"
    STILL_BLOCKED_AT_MS = "still_blocked_at_ms"
    STREAM_CHUNKS = "stream_chunks"
    STUCK = "stuck"
    SWAPS = "swaps"
    VALUE = "value"
    VICTIM = "victim"
    VICTIM_EXIT_MS = "victim_exit_ms"
    VICTIM_PID = "victim_pid"
    VICTIM_SIGNAL = "victim_signal"
    VICTIM_STATUS = "victim_status"
    VMFLAGS = "vmflags"
    VMSTAT_BEFORE = "vmstat_before"
    VMSTAT_BEFORE_VICTIM = "vmstat_before_victim"
    VMSTAT_END = "vmstat_end"
    VMSTAT_EVENT = "vmstat_event"
    VMSTAT_REGISTERED = "vmstat_registered"
    VMSTAT_RELEASED = "vmstat_released"
    VMSTAT_VICTIM_GONE = "vmstat_victim_gone"
    VMSTAT_VICTIM_REGISTERED = "vmstat_victim_registered"
    WAIT = "wait"
    WATCH_MS = "watch_ms"
    WCHAN = "wchan"
    THP = "thp"
    THP_AFTER_EVENT = "thp_after_event"
    THP_CONTROL = "thp_control"
    THP_CONTROL_AFTER = "thp_control_after"
    THP_SETTINGS = "thp_settings"
    KPAGEFLAGS = "kpageflags"
    SMAPS = "smaps"
    SETTINGS = "settings"
    FOLIO_PAGES = "folio_pages"
    SPLIT_PAGES = "split_pages"
    NUMA = "numa"
    NODES_BEFORE = "nodes_before"
    NODES_AFTER = "nodes_after"
    NODES_AFTER_WRITE = "nodes_after_write"
    CONTROL_NODES_BEFORE = "control_nodes_before"
    CONTROL_NODES_AFTER = "control_nodes_after"
    POLLS = "polls"
    RACE = "race"
    ROUNDS = "rounds"
    MOVABLE_BLOCKS = "movable_blocks"
    BLOCK_BYTES = "block_bytes"
    CMA = "cma"
    CMA_RANGES = "cma_ranges"
    FAULTED_IN_MOVABLE = "faulted_in_movable"
    FAULTED_IN_CMA = "faulted_in_cma"
    PINNED_IN_MOVABLE = "pinned_in_movable"
    PINNED_IN_CMA = "pinned_in_cma"
    ERRNOS = "errnos"
    CELL_PINNED_IN_MOVABLE = "cell_pinned_in_movable"
    CELL_PINNED_IN_CMA = "cell_pinned_in_cma"
    PHASE = "phase"
    ERROR_SUFFIX = "_error"
    BYTES_SUFFIX = "_bytes"
    # cpu-write-after (guest/pinlab_cell.py Cell.cpu_write_after) and the ksm event
    PFNS_BEFORE_CPU_WRITE = "pfns_before_cpu_write"
    PFNS_AFTER_CPU_WRITE = "pfns_after_cpu_write"
    MAP_CPU = "map_cpu"
    KSM = "ksm"
    TWIN_PFNS = "twin_pfns"
    MAP_TWIN_G2 = "map_twin_g2"
    # read-only flow (guest/pinlab_readonly.py): what the process should see after the
    # event, what its file holds, the child's view after a fork
    CRC_EXPECTED_AFTER = "crc_expected_after"
    CRC_FILE_AFTER = "crc_file_after"
    READONLY_FLOW = "readonly_flow"


# ------------------------------------------------------------------ guest files
#: A hot-unplug cell run by hand (no agent) creates it when it streams and waits for the
#: device to go (``pinlab replug --ready-file``).
READY_FILE = "/tmp/pinlab-cell.ready"
#: Environment variable naming the descriptor on which a cell run by the agent says "ready"
#: (the agent's ``wait until=ready``).
NOTIFY_FD_ENV = "PINLAB_NOTIFY_FD"
#: Where a hot-unplug cell's workload (started without the agent) writes its report.
CELL_OUT_FILE = "/tmp/pinlab-cell.out"
#: The agent's child writes its output here.
AGENT_CELL_OUTPUT = "/tmp/pinlab-agent-cell.out"
#: Where the host copies pinlab.ko in every guest.
GUEST_MODULE = "/tmp/pinlab.ko"
#: Mount point of a scratch filesystem (``.format(fs)``); tmpfs and hugetlbfs too.
SCRATCH_MOUNT = "/mnt/pinlab-{}"
