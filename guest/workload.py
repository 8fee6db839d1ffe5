#!/usr/bin/env python3
"""pinlab guest workload: runs one experiment step by step, prints one JSON report.

Standard library only (it runs inside the guest). Usage:

    python3 -m pinlab.guest.workload info
    python3 -m pinlab.guest.workload dma-write --mode longterm --backing anon --pages 64
    python3 -m pinlab.guest.workload cell --mode pin --backing ext4 --event truncate
        (pinlab_cell.py and guest/events/)

The last line of stdout is the JSON report; errors are reported in it, not raised.
"""
import argparse
import contextlib
import errno
import json
import mmap
import os
import sys

from pinlab.common.vocab import BACKINGS, MODES, split_options
from pinlab.guest import events, pinlab_cell, pinlab_ioctl, pinlab_mm

PAGE = pinlab_mm.PAGE


def vmstat():
    return pinlab_mm.vmstat(pinlab_mm.PIN_KEYS)


def pfns(addr, npages):
    """PFN of each page (None when not present, "swap" when swapped out)."""
    return pinlab_mm.pagemap(addr, npages)


def anon_buffer(npages):
    mm = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with contextlib.suppress(AttributeError, OSError):
        mm.madvise(pinlab_mm.MADV_NOHUGEPAGE)
    for off in range(0, npages * PAGE, PAGE):  # fault every page in
        mm[off:off + 1] = b"\0"
    return mm


def cmd_info(args):
    return {"vmstat": vmstat(), "device": os.path.exists(args.device),
            "kernel": os.uname().release}


def cmd_dma_write(args):
    report = {"mode": args.mode, "backing": args.backing, "pages": args.pages,
              "generation": args.generation, "errno": 0}
    if args.backing != "anon":
        raise SystemExit(f"backing {args.backing} not supported yet")
    mm = anon_buffer(args.pages)
    addr = pinlab_ioctl.buffer_address(mm)
    length = args.pages * PAGE
    report["addr"] = addr
    report["pfns"] = pfns(addr, args.pages)
    report["vmstat_before"] = vmstat()
    dev = pinlab_ioctl.PinlabDevice(args.device)
    try:
        try:
            region = dev.register(addr, length, args.mode)
        except OSError as exc:
            report["errno"] = exc.errno
            report["errno_name"] = errno.errorcode.get(exc.errno, str(exc.errno))
            report["step"] = "register"
            return report
        report["region"] = region
        report["vmstat_pinned"] = vmstat()
        try:
            report["bytes_written"] = dev.dma_write(region, 0, length, args.generation)
        except OSError as exc:
            report["errno"] = exc.errno
            report["step"] = "dma_write"
        bad = pinlab_ioctl.check_pattern(mm, region, args.generation, 0, length,
                                         max_mismatches=1000)
        report["mismatches"] = len(bad)
        report["first_mismatches"] = bad[:8]
        report["pfns_after"] = pfns(addr, args.pages)
        report["query"] = dev.query(region)
        dev.deregister(region)
    finally:
        dev.close()
    report["vmstat_after"] = vmstat()
    return report


def parser():
    p = argparse.ArgumentParser(prog="workload.py")
    p.add_argument("--device", default="/dev/pinlab0")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info")
    w = sub.add_parser("dma-write")
    w.add_argument("--mode", default="longterm", choices=MODES)
    w.add_argument("--backing", default="anon")
    w.add_argument("--pages", type=int, default=16)
    w.add_argument("--generation", type=int, default=1)
    c = sub.add_parser("cell", help="one matrix cell, step by step (pinlab_cell.py)")
    c.add_argument("--mode", required=True, choices=MODES)
    c.add_argument("--backing", required=True, choices=BACKINGS)
    c.add_argument("--event", required=True, choices=events.names())
    c.add_argument("--options", default="", type=_options,
                   help="the cell's options, e.g. readonly+fast (common/vocab.py OPTIONS)")
    return p


def _options(text):
    """argparse type of --options: a canonical options string (vocab.split_options)."""
    try:
        split_options(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def run(args):
    """The report of one command (errors are reported in it, not raised)."""
    try:
        return {"info": cmd_info, "dma-write": cmd_dma_write,
                "cell": pinlab_cell.cmd_cell}[args.cmd](args)
    except Exception as exc:  # report, don't crash: the host reads the JSON
        return {"error": f"{type(exc).__name__}: {exc}"}


def main():
    report = run(parser().parse_args())
    print(json.dumps(report, default=str))
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
