"""Event ``2018``.

The 2018 recipe is ext4's buffer_head path (docs/pinning-semantics.md row 17); xfs
(iomap) has no buffer_heads to strip. btrfs runs it for its own
page-dirtied-without-page_mkwrite path (the COW fixup worker; 7ca3e84980ef rejects such
folios where it is built). Judges ext4's dirty-path warning itself.
"""

from __future__ import annotations

from pinlab.common.vocab import Key, Outcome

from ..classify import Judge, step, summarize_pagemap
from . import Event


def classify(j: Judge) -> str:
    j.f["dirty"] = step(j.rep, "dirty")
    j.f["pagemap_after_pageout"] = summarize_pagemap(j.rep.get(Key.PAGEMAP_AFTER_EVENT))
    lines = j.dm.lines.get("EXT4_NO_BUFFERS", [])
    warns = [w for w in j.dm.severe().get("WARN", []) if j.ext4_path_warn(w)]
    j.f.update(ext4_no_buffers=lines[:4], warn=warns[:2])
    data_ok = j.views_g([Key.FILE_AFTER])
    if lines or warns:
        if data_ok:
            return Outcome.KERNEL_ERROR   # the kernel complained although the data is there
        j.wrote(2)
        return Outcome.EXT4_WARN_DATA_LOST
    return j.outcome(data_ok)


EVENT = Event(
    "2018",
    order=9,
    backings=("ext4", "btrfs"),
    classify=classify,
    ext4_check=False,
)
