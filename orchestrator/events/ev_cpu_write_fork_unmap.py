"""Event ``cpu-write-fork-unmap``: a child registers read-only after fork, device-reads,
munmaps its range; the parent writes; the device reads again
(guest/events/ev_cpu_write_fork_unmap.py).

The "vmsplice() + unmap in child" case of CVE-2020-29374 (17839856fd58 "gup: document and
work around 'COW can break either way' issue"; tools/testing/selftests/mm/cow.c) with a
device: after the child's munmap its pages are held only by its registration, the
parent is the only mapper, and a COW that reused the page for the parent would let the
device read the parent's write. The private backings (anon, private-file), every mode,
slow path and fast. The device must read the child's snapshot (the old contents): the
parent's write copies because the page's reference count shows the child's reference
(6.x page-count-based reuse, wp_can_reuse_anon_folio), or the child's R/O pin unshared the
page first (docs/pinning-semantics.md row 51). odp: the child's munmap invalidates and the
device finds no page (REVOKED_IN_TIME).
"""

from __future__ import annotations

from pinlab.common.vocab import PRIVATE_BACKINGS

from ..classify import Judge
from . import Event
from .ev_cpu_write_fork import judge


def classify(j: Judge) -> str:
    return judge(j, unmapped=True)


EVENT = Event(
    "cpu-write-fork-unmap",
    order=25,
    backings=PRIVATE_BACKINGS,
    classify=classify,
    last_gen=1,
    smoke=("gup", "anon"),   # FOLL_GET: only the reference count stops the reuse
    readonly=True,
    variants=("", "fast"),
)
