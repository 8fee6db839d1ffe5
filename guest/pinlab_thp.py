"""Large folios for the THP backings (``anon-thp``, ``memfd-thp``, ``anon-mthp``): the
THP sysfs knobs a cell needs, the aligned mapping and the proof that the registered range
is one large folio.

Guest API (standard library only). The knobs (Documentation/admin-guide/mm/transhuge.rst):
``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise`` for every THP cell (the
mapping asks with MADV_HUGEPAGE), ``shmem_enabled`` = ``advise`` for ``memfd-thp`` (shmem
allocates a huge folio for a VMA with MADV_HUGEPAGE), and
``hugepages-64kB/enabled`` = ``madvise`` for ``anon-mthp`` (multi-size THP, 6.8+:
19eaf44954df). Each is put back when the cell's ExitStack closes. Every other backing's
mapping keeps MADV_NOHUGEPAGE (pinlab_cell.Mapping).

The proof (:func:`evidence`, recorded as ``Key.THP``; orchestrator/classify.py
``Judge.need_thp`` judges it): the /proc/kpageflags word of every PFN of the range
(Documentation/admin-guide/mm/pagemap.rst: KPF_THP, KPF_COMPOUND_HEAD/TAIL) and the
VMA's smaps (AnonHugePages, ShmemPmdMapped, THPeligible, VmFlags).
"""
import contextlib
import os

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_mm import (
    HPAGE,
    KPF_COMPOUND_HEAD,
    KPF_COMPOUND_TAIL,
    KPF_THP,
    PAGE,
    kpageflags,
    read_file,
    smaps,
    write_file,
)

THP_DIR = "/sys/kernel/mm/transparent_hugepage"
MTHP_64K = f"{THP_DIR}/hugepages-64kB/enabled"
#: pages of one folio of each THP backing (its mapping is one folio, aligned to it)
FOLIO_PAGES = {"anon-thp": HPAGE // PAGE, "memfd-thp": HPAGE // PAGE,
               "anon-mthp": (64 << 10) // PAGE}
#: the knobs each backing sets: {file: value}
KNOBS = {
    "anon-thp": {f"{THP_DIR}/enabled": "madvise"},
    "memfd-thp": {f"{THP_DIR}/enabled": "madvise", f"{THP_DIR}/shmem_enabled": "advise"},
    "anon-mthp": {f"{THP_DIR}/enabled": "madvise", MTHP_64K: "madvise"},
}
SMAPS_KEYS = ("Rss", "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped", "THPeligible",
              "VmFlags")


def active(path):
    """The bracketed value of a THP sysfs knob ("madvise" of "always [madvise] never"),
    None when the file does not exist."""
    try:
        text = read_file(path)
    except FileNotFoundError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def settings():
    """Every knob the THP backings use, with its active value (None: absent)."""
    return {os.path.relpath(p, THP_DIR): active(p)
            for p in (f"{THP_DIR}/enabled", f"{THP_DIR}/defrag", f"{THP_DIR}/shmem_enabled",
                      MTHP_64K)}


def setup(backing, stack=None, rep=None):
    """Set the knobs of ``backing`` (KNOBS) and put the old values back when ``stack``
    closes. Raises RuntimeError when the kernel lacks a knob (no multi-size THP before
    6.8: the matrix makes no anon-mthp cell there, orchestrator/cells.py)."""
    for path, value in KNOBS[backing].items():
        old = active(path)
        if old is None:
            raise RuntimeError(f"{backing}: this kernel has no {path}")
        if old != value:
            write_file(path, value)
            if stack is not None:
                stack.callback(write_file, path, old)
    if rep is not None:
        rep[Key.THP_SETTINGS] = settings()


def folio_summary(pfns, folio_pages):
    """What /proc/kpageflags says of the range's PFNs: pages with KPF_THP, the indices of
    compound heads, tail pages, entries without a PFN, whether the PFNs are contiguous and
    whether the first PFN is aligned to ``folio_pages``."""
    flags = kpageflags(pfns)
    ints = [p for p in pfns if isinstance(p, int) and not isinstance(p, bool) and p > 0]
    return {
        "thp": sum(1 for w in flags if w is not None and w >> KPF_THP & 1),
        "heads": [i for i, w in enumerate(flags) if w is not None and w >> KPF_COMPOUND_HEAD & 1],
        "tails": sum(1 for w in flags if w is not None and w >> KPF_COMPOUND_TAIL & 1),
        "missing": sum(1 for w in flags if w is None),
        "contiguous": len(ints) == len(pfns) and all(
            b == a + 1 for a, b in zip(ints, ints[1:], strict=False)),
        "first_aligned": bool(ints) and ints[0] == pfns[0] and pfns[0] % folio_pages == 0,
        "first_word": hex(flags[0]) if flags and flags[0] is not None else None,
    }


def evidence(backing, addr, pfns):
    """The proof for the range at ``addr`` whose PFNs are ``pfns``: {folio_pages,
    kpageflags (folio_summary), smaps (SMAPS_KEYS of its VMA), settings}. An unreadable
    source is recorded as its error."""
    n = FOLIO_PAGES[backing]
    out = {Key.FOLIO_PAGES: n, Key.SETTINGS: settings()}
    try:
        out[Key.KPAGEFLAGS] = folio_summary(pfns, n)
    except OSError as exc:
        out[Key.KPAGEFLAGS] = {Key.ERROR: str(exc)}
    with contextlib.suppress(OSError, LookupError):
        s = smaps(addr)
        out[Key.SMAPS] = {k: s.get(k) for k in SMAPS_KEYS}
    return out
