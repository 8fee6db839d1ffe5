#!/usr/bin/env python3
"""Experiment: the device is unplugged and plugged back in while it streams into a
pinned region, round after round.

Run in an up guest (MSI, the default), with the host replugging in step:

    pinlab run lab examples/stream_across_replug.py --rounds 10 &
    pinlab replug lab --rounds 10 --ready-file /tmp/pinlab-stream.ready

Each round: wait for /dev/pinlab0, register 16 anonymous pages, start a stream (the device
writes chunk after chunk, generation after generation), wait until the stream has written,
create the ready file (the host's replug waits for it, removes it, then device_del), then
watch the region until the driver reports the device gone (QUERY state FAILED, or an errno
such as ENODEV), and close the file. The report per round: how the loss was seen and
after how long, what the pages held, and the FOLL_PIN balance after close (pins the
removal left behind). The last line of output is the JSON report.
"""
import argparse
import errno
import glob
import json
import mmap
import os
import time

from pinlab.guest import pinlab_ioctl, pinlab_kmsg, pinlab_mm

PAGE = pinlab_mm.PAGE


def open_device(path, timeout):
    """A PinlabDevice of the (re-plugged) device: ``path``, or with "auto" the first
    /dev/pinlabN (the driver names a new device pinlab1 while a file of the removed
    pinlab0 is still open)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(glob.glob("/dev/pinlab[0-9]*")) if path == "auto" else [path]
        for node in nodes:
            try:
                return pinlab_ioctl.PinlabDevice(node)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                    raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"no pinlab device within {timeout} s")
        time.sleep(0.05)


def streamed(buf, rid):
    """Pages holding some generation of this region's pattern."""
    return sum(not pinlab_ioctl.check_pattern(buf, rid, None, i * PAGE, 8)
               for i in range(len(buf) // PAGE))


def one_round(a, n):
    rec = {"round": n}
    size = a.pages * PAGE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mm.madvise(pinlab_mm.MADV_NOHUGEPAGE)
    mm[:] = bytes(size)
    addr = pinlab_mm.address(mm)
    pins0 = pinlab_mm.pins()
    deadline = time.monotonic() + a.timeout
    while True:                       # the node may be the old one for a moment
        dev = open_device(a.device, a.timeout)
        try:
            rid = dev.register(addr, size, a.mode)
            break
        except OSError as exc:
            dev.close()
            if exc.errno not in (errno.ENODEV, errno.EIO) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    rec["device"] = dev.path
    rec["pins_taken"] = pinlab_mm.pins() - pins0
    dev.stream_start(rid, 0, size, 1, PAGE, a.interval_us)
    t0 = time.monotonic()
    while streamed(mm, rid) < a.pages and time.monotonic() - t0 < a.timeout:
        time.sleep(0.01)
    rec["streaming_pages"] = streamed(mm, rid)
    with open(a.ready_file, "w") as f:
        f.write(str(os.getpid()))
    t0 = time.monotonic()
    gone = None
    while gone is None and time.monotonic() - t0 < a.timeout:
        try:
            q = dev.query(rid)
            if q["state"] != pinlab_ioctl.STATE_ACTIVE:
                gone = {"how": "state", "state": q["state"],
                        "last_status": pinlab_ioctl.STATUS_NAMES.get(q["last_status"])}
        except OSError as exc:
            gone = {"how": "errno", "errno": errno.errorcode.get(exc.errno, exc.errno)}
        time.sleep(0.02)
    rec["gone"] = gone
    rec["gone_after_s"] = round(time.monotonic() - t0, 2)
    snap = bytes(mm)
    time.sleep(0.2)                   # does anything still write into the pages?
    rec["written_after_gone"] = bytes(mm) != snap
    try:
        dev.deregister(rid)
        rec["deregister"] = "ok"
    except OSError as exc:
        rec["deregister"] = errno.errorcode.get(exc.errno, exc.errno)
    dev.close()
    mm.close()
    rec["pins_left"] = pinlab_mm.pins() - pins0
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--pages", type=int, default=16)
    p.add_argument("--mode", default="longterm", choices=sorted(pinlab_ioctl.MODES))
    p.add_argument("--interval-us", type=int, default=1000)
    p.add_argument("--ready-file", default="/tmp/pinlab-stream.ready")
    p.add_argument("--timeout", type=float, default=120, help="seconds per wait")
    p.add_argument("--device", default="auto", help="a /dev/pinlabN, or auto")
    a = p.parse_args()
    mark = pinlab_kmsg.mark()
    rounds = []
    for n in range(1, a.rounds + 1):
        r = one_round(a, n)
        rounds.append(r)
        print(f"round {n}: {r['device']} streaming into {r['streaming_pages']}/{a.pages} "
              f"pages, device "
              f"gone after {r['gone_after_s']}s ({r['gone']}), written after gone: "
              f"{r['written_after_gone']}, pins left: {r['pins_left']}", flush=True)
    lines = pinlab_kmsg.since(mark)
    out = {"kernel": os.uname().release, "mode": a.mode, "rounds": rounds,
           "removed_lines": sum("removed" in ln for ln in lines),
           "probe_lines": sum("MSI vectors" in ln for ln in lines),
           "severe": [ln for ln in lines if any(k in ln for k in ("WARNING", "BUG", "Oops"))]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
