"""A long odp stream under truncates and reclaims, checking the data (stdlib only).

    python3 -m pinlab.guest.odp_soak [--seconds 60] [--pages 256] [--seed 1]

One memfd, mapped MAP_SHARED and registered in odp mode; the device streams the pattern
over it without pause while this loop, at random, shrinks and regrows the memfd
(ftruncate: the truncated pages are revoked), reclaims part of it (MADV_PAGEOUT) or drops
it from the page tables (MADV_DONTNEED). Every --check seconds the stream is stopped and
every word is checked: it must be 0 (a page truncated since the stream last wrote it) or a
pattern word of this region at its own offset (any generation): anything else is a data
mismatch. The stream is then restarted with the next generation. Prints one JSON summary
line: seconds, actions, stream chunks, invalidations, faults, mismatches.
"""

import argparse
import ctypes
import json
import mmap
import os
import random
import struct
import time

from pinlab.guest import pinlab_ioctl as P

PAGE = 4096
MADV_DONTNEED, MADV_PAGEOUT = 4, 21
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def mismatches(m, rid, length):
    """Words that are neither 0 nor this region's pattern at their own offset."""
    bad = 0
    words = struct.unpack_from(f"<{length // 8}Q", m, 0)
    r16 = rid & 0xFFFF
    for i, w in enumerate(words):
        if w and ((w >> 48) != r16 or (w & 0xFFFFFFFF) != i):
            bad += 1
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check", type=float, default=5, help="seconds between data checks")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    ln = a.pages * PAGE
    fd = os.memfd_create("soak")
    os.ftruncate(fd, ln)
    m = mmap.mmap(fd, ln, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    addr = P.buffer_address(m)
    actions = {"truncate": 0, "pageout": 0, "dontneed": 0}
    chunks = checks = bad = 0
    gen = 1
    with P.PinlabDevice() as dev:
        rid = dev.register(addr, ln, "odp")
        dev.stream_start(rid, 0, ln, generation=gen, chunk=PAGE, interval_us=0)
        t0 = time.monotonic()
        next_check = t0 + a.check
        while (now := time.monotonic()) - t0 < a.seconds:
            act = rng.choice(list(actions))
            first = rng.randrange(a.pages)
            n = rng.randint(1, a.pages - first)
            if act == "truncate":
                os.ftruncate(fd, first * PAGE)
                os.ftruncate(fd, ln)
            else:
                advice = MADV_PAGEOUT if act == "pageout" else MADV_DONTNEED
                libc.madvise(addr + first * PAGE, n * PAGE, advice)
            actions[act] += 1
            time.sleep(rng.choice([0, 0.001, 0.01]))
            if now >= next_check:
                chunks += dev.stream_stop(rid)
                bad += mismatches(m, rid, ln)
                checks += 1
                gen = gen % 0xFFFF + 1
                dev.stream_start(rid, 0, ln, generation=gen, chunk=PAGE, interval_us=0)
                next_check = time.monotonic() + a.check
        chunks += dev.stream_stop(rid)
        bad += mismatches(m, rid, ln)
        checks += 1
        q = dev.query(rid)
        dev.deregister(rid)
    m.close()
    os.close(fd)
    print(json.dumps({"seconds": round(time.monotonic() - t0, 1), "pages": a.pages,
                      "actions": actions, "stream_chunks": chunks, "checks": checks,
                      "invalidations": q["invalidations"], "faults": q["faults"],
                      "mismatches": bad}), flush=True)


if __name__ == "__main__":
    main()
