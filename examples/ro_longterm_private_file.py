#!/usr/bin/env python3
"""Experiment: a read-only pin of a MAP_PRIVATE ext4 file mapping nobody has written yet,
then a CPU write through the mapping. Does the device still see what the process sees?

Run in an up guest:  pinlab run lab examples/ro_longterm_private_file.py [--modes longterm,pin]

Per mode: the file gets known contents (written with write(2), so the private mapping has
no copy-on-write pages yet), is mapped MAP_PRIVATE and read-faulted (its PTEs point at
page-cache pages), registered read-only (no FOLL_WRITE), read by the device (DMA_READ's
CRC-32); then the process writes every page and the device reads again. The report says
which pages' PFNs changed at registration and at the write, and whose bytes the device
read: the mapping's (what the process sees now) or the file's (the page cache).

Kernel behaviour involved: where the kernel has it, a FOLL_LONGTERM R/O pin of a page in a
private ("COW") mapping breaks COW first (FAULT_FLAG_UNSHARE, decided by gup_must_unshare()
in mm/internal.h; tools/testing/selftests/mm/cow.c tests R/O long-term pins in private
file mappings); a short-term R/O pin does not. 6.12 unshares, 6.1 does not.
The last line of output is the JSON report.
"""
import argparse
import json
import mmap
import os

from pinlab.guest import pinlab_ioctl, pinlab_kmsg, pinlab_mm

PAGE = pinlab_mm.PAGE


def one(mode, path, npages, device):
    size = npages * PAGE
    original = b"".join(bytes([0x40 + i % 26]) * PAGE for i in range(npages))
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    rep = {"mode": mode, "file": path, "pages": npages}
    try:
        os.write(fd, original)
        os.fsync(fd)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
        addr = pinlab_mm.address(mm)
        for off in range(0, size, PAGE):         # read faults only: no COW yet
            _ = mm[off]
        rep["pagemap_mapped"] = pinlab_mm.pagemap_detail(addr, npages)[0]
        pfn_mapped = pinlab_mm.pagemap(addr, npages)
        pins0 = pinlab_mm.pins()
        with pinlab_ioctl.PinlabDevice(device) as dev:
            rid = dev.register(addr, size, mode, readonly=True)
            pfn_reg = pinlab_mm.pagemap(addr, npages)
            rep["pins_taken"] = pinlab_mm.pins() - pins0
            rep["moved_at_register"] = pinlab_mm.moved(pfn_mapped, pfn_reg)
            rep["anon_bytes_after_register"] = pinlab_mm.smaps(addr).get("Anonymous", 0)
            crc_dev, n = dev.dma_read(rid, 0, size)
            rep["before_write"] = {"device_reads_mapping":
                                   crc_dev == pinlab_ioctl.dma_crc32(mm[:]),
                                   "bytes": n}
            mm[:] = b"\xc5" * size                  # the CPU write, every page
            pfn_written = pinlab_mm.pagemap(addr, npages)
            rep["moved_at_write"] = pinlab_mm.moved(pfn_reg, pfn_written)
            rep["anon_bytes_after_write"] = pinlab_mm.smaps(addr).get("Anonymous", 0)
            crc_dev, _ = dev.dma_read(rid, 0, size)
            rep["after_write"] = {
                "device_reads_mapping": crc_dev == pinlab_ioctl.dma_crc32(mm[:]),
                "device_reads_file": crc_dev == pinlab_ioctl.dma_crc32(os.pread(fd, size, 0)),
                "device_reads_original": crc_dev == pinlab_ioctl.dma_crc32(original)}
            rep["query"] = {k: v for k, v in dev.query(rid).items()
                            if k in ("pinned", "maybe_dma_pinned", "state")}
            dev.deregister(rid)
        rep["pins_left"] = pinlab_mm.pins() - pins0
        mm.close()
    finally:
        os.close(fd)
        os.unlink(path)
    return rep


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="longterm,pin")
    p.add_argument("--dir", default="/mnt/pinlab-ext4", help="an ext4 mount (up has one)")
    p.add_argument("--pages", type=int, default=16)
    p.add_argument("--device", default=None, help="default: the first /dev/pinlabN")
    a = p.parse_args()
    mark = pinlab_kmsg.mark()
    out = {"kernel": os.uname().release, "modes": []}
    for mode in a.modes.split(","):
        r = one(mode, f"{a.dir}/ro-private-{mode}.dat", a.pages, a.device)
        aw = r["after_write"]
        seen = ("the CPU write (what the process sees)" if aw["device_reads_mapping"] else
                "the file's page cache (stale for the process)" if aw["device_reads_file"]
                else "neither")
        print(f"{mode:9s} R/O pin: {r['moved_at_register']}/{a.pages} PFNs changed at "
              f"registration, {r['moved_at_write']} at the CPU write; after the write the "
              f"device reads {seen}", flush=True)
        out["modes"].append(r)
    out["dmesg"] = pinlab_kmsg.since(mark)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
