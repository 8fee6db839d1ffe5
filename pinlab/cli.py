"""The ``pinlab`` command line."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path


def _images(args: argparse.Namespace) -> int:
    from pinlab.images.build import ensure_images, resolve_kernels

    extra = [p for p in (args.extra_packages or "").split(",") if p] or None
    for k in resolve_kernels(args.kernel):
        im = ensure_images(k, extra_packages=extra)
        print(f"kernel {k}: {im.kernel.release}\n  vmlinuz  {im.kernel.vmlinuz}\n"
              f"  initrd   {im.kernel.initramfs}\n  modules  {im.kernel.modules_img}\n"
              f"  pinlab.ko {im.kmod}")
        extra = None
    print(f"rootfs   {im.rootfs.image}\nqemu     {im.qemu.version} ({im.qemu.origin})")
    return 0


def _up(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.artifacts import run_dir
    from pinlab.orchestrator.session import GuestSession

    out = Path(args.artifacts) if args.artifacts else run_dir("up")
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    with GuestSession.boot(args.kernel, out, device=not args.no_device,
                           module=not args.no_module and not args.no_device) as s:
        g = s.guest
        print(f"""
pinlab guest is up ({g.images.kernel.release}, {g.cfg.accel}, booted in {g.boot_seconds:.1f}s)
  ssh:            {g.ssh_command()}
  QMP (humans):   qmp-shell {g.human_qmp_sock}
  device socket:  {g.device_sock if g.cfg.device else '-'}
  device control: {'qmp-shell ' + str(g.control_sock) if g.cfg.device else '-'}
  console log:    {g.console.path}
  artifacts:      {out}
Ctrl-C tears everything down.""", flush=True)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not stop["now"]:
            dead = g.dead()
            if dead:
                print(f"pinlab: guest ended: {dead}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    print("pinlab: torn down", file=sys.stderr)
    return 0


def _device(args: argparse.Namespace, rest: list[str]) -> int:
    from pinlab.device.serve import main as serve_main

    return serve_main(rest)


def _matrix(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.matrix import resolve_shard, run_matrix

    return run_matrix(kernels=args.kernel, tags=args.tags, json_out=args.json,
                      html_dir=args.html, concurrent=not args.serial,
                      shard=resolve_shard(args.shard), jobs=args.jobs,
                      out=Path(args.out) if args.out else None)


def _merge(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.merge import main as merge_main

    return merge_main(args.dirs, args.out)


def _fuzz(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.artifacts import run_dir
    from pinlab.orchestrator.fuzz import run_fuzz

    out = Path(args.artifacts) if args.artifacts else run_dir("fuzz")
    return run_fuzz(args.kernel, args.iterations, out, threads=args.threads, seed=args.seed)


def _bench(what: str, rest: list[str]) -> int:
    if what == "cells":
        from pinlab.bench.cells import main as cells_main

        return cells_main(rest)
    if what == "shards":
        from pinlab.bench.shards import main as shards_main

        return shards_main(rest)
    from pinlab.bench.device import main as device_main

    return device_main(rest)


def main(argv: list[str] | None = None) -> int:
    from pinlab.orchestrator.shard import add_shard_argument

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="pinlab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    im = sub.add_parser("images", help="build or reuse guest images")
    ims = im.add_subparsers(dest="images_cmd", required=True)
    b = ims.add_parser("build", help="build QEMU runtime, rootfs, kernels and pinlab.ko")
    b.add_argument("--kernel", action="append", help="6.1, 6.12, 7 or all (repeatable)")
    b.add_argument("--extra-packages", help="comma-separated Debian packages for the rootfs")

    up = sub.add_parser("up", help="boot a guest for manual debugging")
    up.add_argument("--kernel", default=None)
    up.add_argument("--no-device", action="store_true", help="boot without the DMA device")
    up.add_argument("--no-module", action="store_true", help="do not load pinlab.ko")
    up.add_argument("--artifacts", help="directory for console log and other artifacts")

    sub.add_parser("device", help="run the DMA device server: pinlab device serve --help",
                   add_help=False)

    m = sub.add_parser("matrix", help="run the scenario matrix and write verdicts")
    m.add_argument("--kernel", action="append", help="kernel(s); default: all defaults")
    m.add_argument("--tags", action="append",
                   help="avocado tag filter, e.g. mode:odp,backing:ext4 (repeatable: ORed)")
    m.add_argument("--json", help="verdict JSON file")
    m.add_argument("--html", help="directory for the HTML report")
    m.add_argument("--serial", action="store_true",
                   help="run one warm guest at a time (default: as many as --jobs)")
    add_shard_argument(m)
    m.add_argument("--jobs", type=int, metavar="N",
                   help="warm guests in total (default: from cores and memory, at least one "
                   "per kernel)")
    m.add_argument("--out", metavar="DIR",
                   help="output directory (default: a new $PINLAB_RESULTS/matrix-*)")

    mg = sub.add_parser("merge", help="merge the output directories of matrix shards")
    mg.add_argument("dirs", nargs="+", metavar="DIR", help="one output directory per shard")
    mg.add_argument("--out", required=True, metavar="DIR", help="where the merged files go")

    fz = sub.add_parser("fuzz", help="fuzz pinlab.ko's ioctls in a guest")
    fzs = fz.add_subparsers(dest="fuzz_cmd", required=True)
    fi = fzs.add_parser("ioctl", help="random ioctls from several threads; fails on any "
                        "pinlab WARN/BUG/Oops or pin-counter leak")
    fi.add_argument("--kernel", default="6.12")
    fi.add_argument("--iterations", type=int, default=2000)
    fi.add_argument("--threads", type=int, default=4)
    fi.add_argument("--seed", type=int, default=1)
    fi.add_argument("--artifacts", help="directory for console log and other artifacts")

    sub.add_parser("bench", help="benchmarks: pinlab bench device|cells|shards [--json]",
                   add_help=False)

    if argv[:1] == ["bench"]:
        if argv[1:2] not in (["device"], ["cells"], ["shards"]):
            p.error("usage: pinlab bench device|cells|shards [--json]")
        return _bench(argv[1], argv[2:])
    if argv[:1] == ["device"]:
        if argv[1:2] != ["serve"]:
            p.error("usage: pinlab device serve --socket PATH --control PATH [--audit FILE]")
        return _device(argparse.Namespace(), argv[2:])
    args = p.parse_args(argv)
    if args.cmd == "images":
        return _images(args)
    if args.cmd == "up":
        return _up(args)
    if args.cmd == "matrix":
        return _matrix(args)
    if args.cmd == "merge":
        return _merge(args)
    if args.cmd == "fuzz":
        return _fuzz(args)
    p.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
