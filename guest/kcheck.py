"""Guest-side runtime checks of pinlab.ko (stdlib only): every mode, bad input, odp revoke.

    python3 -m pinlab.guest.kcheck modes|ext4|odp|escalate-prep ...
        -> one JSON line per check, then a summary
"""

import ctypes
import errno
import json
import mmap
import os
import subprocess
import sys
import zlib

from pinlab.guest.pinlab_ioctl import PinlabDevice, PinlabError, buffer_address, check_pattern

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_DONTNEED, MADV_PAGEOUT = 4, 21
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
RESULTS = []


def vmstat():
    try:
        with open("/proc/sys/vm/stat_refresh", "w") as f:
            f.write("1")
    except OSError:
        pass
    out = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k.startswith("nr_foll_pin"):
                out[k] = int(v)
    return out


def outstanding():
    v = vmstat()
    return v.get("nr_foll_pin_acquired", 0) - v.get("nr_foll_pin_released", 0)


def record(name, ok, **info):
    RESULTS.append({"check": name, "ok": bool(ok), **info})
    print(json.dumps(RESULTS[-1]), flush=True)


def anon(npages):
    p = libc.mmap(None, npages * PAGE, PROT_RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    ctypes.memset(p, 0, npages * PAGE)
    return p


def view(addr, length):
    return (ctypes.c_char * length).from_address(addr)


def errno_of(fn, *a, **kw):
    try:
        fn(*a, **kw)
        return 0
    except OSError as e:
        return e.errno


def check_mode(dev, mode, npages=64):
    base = outstanding()
    addr = anon(npages)
    ln = npages * PAGE
    rid = dev.register(addr, ln, mode)
    q = dev.query(rid)
    n = dev.dma_write(rid, 0, ln, generation=5)
    bad = check_pattern(view(addr, ln), rid, 5, max_mismatches=4)
    crc, nb = dev.dma_read(rid, 0, ln)
    crc_ok = crc == zlib.crc32(bytes(view(addr, ln))) and nb == ln
    dirty = dev.dirty(rid) if mode != "odp" else None
    q2 = dev.query(rid)
    st = dev.deregister(rid)
    libc.munmap(addr, ln)
    leak = outstanding() - base
    record(f"{mode}:basic", n == ln and not bad and crc_ok and st == 0 and leak == 0
           and q["pinned"] == npages and q2["state"] == 0,
           written=n, mismatches=len(bad), crc_ok=crc_ok, dirty=dirty, query=q, leak=leak)

    # the pin path: slow by default; fast (get/pin_user_pages_fast) on request, refused
    # for odp, which pins nothing
    if mode == "odp":
        addr = anon(npages)
        ferr = errno_of(dev.register, addr, ln, mode, fast=True)
        libc.munmap(addr, ln)
        record(f"{mode}:fast-refused", ferr == errno.EINVAL and q["gup_path"] == 0,
               fast_errno=ferr, gup_path=q["gup_path"])
    else:
        base = outstanding()
        addr = anon(npages)
        rid = dev.register(addr, ln, mode, fast=True)
        qf = dev.query(rid)
        n = dev.dma_write(rid, 0, ln, generation=6)
        bad = check_pattern(view(addr, ln), rid, 6, max_mismatches=4)
        dev.deregister(rid)
        libc.munmap(addr, ln)
        leak = outstanding() - base
        record(f"{mode}:fast", q["gup_path"] == 1 and qf["gup_path"] == 2 and n == ln
               and not bad and qf["pinned"] == npages and leak == 0,
               slow_path=q["gup_path"], fast_path=qf["gup_path"], mismatches=len(bad),
               leak=leak)

    # read-only registration
    base = outstanding()
    addr = anon(npages)
    rid = dev.register(addr, ln, mode, readonly=True)
    werr = errno_of(dev.dma_write, rid, 0, ln, 3)
    serr = errno_of(dev.stream_start, rid, 0, ln)
    crc, nb = dev.dma_read(rid, 0, ln)
    dev.deregister(rid)
    libc.munmap(addr, ln)
    leak = outstanding() - base
    record(f"{mode}:readonly", werr == errno.EPERM and serr == errno.EPERM and nb == ln
           and leak == 0, write_errno=werr, stream_errno=serr, leak=leak)

    # stream then stop then deregister
    base = outstanding()
    addr = anon(npages)
    rid = dev.register(addr, ln, mode)
    dev.stream_start(rid, 0, ln, generation=1, chunk=4096, interval_us=100)
    chunks = dev.stream_stop(rid)
    dev.deregister(rid)
    libc.munmap(addr, ln)
    record(f"{mode}:stream", chunks >= 0 and outstanding() == base, chunks=chunks)

    # close with regions (one streaming)
    base = outstanding()
    d2 = PinlabDevice()
    addrs = [anon(16) for _ in range(3)]
    rids = [d2.register(a, 16 * PAGE, mode) for a in addrs]
    d2.dma_write(rids[0], 0, 16 * PAGE, 2)
    d2.stream_start(rids[1], 0, 16 * PAGE, generation=1, interval_us=50)
    d2.close()
    for a in addrs:
        libc.munmap(a, 16 * PAGE)
    leak = outstanding() - base
    record(f"{mode}:close-with-regions", leak == 0, leak=leak)

    # process exit while registered (and streaming)
    base = outstanding()
    # a child interpreter that imports the guest API the way this process did
    code = ("import os,mmap;"
            "from pinlab.guest.pinlab_ioctl import *;d=PinlabDevice();m=mmap.mmap(-1,1<<18);"
            f"r=d.register(buffer_address(m),1<<18,'{mode}');d.dma_write(r,0,1<<18,1);"
            "d.stream_start(r,0,1<<18,interval_us=100);os._exit(0)")
    home = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rc = subprocess.run([sys.executable, "-c", code],
                        env={**os.environ, "PYTHONPATH": home}).returncode
    leak = outstanding() - base
    record(f"{mode}:exit-registered", rc == 0 and leak == 0, rc=rc, leak=leak)


def check_bad(dev):
    addr = anon(4)
    cases = {
        "bad-mode": lambda: dev.register(addr, PAGE, 7),
        "unaligned": lambda: dev.register(addr + 1, PAGE, "pin"),
        "zero-len": lambda: dev.register(addr, 0, "pin"),
        "huge-len": lambda: dev.register(addr, 1 << 40, "pin"),
        "unmapped": lambda: dev.register(0x10000, PAGE, "pin"),
        "no-region": lambda: dev.dma_write(999, 0, PAGE, 1),
        "dereg-none": lambda: dev.deregister(12345),
        "query-none": lambda: dev.query(4242),
    }
    rid = dev.register(addr, 4 * PAGE, "pin")
    cases.update({
        "dma-oob": lambda: dev.dma_write(rid, 0, 8 * PAGE, 1),
        "dma-gen0": lambda: dev.dma_write(rid, 0, PAGE, 0),
        "dma-unaligned": lambda: dev.dma_write(rid, 3, 8, 1),
        "stream-stop-none": lambda: dev.stream_stop(rid),
    })
    errs = {k: errno_of(f) for k, f in cases.items()}
    dev.deregister(rid)
    libc.munmap(addr, 4 * PAGE)
    record("bad-input", all(v != 0 for v in errs.values()), errnos=errs)


def check_ext4(dev, expect_ok):
    os.makedirs("/mnt/e4", exist_ok=True)
    subprocess.run("modprobe loop 2>/dev/null; umount /mnt/e4 2>/dev/null; "
                   "truncate -s 64M /tmp/e4.img && mkfs.ext4 -q -F /tmp/e4.img && "
                   "mount -o loop /tmp/e4.img /mnt/e4",
                   shell=True, check=True)
    fd = os.open("/mnt/e4/f", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 16 * PAGE)
    m = mmap.mmap(fd, 16 * PAGE, mmap.MAP_SHARED, PROT_RW)
    m[:] = b"\0" * len(m)
    base = outstanding()
    res = {}
    for mode in ("longterm", "pin", "gup", "odp"):
        try:
            rid = dev.register(buffer_address(m), len(m), mode)
            dev.dma_write(rid, 0, len(m), 4)
            dev.deregister(rid)
            res[mode] = 0
        except OSError as e:
            res[mode] = e.errno
    m.flush()
    m.close()
    os.close(fd)
    subprocess.run("umount /mnt/e4", shell=True)
    lt_ok = (res["longterm"] == 0) if expect_ok else (res["longterm"] == errno.EFAULT)
    record("ext4-shared", lt_ok and res["pin"] == 0 and res["gup"] == 0 and res["odp"] == 0
           and outstanding() == base, errnos=res, expect_longterm_ok=expect_ok)


def check_odp(dev):
    npages = 32
    ln = npages * PAGE
    out = {}
    # munmap / DONTNEED / PAGEOUT on anon
    addr = anon(npages)
    rid = dev.register(addr, ln, "odp")
    dev.dma_write(rid, 0, ln, 1)
    libc.madvise(addr + 2 * PAGE, PAGE, MADV_DONTNEED)
    q = dev.query(rid)
    out["dontneed_pinned"] = q["pinned"]
    out["dontneed_inval"] = q["invalidations"]
    n = dev.dma_write(rid, 0, ln, 2)          # page 2 faults and is served
    out["refault_written"] = n
    out["refault_bad"] = len(check_pattern(view(addr, ln), rid, 2, max_mismatches=4))
    libc.madvise(addr + 4 * PAGE, 4 * PAGE, MADV_PAGEOUT)
    dev.dma_write(rid, 0, ln, 3)
    out["pageout_bad"] = len(check_pattern(view(addr, ln), rid, 3, max_mismatches=4))
    libc.munmap(addr + 8 * PAGE, PAGE)
    try:
        dev.dma_write(rid, 0, ln, 4)
        out["munmap_errno"] = 0
    except PinlabError as e:
        out["munmap_errno"] = e.errno
        out["munmap_status"] = e.status
    out["munmap_query"] = dev.query(rid)
    dev.deregister(rid)
    libc.munmap(addr, ln)
    # memfd ftruncate
    fd = os.memfd_create("odp")
    os.ftruncate(fd, ln)
    m = mmap.mmap(fd, ln, mmap.MAP_SHARED, PROT_RW)
    rid = dev.register(buffer_address(m), ln, "odp")
    dev.dma_write(rid, 0, ln, 1)
    os.ftruncate(fd, ln // 2)
    os.ftruncate(fd, ln)
    q = dev.query(rid)
    out["ftrunc_inval"] = q["invalidations"]
    n = dev.dma_write(rid, 0, ln, 2)
    out["ftrunc_written"] = n
    out["ftrunc_bad"] = len(check_pattern(m, rid, 2, max_mismatches=4))
    dev.stream_start(rid, 0, ln, generation=1, chunk=4096, interval_us=0)
    for _ in range(20):
        os.ftruncate(fd, ln // 2)
        os.ftruncate(fd, ln)
        m[0:8] = b"x" * 8
    out["stream_chunks"] = dev.stream_stop(rid)
    out["stream_query"] = dev.query(rid)
    dev.deregister(rid)
    m.close()
    os.close(fd)
    ok = (out["dontneed_inval"] >= 1 and out["dontneed_pinned"] == npages - 1
          and out["refault_written"] == ln and out["refault_bad"] == 0
          and out["pageout_bad"] == 0 and out["munmap_errno"] == errno.EFAULT
          and out["ftrunc_inval"] >= 1 and out["ftrunc_written"] == ln and out["ftrunc_bad"] == 0)
    record("odp-revoke", ok, **out)


def check_escalate(dev):
    """Device set to never ack INVALIDATE (set by the host): the fence times out."""
    ln = 16 * PAGE
    addr = anon(16)
    rid = dev.register(addr, ln, "odp")
    dev.dma_write(rid, 0, ln, 1)
    libc.madvise(addr, PAGE, MADV_DONTNEED)       # blocks until the fence times out
    q = dev.query(rid)
    e = errno_of(dev.dma_write, rid, 0, ln, 2)
    st = errno_of(dev.deregister, rid)
    libc.munmap(addr, ln)
    record("odp-escalate", q["state"] == 1 and e == errno.EIO, state=q["state"],
           last_status=q["last_status"], dma_errno=e, dereg_errno=st)


def check_after_reset(dev):
    base = outstanding()
    addr = anon(16)
    rid = dev.register(addr, 16 * PAGE, "pin")
    n = dev.dma_write(rid, 0, 16 * PAGE, 1)
    dev.deregister(rid)
    libc.munmap(addr, 16 * PAGE)
    record("after-reset", n == 16 * PAGE and outstanding() == base)


def check_stream_hold(dev, mode):
    """Register and stream, then sleep: the host removes the device under us."""
    import time
    addr = anon(16)
    rid = dev.register(addr, 16 * PAGE, mode)
    dev.stream_start(rid, 0, 16 * PAGE, interval_us=200)
    print("READY", flush=True)
    while not os.path.exists("/tmp/go"):
        time.sleep(0.2)
    t0 = time.monotonic()
    e = errno_of(dev.dma_write, rid, 0, PAGE, 1)
    q = None
    try:
        q = dev.query(rid)
    except OSError as ex:
        q = {"errno": ex.errno}
    dev.close()
    record("removed", e in (errno.ENODEV, errno.EIO), dma_errno=e, query=q,
           secs=time.monotonic() - t0)


DEBUGFS = "/sys/kernel/debug/pinlab/pinlab0"
MARK_RETURNED = 0x5A5A0001     # SCRATCH marker: the invalidation has returned
NSLOTS = 255                   # kmod/pinlab.h PINLAB_NSLOTS


def driver_stats():
    with open(f"{DEBUGFS}/stats") as f:
        return {k: int(v) for k, v in (ln.split() for ln in f if len(ln.split()) == 2)}


def device_mark(value):
    """Place a marker in the device's audit log (SCRATCH write through debugfs)."""
    with open(f"{DEBUGFS}/mark", "w") as f:
        f.write(str(value))


def check_full_queue(dev):
    """An invalidation while every command slot is taken: the notifier must not return
    before the device stopped. The host has made the device drop its interrupts (after
    READY), so no command ever completes from the driver's view: NSLOTS FENCE commands
    fill every slot, then MADV_DONTNEED of a streaming odp region runs the notifier, whose
    INVALIDATE finds no slot. After madvise returns, a SCRATCH marker goes into the
    device's audit log; the host checks that no access to the region follows it."""
    import threading
    import time
    ln = 16 * PAGE
    addr = anon(16)
    rid = dev.register(addr, ln, "odp")
    dev.dma_write(rid, 0, ln, 1)
    dev.stream_start(rid, 0, ln, 1, PAGE, 200)
    print(json.dumps({"ready": True, "region": rid}), flush=True)
    while not os.path.exists("/tmp/go-full"):
        time.sleep(0.05)
    base = driver_stats()["cmds"]
    errs = []

    def fence():
        errs.append(errno_of(dev.fence))
    threads = [threading.Thread(target=fence, daemon=True) for _ in range(NSLOTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while driver_stats()["cmds"] - base < NSLOTS and time.monotonic() < deadline:
        time.sleep(0.05)
    filled = driver_stats()["cmds"] - base
    t0 = time.monotonic()
    libc.madvise(addr, ln, MADV_DONTNEED)      # the notifier: INVALIDATE finds no slot
    madvise_s = time.monotonic() - t0
    device_mark(MARK_RETURNED)
    time.sleep(1.0)                            # a device still streaming would write now
    for t in threads:
        t.join(120)
    q = None
    try:
        q = dev.query(rid)
    except OSError as e:
        q = {"errno": e.errno}
    errno_of(dev.deregister, rid)
    libc.munmap(addr, ln)
    st = driver_stats()
    record("full-queue", filled >= NSLOTS, region=rid, filled=filled,
           madvise_s=round(madvise_s, 3), fence_errnos=sorted(set(errs)),
           fences_done=len(errs), query=q, resets=st["resets"], timeouts=st["timeouts"])


def main():
    what = sys.argv[1]
    dev = PinlabDevice()
    try:
        if what == "modes":
            for mode in sys.argv[2:] or ["gup", "pin", "longterm", "odp"]:
                try:
                    check_mode(dev, mode)
                except OSError as e:
                    record(f"{mode}:exception", False, error=str(e))
            check_bad(dev)
        elif what == "ext4":
            check_ext4(dev, sys.argv[2] == "ok")
        elif what == "odp":
            check_odp(dev)
        elif what == "escalate":
            check_escalate(dev)
        elif what == "after-reset":
            check_after_reset(dev)
        elif what == "full-queue":
            check_full_queue(dev)
        elif what == "hold":
            check_stream_hold(dev, sys.argv[2])
    except OSError as e:
        record(f"{what}:exception", False, error=str(e))
    finally:
        dev.close()
    print(json.dumps({"summary": True, "ok": all(r["ok"] for r in RESULTS),
                      "results": RESULTS}), flush=True)


if __name__ == "__main__":
    main()
