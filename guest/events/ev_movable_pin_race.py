"""Event ``movable-pin-race``: the guest's steps.

Long-term pins of pages in ZONE_MOVABLE (and in the CMA area, where the kernel has one),
taken at once from two threads right after the pages were faulted in on another CPU
(docs/pinning-semantics.md rows 79-81). A FOLL_LONGTERM pin must first migrate every
page out of a movable or CMA pageblock (Documentation/core-api/pin_user_pages.rst,
"FOLL_LONGTERM"); a page that is off the LRU at that moment (still in a per-CPU LRU
batch, or isolated by the other pinner) is the case 1aaf8c122918 and its revert
517f496e1e61 are about.

The host hot-added a DIMM that the guest onlined movable (scenario ``mem_offline``, as
for mem-offline). The cell's own registration is made as usual. Then ROUNDS rounds, each
on a fresh mapping of the cell's backing (phase ``movable``), SINGLE_ROUNDS with one
pinner only (phase ``single``), and where the kernel has a CMA area ROUNDS more with the
pages faulted in on node 1, where the CMA lies (phase ``cma``): its pages are faulted in
on CPU 1, and two
threads, one on CPU 0 and one on CPU 1, register the whole range at once (a barrier);
after both returned, the pagemap PFNs are checked against the online Movable blocks
(``valid_zones``) and the CMA range (``cma: Reserved`` in the kernel log); both regions
are deregistered and the mapping unmapped. Finally the Movable blocks that held any of
the pages are offlined while the cell's own registration is held, the device writes
generation 2 and the mapping is scanned.

Recorded under ``race``: the movable blocks, the CMA ranges, and per round the pages
faulted in Movable/CMA, the two registrations' errnos and the PFNs left pinned in
Movable/CMA. Host side: orchestrator/events/ev_movable_pin_race.py.
"""
import os
import re
import threading

from pinlab.common.vocab import Key
from pinlab.guest import pinlab_kmsg
from pinlab.guest.pinlab_cell import (
    MEMDIR,
    PAGE,
    Mapping,
    errname,
    now_ms,
    offline_block,
    wait_movable_memory,
)
from pinlab.guest.pinlab_mm import MPOL_BIND, MPOL_DEFAULT, read_file, set_mempolicy

NAME = "movable-pin-race"
#: registration races per phase
ROUNDS = 50
#: rounds of phase "single": the same, with one pinner (on CPU 0) only; tells a failure
#: of two concurrent pinners apart from one a lone pinner meets (pages in an LRU batch)
SINGLE_ROUNDS = 25
#: the CPU the pages are faulted on, and the two pinners' CPUs
FAULT_CPU = 1
PIN_CPUS = (0, 1)
#: the node whose memory is mostly CMA in a guest with a CMA area: node 1 (256 MiB,
#: orchestrator/guestenv.py NUMA_MB) held two of 7.3's three 64 MiB areas (observed), so
#: its free CMA pages outnumber half its free pages and movable allocations there take
#: CMA (mm/page_alloc.c __rmqueue(), docs/pinning-semantics.md row 81)
CMA_NODE = 1
CMA_LINE = re.compile(r"cma: Reserved (\d+) MiB at (0x[0-9a-f]+)")


def before_mapping(c):
    """The host hot-added a DIMM: wait until the guest onlined it movable, so the
    mapping's pages are faulted in there."""
    c.rep[Key.MOVABLE_PAGES] = wait_movable_memory(30)


def movable_blocks():
    """The online memory blocks whose zone is Movable (set of block numbers)."""
    out = set()
    for name in os.listdir(MEMDIR):
        if not name.startswith("memory") or not name[6:].isdigit():
            continue
        try:
            state = read_file(f"{MEMDIR}/{name}/state").strip()
            zones = read_file(f"{MEMDIR}/{name}/valid_zones").strip()
        except OSError:
            continue
        if state == "online" and zones.startswith("Movable"):
            out.add(int(name[6:]))
    return out


def cma_ranges():
    """[(first PFN, PFN after the last)] of every CMA area the kernel reserved at boot
    (its ``cma: Reserved N MiB at 0x...`` line; none without CONFIG_CMA or cma=)."""
    out = []
    for line in pinlab_kmsg.since(0):
        mt = CMA_LINE.search(line)
        if mt:
            base = int(mt.group(2), 16) // PAGE
            out.append((base, base + (int(mt.group(1)) << 20) // PAGE))
    return out


def _where(pfns, blocks, bs, cma):
    mov = [p for p in pfns if isinstance(p, int) and p * PAGE // bs in blocks]
    inc = [p for p in pfns if isinstance(p, int) and any(a <= p < b for a, b in cma)]
    return mov, inc


def _pin(c, m, cpu, barrier, out, i):
    os.sched_setaffinity(0, {cpu})
    barrier.wait(10)
    try:
        out[i] = c.dev.register(m.addr, m.size, c.a.mode)
    except OSError as exc:
        out[i] = exc


def race_round(c, blocks, bs, cma, phase):
    """One round: fault a fresh mapping on FAULT_CPU (phase "cma": with the memory policy
    bound to CMA_NODE), register it from two threads at once, check where the pinned
    pages are, release. Returns the round's record."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {FAULT_CPU})
    if phase == "cma":
        set_mempolicy(MPOL_BIND, (CMA_NODE,))
    try:
        m = Mapping(c.stack, c.m.kind, c.rep, tag="race")
    finally:
        if phase == "cma":
            set_mempolicy(MPOL_DEFAULT)
        os.sched_setaffinity(0, cpus)
    before = m.pfns()
    fmov, fcma = _where(before, blocks, bs, cma)
    pinners = PIN_CPUS[:1] if phase == "single" else PIN_CPUS
    res = [None] * len(pinners)
    barrier = threading.Barrier(len(pinners))
    ts = [threading.Thread(target=_pin, args=(c, m, cpu, barrier, res, i))
          for i, cpu in enumerate(pinners)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    after = m.pfns()
    pmov, pcma = _where(after, blocks, bs, cma)
    errnos = [0 if isinstance(r, int) else (errname(r.errno) if isinstance(r, OSError)
                                            else "no result") for r in res]
    for r in res:
        if isinstance(r, int):
            c.dev.deregister(r)
    m.unmap()
    m._close_fd()
    rec = {Key.FAULTED_IN_MOVABLE: len(fmov), Key.FAULTED_IN_CMA: len(fcma),
           Key.ERRNOS: errnos, Key.PINNED_IN_MOVABLE: pmov if all(e == 0 for e in errnos)
           else [], Key.PINNED_IN_CMA: pcma if all(e == 0 for e in errnos) else []}
    rec[Key.BLOCKS] = sorted({p * PAGE // bs for p in before if isinstance(p, int)})
    rec[Key.PHASE] = phase
    return rec


def run(c):
    m, rep = c.m, c.rep
    bs = int(read_file(f"{MEMDIR}/block_size_bytes").strip(), 16)
    blocks = movable_blocks()
    cma = cma_ranges()
    race = rep[Key.RACE] = {Key.MOVABLE_BLOCKS: sorted(blocks), Key.BLOCK_BYTES: bs,
                            Key.CMA_RANGES: cma}
    with open("/proc/meminfo") as f:
        race[Key.CMA] = {k: int(v.split()[0]) for k, v in
                         (ln.split(":", 1) for ln in f) if k.startswith("Cma")}
    reg_mov, reg_cma = _where(rep[Key.PFNS_REGISTERED], blocks, bs, cma)
    race[Key.CELL_PINNED_IN_MOVABLE] = reg_mov
    race[Key.CELL_PINNED_IN_CMA] = reg_cma
    t0 = now_ms()
    phases = [("movable", ROUNDS), ("single", SINGLE_ROUNDS)]
    if cma:
        phases.append(("cma", ROUNDS))
    rounds = race[Key.ROUNDS] = [race_round(c, blocks, bs, cma, ph)
                                 for ph, n in phases for _ in range(n)]
    race[Key.MS] = round(now_ms() - t0, 1)
    touched = {b for r in rounds for b in r[Key.BLOCKS]}
    touched |= {p * PAGE // bs for p in rep[Key.PFNS_BEFORE] if isinstance(p, int)}
    rep[Key.BLOCKS] = {b: read_file(f"{MEMDIR}/memory{b}/valid_zones").strip()
                       for b in sorted(touched)}
    rep[Key.OFFLINE] = [offline_block(b, 3) for b in sorted(touched & blocks)]
    rep[Key.PFNS_AFTER_EVENT] = m.pfns()
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    rep[Key.PFNS_AFTER_TOUCH] = m.pfns()
