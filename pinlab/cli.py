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
    from pinlab.orchestrator.matrix import run_matrix

    return run_matrix(kernels=args.kernel, tags=args.tags, json_out=args.json,
                      html_dir=args.html, concurrent=not args.serial)


def _fuzz(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.artifacts import run_dir
    from pinlab.orchestrator.fuzz import run_fuzz

    out = Path(args.artifacts) if args.artifacts else run_dir("fuzz")
    return run_fuzz(args.kernel, args.iterations, out, threads=args.threads, seed=args.seed)


def _kernel(args: argparse.Namespace) -> int:
    from pinlab.images.cache import Cache
    from pinlab.images.kbuild import BuildSpec, ConfigSpec, build_kernel, register_prebuilt
    from pinlab.images.kerrors import KernelBuildError
    from pinlab.images.ksource import parse_source

    cache = Cache.default()
    if args.kernel_cmd == "list":
        for name, e in sorted(cache._load().items()):
            if name.startswith("kbuild-") and not name.startswith(("kbuild-steps-",
                                                                   "kbuild-image-")):
                print(f"build:{e['key']}  {e.get('release')}  {e.get('source')}  {e['built']}")
        return 0
    try:
        if args.image:
            if not (args.modules and args.build_dir):
                print("pinlab: --image needs --modules and --build-dir", file=sys.stderr)
                return 2
            kid = register_prebuilt(cache, Path(args.image), Path(args.modules),
                                    Path(args.build_dir))
        else:
            if not args.base:
                print("pinlab: kernel build needs --base (debian:6.12 or a revision with "
                      "--tree) or --image", file=sys.stderr)
                return 2
            patches = [Path(p) for p in (args.patch or [])]
            if args.series:
                patches.append(Path(args.series))
            base = args.config or "small"
            spec = BuildSpec(parse_source(args.base, args.tree), patches,
                             ConfigSpec(base, tuple(Path(f) for f in args.fragment or []),
                                        args.debug_info))
            kid = build_kernel(cache, spec, jobs=args.jobs)
    except KernelBuildError as exc:
        print(f"pinlab: {exc}", file=sys.stderr)
        return 2
    print(kid)
    return 0


def _bisect(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.bisect import bisect, parse_cell

    try:
        cell = parse_cell(args.cell)
    except ValueError as exc:
        print(f"pinlab: {exc}", file=sys.stderr)
        return 2
    return bisect(Path(args.tree), args.good, args.bad, cell, config=args.config,
                  jobs=args.jobs, artifacts=Path(args.artifacts) if args.artifacts else None)


def _bench(what: str, rest: list[str]) -> int:
    if what == "cells":
        from pinlab.bench.cells import main as cells_main

        return cells_main(rest)
    if what == "kbuild":
        from pinlab.bench.kbuild import main as kbuild_main

        return kbuild_main(rest)
    from pinlab.bench.device import main as device_main

    return device_main(rest)


def main(argv: list[str] | None = None) -> int:
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
                   help="run the kernels one after another (default: at the same time)")

    fz = sub.add_parser("fuzz", help="fuzz pinlab.ko's ioctls in a guest")
    fzs = fz.add_subparsers(dest="fuzz_cmd", required=True)
    fi = fzs.add_parser("ioctl", help="random ioctls from several threads; fails on any "
                        "pinlab WARN/BUG/Oops or pin-counter leak")
    fi.add_argument("--kernel", default="6.12")
    fi.add_argument("--iterations", type=int, default=2000)
    fi.add_argument("--threads", type=int, default=4)
    fi.add_argument("--seed", type=int, default=1)
    fi.add_argument("--artifacts", help="directory for console log and other artifacts")

    kp = sub.add_parser("kernel", help="build test kernels (and pinlab.ko) to run cells on")
    kps = kp.add_subparsers(dest="kernel_cmd", required=True)
    kb = kps.add_parser("build", help="build a kernel from Debian's or a git tree's source "
                        "with patches, or register a prebuilt one; prints its id build:<key>")
    kb.add_argument("--base", help="debian:6.1|6.12|7, or a revision of --tree")
    kb.add_argument("--tree", help="a git checkout of Linux (cloned, never modified)")
    kb.add_argument("--patch", action="append", help="a patch to apply (repeatable, in order)")
    kb.add_argument("--series", help="an mbox of patches (git am)")
    kb.add_argument("--config", help="small (defconfig + kvm_guest.config minus display, "
                    "sound, USB, wireless...; the default), defconfig (+ kvm_guest.config), "
                    "cloud (Debian's cloud-amd64 config; Debian sources) or a config file")
    kb.add_argument("--fragment", action="append", help="another config fragment (checked "
                    "like pinlab's own)")
    kb.add_argument("--debug-info", action="store_true", help="build with DWARF debug info")
    kb.add_argument("--jobs", type=int, help="make -j (default: all cores)")
    kb.add_argument("--image", help="prebuilt: a bzImage")
    kb.add_argument("--modules", help="prebuilt: lib/modules/<release> dir or a tarball")
    kb.add_argument("--build-dir", help="prebuilt: its build tree (to compile pinlab.ko)")
    kps.add_parser("list", help="the built kernels in the cache")

    bs = sub.add_parser("bisect", help="git bisect a change of one cell's outcome")
    bs.add_argument("--good", required=True, help="a revision where the cell shows the old "
                    "outcome")
    bs.add_argument("--bad", required=True, help="a revision where it shows the new one")
    bs.add_argument("--cell", required=True, help="MODE/BACKING/EVENT, e.g. "
                    "longterm/ext4/truncate")
    bs.add_argument("--tree", default=".", help="the git tree (default: .)")
    bs.add_argument("--config", default="small", help="small, defconfig or a config file")
    bs.add_argument("--jobs", type=int)
    bs.add_argument("--artifacts", help="where each step's cell artifacts go")

    sub.add_parser("bench", help="benchmarks: pinlab bench device|cells|kbuild [--json]",
                   add_help=False)

    if argv[:1] == ["bench"]:
        if argv[1:2] not in (["device"], ["cells"], ["kbuild"]):
            p.error("usage: pinlab bench device|cells|kbuild [--json]")
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
    if args.cmd == "fuzz":
        return _fuzz(args)
    if args.cmd == "kernel":
        return _kernel(args)
    if args.cmd == "bisect":
        return _bisect(args)
    p.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
