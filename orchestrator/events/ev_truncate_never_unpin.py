"""Event ``truncate-never-unpin``.

fsdax only (ext4-dax, xfs-dax): the truncate of ev_truncate while the device never stops
and the driver never unpins. A DAX truncate waits for the pages' references before it
frees the blocks (dax_layout_busy_page / dax_break_layout, Documentation/filesystems/
dax.rst), so with gup or pin it waits for good: the guest watches it for
pinlab_dax.NEVER_S seconds, records where it waits and kills it (TRUNCATE_BLOCKED); odp
is revoked and goes on as truncate. Other backings have no layout break to wait in
(their truncate returns at once, ev_truncate). Classified as truncate; the host's
scenario reboots the guest after a truncate that blocked (scenario.never_unpin).
"""

from __future__ import annotations

from pinlab.common.vocab import DAX_BACKINGS

from . import Event
from .ev_truncate import classify

EVENT = Event(
    "truncate-never-unpin",
    order=23,
    backings=DAX_BACKINGS,
    classify=classify,
    scenario="never_unpin",
)
