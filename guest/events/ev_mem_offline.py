"""Event ``mem-offline``: the guest's steps.

Offline the ZONE_MOVABLE memory blocks (of a DIMM the host hot-added) that held
the mapping's pages when they were first touched
(docs/pinning-semantics.md rows 26-28).

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_mem_offline.py.
"""
from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import MEMDIR, PAGE, offline_block, wait_movable_memory
from pinlab.guest.pinlab_mm import read_file

NAME = "mem-offline"


def before_mapping(c):
    """The host hot-added a DIMM: wait until the guest has onlined it movable, so the
    mapping's pages are faulted in there."""
    c.rep[Key.MOVABLE_PAGES] = wait_movable_memory(30)


def run(c):
    m, rep = c.m, c.rep
    bs = int(read_file(f"{MEMDIR}/block_size_bytes").strip(), 16)
    blocks = sorted({p * PAGE // bs for p in rep[Key.PFNS_BEFORE] if isinstance(p, int)})
    zones = {b: read_file(f"{MEMDIR}/memory{b}/valid_zones").strip() for b in blocks}
    rep[Key.BLOCKS] = zones
    movable = [b for b in blocks if zones[b].startswith("Movable")]
    rep[Key.OFFLINE] = [offline_block(b, 3) for b in movable]
    rep[Key.PFNS_AFTER_EVENT] = m.pfns()
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    rep[Key.PFNS_AFTER_TOUCH] = m.pfns()
