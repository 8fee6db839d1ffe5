"""Event ``ksm``: the guest's steps (module ``ev_ksm``).

KSM over the registered anonymous range and an identical twin: both (and an unregistered
control pair of identical pages) get MADV_MERGEABLE, ksmd runs (``run=1``, a large
``pages_to_scan``, a short ``sleep_millisecs``) until the control pair is merged and two
more full scans are done, or DEADLINE_S. ksmd is stopped (``run=0``, merged pages stay
merged) before the device writes generation 2. Recorded in ``Key.KSM``: how many
registered pages share their PFN with the twin's page (merged), how many carry the
KPF_KSM bit in /proc/kpageflags, the control pair's merge, ksmd's full scans, the wait,
/sys/kernel/mm/ksm pages_shared/pages_sharing and /proc/self/ksm_merging_pages. Then the
PFNs, generation 2, and scans of the mapping and of the twin (the twin must keep
generation 1: the device's write never reaches a page the twin maps).

Runs on a prepared cell (pinlab_cell.Cell: registered, generation 1 written); the host
side is orchestrator/events/ev_ksm.py.
"""
import contextlib
import struct
import time

from pinlab.common.vocab import Key
from pinlab.guest.pinlab_cell import PAGE, Mapping, now_ms, scan, timed
from pinlab.guest.pinlab_mm import (
    KPF_KSM,
    MADV_MERGEABLE,
    kpageflags,
    madvise,
    read_file,
    write_file,
)

NAME = "ksm"
KSM = "/sys/kernel/mm/ksm"
#: seconds ksmd gets to merge the control pair and scan twice more
DEADLINE_S = 30
#: pages of the unregistered control pair (each page identical in both mappings)
CONTROL = 4
#: ksmd settings for the event (restored afterwards)
KNOBS = {"pages_to_scan": "1000", "sleep_millisecs": "10"}


def _ksm(name):
    with contextlib.suppress(OSError, ValueError):
        return int(read_file(f"{KSM}/{name}").strip())
    return None


def _merged(a, b):
    return sum(1 for x, y in zip(a, b, strict=True) if isinstance(x, int) and x == y)


def _ksm_flag(pfns):
    return sum(1 for w in kpageflags(pfns) if w is not None and w >> KPF_KSM & 1)


def _restore(saved):
    for k, v in saved.items():
        with contextlib.suppress(OSError):
            write_file(f"{KSM}/{k}", v)


def run(c):
    m, rep = c.m, c.rep
    twin = Mapping(c.stack, "anon", rep, tag="twin", npages=m.npages)
    twin.mm[:m.size] = m.mm[:m.size]          # generation 1, page for page
    ctl = [Mapping(c.stack, "anon", rep, tag=f"ksm-control-{x}", npages=CONTROL)
           for x in "ab"]
    words = b"".join(struct.pack("<Q", 0xC0_7702_0000_0000 | i) * (PAGE // 8)
                     for i in range(CONTROL))
    for mp in ctl:
        mp.mm[:mp.size] = words
    saved = {k: read_file(f"{KSM}/{k}").strip() for k in (*KNOBS, "run")}
    c.stack.callback(_restore, saved)
    for tag, mp in (("registered", m), ("twin", twin), ("control_a", ctl[0]),
                    ("control_b", ctl[1])):
        timed(rep, f"madv_mergeable_{tag}", madvise, mp.addr, mp.size, MADV_MERGEABLE)
    for k, v in KNOBS.items():
        write_file(f"{KSM}/{k}", v)
    scans0 = _ksm("full_scans")
    t0 = now_ms()
    timed(rep, "ksm_run", write_file, f"{KSM}/run", "1")
    at_control = None
    while now_ms() - t0 < DEADLINE_S * 1000:
        scans = _ksm("full_scans")
        if at_control is None and _merged(ctl[0].pfns(), ctl[1].pfns()) == CONTROL:
            at_control = scans
        if at_control is not None and scans is not None and scans >= at_control + 2:
            break
        time.sleep(0.05)
    wait_ms = round(now_ms() - t0, 1)
    timed(rep, "ksm_stop", write_file, f"{KSM}/run", "0")
    pa, tw = m.pfns(), twin.pfns()
    ca, cb = ctl[0].pfns(), ctl[1].pfns()
    merging = None
    with contextlib.suppress(OSError, ValueError):
        merging = int(read_file("/proc/self/ksm_merging_pages").strip())
    rep[Key.KSM] = {
        "registered_merged": _merged(pa, tw), "registered_ksm_flag": _ksm_flag(pa),
        "twin_ksm_flag": _ksm_flag(tw), "control_merged": _merged(ca, cb),
        "control_ksm_flag": _ksm_flag(ca), "control_pages": CONTROL,
        "full_scans_start": scans0, "full_scans_at_control": at_control,
        "full_scans_end": _ksm("full_scans"), "wait_ms": wait_ms,
        "pages_shared": _ksm("pages_shared"), "pages_sharing": _ksm("pages_sharing"),
        "ksm_merging_pages": merging, "knobs": KNOBS, "saved": saved}
    rep[Key.PFNS_AFTER_EVENT] = pa
    rep[Key.TWIN_PFNS] = tw
    c.dma(2)
    rep[Key.MAP_G2] = c.scan_map()
    rep[Key.MAP_TWIN_G2] = scan(twin.mm, c.rid, twin.npages)
    rep[Key.PFNS_AFTER_TOUCH] = m.pfns()
