"""Random ioctls on /dev/pinlab0 from several threads (stdlib only).

    python3 -m pinlab.guest.ioctl_fuzz --iterations N [--threads T] [--seed S] [--deadline SECONDS]

Random ioctl numbers, sizes and arguments, random registrations in every mode,
deregister racing DMA and streams, and closing a file while another thread streams
on it.  Prints one JSON progress line on stderr every --progress seconds
({"progress": done, "total": N}) and one JSON summary line on stdout at the end, also
when --deadline stops it early ("deadline_hit": true).  Only the kernel's reaction
matters: the caller checks dmesg and the pin counters.
"""

import argparse
import ctypes
import errno
import fcntl
import json
import mmap
import os
import random
import sys
import threading
import time

from pinlab.guest import pinlab_ioctl as P

PAGE = 4096
IOCS = [P.PINLAB_IOC_REGISTER, P.PINLAB_IOC_DEREGISTER, P.PINLAB_IOC_DMA_WRITE,
        P.PINLAB_IOC_DMA_READ, P.PINLAB_IOC_STREAM_START, P.PINLAB_IOC_STREAM_STOP,
        P.PINLAB_IOC_QUERY, P.PINLAB_IOC_DIRTY, P.PINLAB_IOC_FENCE]
counts = {}
lock = threading.Lock()
progress = {"done": 0}
stop = threading.Event()   # the deadline passed: every thread stops at its next step


def count(key):
    with lock:
        counts[key] = counts.get(key, 0) + 1


def rand_ioctl_nr(rng):
    c = rng.random()
    if c < 0.5:
        return rng.choice(IOCS)
    if c < 0.8:   # right nr, wrong size/direction
        nr = rng.randint(0, 12)
        size = rng.choice([0, 1, 8, 16, 32, 40, 80, 81, 4096, 16383])
        return P._IOC(rng.randint(0, 3), "P", nr, size)
    return rng.getrandbits(32)


def one_op(rng, dev, bufs, regions):
    c = rng.random()
    if c < 0.25:   # random raw ioctl with random bytes
        arg = bytearray(rng.getrandbits(8) for _ in range(rng.choice([16, 32, 40, 80, 128])))
        if regions and rng.random() < 0.7:
            arg[0:4] = rng.choice(regions).to_bytes(4, "little")
        try:
            fcntl.ioctl(dev.fd, rand_ioctl_nr(rng), arg, True)
            count("raw-ok")
        except OSError as e:
            count(f"raw-{errno.errorcode.get(e.errno, e.errno)}")
        except (OverflowError, ValueError):
            count("raw-py")
        return
    if c < 0.45:   # register
        m = rng.choice(bufs)
        n = len(m) // PAGE
        first = rng.randint(0, n - 1)
        cnt = rng.randint(1, n - first)
        addr = P.buffer_address(m) + first * PAGE
        if rng.random() < 0.1:
            addr += rng.choice([1, 8, 1 << 46, 1 << 47])  # never into other mappings
        mode = rng.choice([0, 1, 2, 3, 3, rng.randint(4, 1 << 31)])
        try:
            rid = dev.register(addr, cnt * PAGE, mode,
                               readonly=rng.random() < 0.2)
            regions.append(rid)
            count("reg-ok")
        except OSError as e:
            count(f"reg-{errno.errorcode.get(e.errno, e.errno)}")
        return
    rid = rng.choice(regions) if regions and rng.random() < 0.9 else rng.randint(0, 70000)
    off = rng.choice([0, 8, PAGE, rng.randint(0, 1 << 20) & ~7, rng.getrandbits(64)])
    ln = rng.choice([8, PAGE, 2 * PAGE, 64 * PAGE, rng.randint(0, 1 << 21), 0])
    ops = [
        ("dereg", lambda: (dev.deregister(rid), regions.remove(rid) if rid in regions else 0)),
        ("write", lambda: dev.dma_write(rid, off, ln, rng.choice([1, 2, 0, 70000]))),
        ("read", lambda: dev.dma_read(rid, off, ln)),
        ("sstart", lambda: dev.stream_start(rid, off & 0xFFFF, ln or 8, 1,
                                            rng.choice([0, 8, 4096, 1 << 20, 3]),
                                            rng.choice([0, 10, 1000]))),
        ("sstop", lambda: dev.stream_stop(rid)),
        ("query", lambda: dev.query(rid)),
        ("dirty", lambda: dev.dirty(rid)),
        ("fence", lambda: dev.fence()),
        ("madv", lambda: rng.choice(bufs).madvise(mmap.MADV_DONTNEED, 0, PAGE * rng.randint(1, 4))),
    ]
    name, fn = rng.choice(ops)
    try:
        fn()
        count(f"{name}-ok")
    except OSError as e:
        count(f"{name}-{errno.errorcode.get(e.errno, e.errno)}")
    except (OverflowError, ValueError, ctypes.ArgumentError):
        count(f"{name}-py")


def worker(seed, iterations, shared):
    rng = random.Random(seed)
    bufs = [mmap.mmap(-1, PAGE * rng.choice([4, 16, 64])) for _ in range(3)]
    fd = os.memfd_create("fz")
    os.ftruncate(fd, 16 * PAGE)
    bufs.append(mmap.mmap(fd, 16 * PAGE))
    dev = shared if shared is not None and rng.random() < 0.5 else P.PinlabDevice()
    regions = []
    for _ in range(iterations):
        if stop.is_set():
            break
        with lock:
            progress["done"] += 1
        if dev.fd is None:
            dev = P.PinlabDevice()
            regions = []
        one_op(rng, dev, bufs, regions)
        if rng.random() < 0.01:
            os.ftruncate(fd, rng.choice([0, 8 * PAGE, 16 * PAGE]))
            os.ftruncate(fd, 16 * PAGE)
            count("ftruncate")
        if dev is not shared and rng.random() < 0.02:   # close with regions/streams
            dev.close()
            count("close")
    if dev is not shared:
        dev.close()


def racer(seed, iterations):
    """deregister vs stream vs DMA on one region, and close while streaming."""
    rng = random.Random(seed)
    m = mmap.mmap(-1, 32 * PAGE)
    for _ in range(max(1, iterations // 50)):
        if stop.is_set():
            break
        dev = P.PinlabDevice()
        try:
            rid = dev.register(P.buffer_address(m), len(m), rng.choice(["pin", "odp", "gup"]))
            dev.stream_start(rid, 0, len(m), 1, 4096, 0)
        except OSError:
            dev.close()
            continue

        def hammer(dev=dev, rid=rid):
            for _ in range(20):
                try:
                    dev.dma_write(rid, 0, len(m), 3)
                except (OSError, TypeError):
                    count("race-write-err")
        t = threading.Thread(target=hammer)
        t.start()
        if rng.random() < 0.5:
            try:
                dev.deregister(rid)
                count("race-dereg")
            except OSError:
                count("race-dereg-err")
        else:
            m.madvise(mmap.MADV_DONTNEED)
        t.join()
        dev.close()
        count("race-close")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=0,
                    help="stop after this many seconds (0: never)")
    ap.add_argument("--progress", type=float, default=5, help="seconds between progress lines")
    a = ap.parse_args()
    t0 = time.monotonic()
    total = a.iterations * a.threads
    shared = P.PinlabDevice()
    ths = [threading.Thread(target=worker, args=(a.seed * 100 + i, a.iterations, shared))
           for i in range(a.threads)]
    ths.append(threading.Thread(target=racer, args=(a.seed, a.iterations)))
    for t in ths:
        t.start()
    while alive := [t for t in ths if t.is_alive()]:
        alive[0].join(a.progress)
        elapsed = time.monotonic() - t0
        if a.deadline and elapsed > a.deadline:
            stop.set()
        with lock:
            done = progress["done"]
        print(json.dumps({"progress": done, "total": total, "elapsed": round(elapsed, 1)}),
              file=sys.stderr, flush=True)
    shared.close()
    print(json.dumps({"iterations": a.iterations, "threads": a.threads, "seed": a.seed,
                      "done": progress["done"], "total": total,
                      "elapsed": round(time.monotonic() - t0, 1),
                      "deadline_hit": stop.is_set(),
                      "counts": dict(sorted(counts.items()))}), flush=True)


if __name__ == "__main__":
    main()
