"""Classifying kernel log lines: the kernel's own verdict on what a scenario did."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# (class, pattern) — order matters only for readability; a line may match several.
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    # "WARNING: CPU: 1 PID: 5 at f.c:1 fn" (<= 6.x), "WARNING: f.c:1 at fn, CPU#1: comm/5" (7.x)
    ("WARN", re.compile(r"WARNING: (CPU: \d+ PID: \d+ at|at|\S+:\d+ at) ")),
    ("BUG", re.compile(r"\bBUG: |kernel BUG at ")),
    ("OOPS", re.compile(r"\bOops: |general protection fault")),
    ("PANIC", re.compile(r"Kernel panic - not syncing")),
    ("HUNG_TASK", re.compile(r"blocked for more than \d+ seconds")),
    ("EXT4_NO_BUFFERS", re.compile(r"does not have buffers attached|ext4_dirty_folio|"
                                   r"ext4_writepages.*(err|warn)", re.I)),
    ("PAGE_POISON", re.compile(r"pagealloc: memory corruption|Poison overwritten|"
                               r"page_poison|corrupted page", re.I)),
    ("BAD_PAGE", re.compile(r"BUG: Bad page (state|map)")),
    ("RCU_STALL", re.compile(r"rcu: INFO: rcu_\w+ (self-)?detected stall")),
    ("SOFT_LOCKUP", re.compile(r"soft lockup - CPU#")),
    # btrfs writeback of a folio dirtied without ->page_mkwrite, rejected with -EUCLEAN
    # (7ca3e84980ef "btrfs: reject out-of-band dirty folios during writeback")
    ("BTRFS_OOB_DIRTY", re.compile(r"BTRFS error .* is marked dirty without notifying the fs")),
    # btrfs read of a block whose checksum does not match the data on disk
    ("BTRFS_CSUM", re.compile(r"BTRFS (warning|error) .*csum failed")),
    # memory offline that cannot migrate a page (mm/memory_hotplug.c do_migrate_range)
    ("MIGRATION_FAILURE", re.compile(r"migrating pfn \w+ failed|"
                                     r"page dumped because: migration failure")),
]
SEVERE = {"WARN", "BUG", "OOPS", "PANIC", "HUNG_TASK", "BAD_PAGE", "RCU_STALL", "SOFT_LOCKUP"}


@dataclass
class DmesgReport:
    lines: dict[str, list[str]] = field(default_factory=dict)
    pinlab_lines: list[str] = field(default_factory=list)

    def classes(self) -> set[str]:
        return {k for k, v in self.lines.items() if v}

    def severe(self) -> dict[str, list[str]]:
        return {k: v for k, v in self.lines.items() if k in SEVERE and v}

    def summary(self) -> dict[str, int]:
        return {k: len(v) for k, v in sorted(self.lines.items()) if v}


def classify(text: str) -> DmesgReport:
    rep = DmesgReport()
    for line in text.splitlines():
        for cls, pat in PATTERNS:
            if pat.search(line):
                rep.lines.setdefault(cls, []).append(line)
        if "pinlab" in line:
            rep.pinlab_lines.append(line)
    return rep
