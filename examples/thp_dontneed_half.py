#!/usr/bin/env python3
"""Experiment: MADV_DONTNEED of half of a pinned transparent huge page.

Run in an up guest:  pinlab run lab examples/thp_dontneed_half.py [--mode longterm]

A 2 MiB-aligned anonymous range with MADV_HUGEPAGE is faulted in as one THP (smaps
AnonHugePages), registered with the device (pinned), written by the device (generation 1).
Then the process drops the second half with MADV_DONTNEED, which splits the PMD mapping
(vmstat thp_split_pmd) and unmaps those 256 pages from the process, but the pin keeps the
folio. The process touches the second half again (new zero pages), and the device writes
generation 2 over the whole range: the report says which half the process sees it in, and
what the device reads back there (DMA_READ's CRC-32 against the mapping's bytes).
The last line of output is the JSON report.

Kernel behaviour involved: zap of part of a PMD-mapped THP splits the PMD
(__split_huge_pmd, mm/huge_memory.c); a pinned folio is not freed while pinned
(Documentation/core-api/pin_user_pages.rst).
"""
import argparse
import json
import mmap
import os

from pinlab.guest import pinlab_ioctl, pinlab_kmsg, pinlab_mm

PAGE, HPAGE = pinlab_mm.PAGE, pinlab_mm.HPAGE
N = HPAGE // PAGE
HALF = N // 2


def states(buf, rid, gen, first, count):
    """How many of pages [first, first+count) hold generation gen of the pattern."""
    good = 0
    for i in range(first, first + count):
        bad = pinlab_ioctl.check_pattern(buf, rid, gen, i * PAGE, PAGE, max_mismatches=1)
        good += not bad
    return good


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="longterm", choices=sorted(pinlab_ioctl.MODES))
    p.add_argument("--device", default=None, help="default: the first /dev/pinlabN")
    a = p.parse_args()
    rep = {"kernel": os.uname().release, "mode": a.mode, "thp": pinlab_mm.thp_setting()}
    mark = pinlab_kmsg.mark()
    big = mmap.mmap(-1, 2 * HPAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = pinlab_mm.address(big)
    skip = (-base) % HPAGE
    addr = base + skip                               # 2 MiB aligned
    buf = memoryview(big)[skip:skip + HPAGE]
    pinlab_mm.madvise(addr, HPAGE, pinlab_mm.MADV_HUGEPAGE)
    buf[0:1] = b"\1"                                 # one fault: the whole THP
    rep["thp_before"] = pinlab_mm.huge_pages(addr)["anon"]
    pfns0 = pinlab_mm.pagemap(addr, N)
    rep["contiguous"] = all(isinstance(x, int) for x in pfns0) and \
        pfns0 == list(range(pfns0[0], pfns0[0] + N))
    pins0 = pinlab_mm.pins()
    v0 = pinlab_mm.vmstat()
    with pinlab_ioctl.PinlabDevice(a.device) as dev:
        rid = dev.register(addr, HPAGE, a.mode)
        rep["pins_taken"] = pinlab_mm.pins() - pins0
        dev.dma_write(rid, 0, HPAGE, 1)
        rep["g1_pages"] = states(buf, rid, 1, 0, N)
        pinlab_mm.madvise(addr + HPAGE // 2, HPAGE // 2, pinlab_mm.MADV_DONTNEED)
        rep["vmstat_dontneed"] = pinlab_mm.delta(v0, pinlab_mm.vmstat())
        rep["thp_after_dontneed"] = pinlab_mm.huge_pages(addr)["anon"]
        pm = pinlab_mm.pagemap(addr, N)
        rep["second_half_mapped_after_dontneed"] = sum(x is not None for x in pm[HALF:])
        rep["first_half_kept"] = pm[:HALF] == pfns0[:HALF]
        buf[HPAGE // 2:] = bytes(HPAGE // 2)            # the process touches it again
        pm2 = pinlab_mm.pagemap(addr, N)
        rep["second_half_new_pfns"] = pinlab_mm.moved(pfns0[HALF:], pm2[HALF:])
        rep["pins_while_registered"] = pinlab_mm.pins() - pins0
        dev.dma_write(rid, 0, HPAGE, 2)
        rep["g2_first_half"] = states(buf, rid, 2, 0, HALF)
        rep["g2_second_half"] = states(buf, rid, 2, HALF, HALF)
        half = bytes(buf[HPAGE // 2:])
        crc, _ = dev.dma_read(rid, HPAGE // 2, HPAGE // 2)
        rep["device_reads_second_half_as_process"] = crc == pinlab_ioctl.dma_crc32(half)
        rep["query"] = {k: v for k, v in dev.query(rid).items()
                        if k in ("pinned", "maybe_dma_pinned", "state", "invalidations")}
        dev.deregister(rid)
    rep["pins_left"] = pinlab_mm.pins() - pins0
    rep["vmstat"] = pinlab_mm.delta(v0, pinlab_mm.vmstat())
    buf.release()
    big.close()
    rep["dmesg"] = pinlab_kmsg.since(mark)
    split = rep["vmstat_dontneed"].get("thp_split_pmd", 0)
    print(f"{a.mode}: THP {rep['thp_before']} -> {rep['thp_after_dontneed']} after "
          f"MADV_DONTNEED of half (thp_split_pmd +{split}); "
          f"device generation 2 seen by the process in {rep['g2_first_half']}/{HALF} pages "
          f"of the kept half and {rep['g2_second_half']}/{HALF} of the dropped half; "
          f"pins left after deregister: {rep['pins_left']}", flush=True)
    print(json.dumps(rep))


if __name__ == "__main__":
    main()
