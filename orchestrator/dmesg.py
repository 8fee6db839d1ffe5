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

    def signatures(self, only: set[str] | frozenset[str] | None = None) -> dict[str, int]:
        """How often each kernel-log signature occurs, 0-day style (see ``signature``),
        e.g. ``{"WARNING:at_fs/ext4/inode.c:#ext4_dirty_folio": 1}``. A line that several
        classes matched counts once; ``only`` keeps the lines of those classes."""
        seen: dict[str, str] = {}    # line -> first class that matched it
        for cls, lines in self.lines.items():
            if only is not None and cls not in only:
                continue
            for line in lines:
                seen.setdefault(line, cls)
        out: dict[str, int] = {}
        for line, cls in seen.items():
            sig = signature(cls, line)
            if sig:
                out[sig] = out.get(sig, 0) + 1
        return dict(sorted(out.items()))


_PREFIX = re.compile(r"^(<\d+>)?(\[\s*\d+\.\d+\]\s*)?(\[\s*[TC]\d+\]\s*)?")
# a call-trace frame (" ext4_dirty_folio+0x4b/0x60 [ext4]") repeats the header's function
_FRAME = re.compile(r"^(\? )?[\w.]+\+0x[0-9a-f]+/0x[0-9a-f]+( \[\w+\])?$")
# the register dump of a WARN/Oops ("RIP: 0010:ext4_dirty_folio+0x28/0x30 [ext4]")
_DUMP = re.compile(r"^(RIP|RSP|RAX|RDX|RBP|RSI|R\d+|FS|CS|CR2|Code|Call Trace):")
# 6.x "WARNING: CPU: 1 PID: 5 at fs/x.c:12 fn+0x1/0x2 [mod]",
# 7.x "WARNING: fs/x.c:12 at fn+0x1/0x2, CPU#1: c/5"
_WARN_OLD = re.compile(r"WARNING: CPU: \d+ PID: \d+ at (\S+?):\d+ ([\w.]+)")
_WARN_NEW = re.compile(r"WARNING: (\S+?):\d+ at ([\w.]+)")
# numbers: 0x-prefixed, long hex words, bare hex with a digit and a letter (a pfn such as
# "migrating pfn 10003e failed"), decimal
_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\b[0-9a-fA-F]{8,}\b"
                      r"|\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{4,}\b|\b\d+\b")


def signature(cls: str, line: str) -> str | None:
    """A kernel-log line reduced to what stays the same across runs and kernel versions,
    as the 0-day robot counts them (``WARNING:at_mm/gup.c:#try_grab_folio``,
    ``BUG:kernel_NULL_pointer_dereference,address``): timestamps, numbers, addresses,
    line numbers, PIDs and task names go. ``None`` for a call-trace frame, which repeats
    its header. ``cls`` is the dmesg class that matched the line (unused for the shape,
    kept so callers pass what they know)."""
    text = _PREFIX.sub("", line.strip())
    if not text or _FRAME.match(text) or _DUMP.match(text):
        return None
    m = _WARN_OLD.search(text) or _WARN_NEW.search(text)
    if m:
        return f"WARNING:at_{m.group(1)}:#{m.group(2)}"
    if cls == "HUNG_TASK":
        return "INFO:task_blocked_for_more_than#seconds"
    for key in ("kernel BUG at ", "BUG: ", "Oops: ", "general protection fault",
                "Kernel panic - not syncing", "does not have buffers attached"):
        i = text.find(key)
        if i >= 0:
            text = text[i:] if key != "does not have buffers attached" else text
            break
    text = re.sub(r"\b(pid|PID|comm|task)[:=]?\s*\S+", r"\1", text)
    text = _NUMBERS.sub("#", text)
    text = re.sub(r"\s*:\s*", ":", text)
    return re.sub(r"\s+", "_", text.strip())[:120]


def classify(text: str) -> DmesgReport:
    rep = DmesgReport()
    for line in text.splitlines():
        for cls, pat in PATTERNS:
            if pat.search(line):
                rep.lines.setdefault(cls, []).append(line)
        if "pinlab" in line:
            rep.pinlab_lines.append(line)
    return rep
