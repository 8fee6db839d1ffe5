"""The ``pinlab`` command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
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


def kernel_help() -> str:
    """The --kernel choices with what each is and, once built, its release."""
    from pinlab.images.cache import Cache
    from pinlab.images.kernel import DEFAULT_KERNEL, KERNELS

    cache = Cache.default()
    out = []
    for k, spec in KERNELS.items():
        entry = cache.entry(f"kernel-{k}") or {}
        rel = entry.get("release")
        out.append(f"{k} ({spec.description}; " + (f"built: {rel}" if rel else "not built yet")
                   + (", default" if k == DEFAULT_KERNEL else "") + ")")
    return "; ".join(out)


def _check_kernel(p: argparse.ArgumentParser, kernel: str | None) -> None:
    from pinlab.images.kernel import KERNELS

    if kernel is not None and kernel not in KERNELS:
        p.error(f"unknown kernel {kernel!r}; choose one of: {kernel_help()}")


def _faults(p: argparse.ArgumentParser, items: list[str] | None) -> dict[str, object]:
    from pinlab.device.faults import Faults

    out: dict[str, object] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if name not in Faults.names() or name == "die":
            p.error(f"unknown fault {name!r}; choose from "
                    f"{', '.join(n for n in Faults.names() if n != 'die')}")
        if not eq:
            out[name] = True
        elif value.isdigit():
            out[name] = int(value)
        elif value in ("true", "false"):
            out[name] = value == "true"
        else:
            p.error(f"--fault {item}: the value is an integer (ms) or true/false")
    return out


def _up(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pinlab.orchestrator.artifacts import run_dir
    from pinlab.orchestrator.cells import parse_cell
    from pinlab.orchestrator.registry import RegistryError
    from pinlab.orchestrator.ssh import SSHError
    from pinlab.orchestrator.vm import GuestError
    from pinlab.orchestrator.workbench import UpOptions, Workbench, WorkbenchError

    _check_kernel(p, args.kernel)
    try:
        cell = parse_cell(args.cell) if args.cell else None
    except ValueError as exc:
        p.error(f"--cell: {exc}")
    if args.gdb is not None and not 1 <= args.gdb <= 65535:
        p.error("--gdb PORT: a TCP port 1..65535")
    irq = args.irq
    if irq is None:   # the cell's own interrupts (an MSI-X event's guest), else MSI
        from pinlab.orchestrator import events
        ev = events.event(cell.event) if cell else None
        irq = ev.irq if ev else "msi"
    opts = UpOptions(kernel=args.kernel, name=args.name, device=not args.no_device,
                     module=not args.no_module, irq=irq,
                     faults=_faults(p, args.fault), append=" ".join(args.append or []),
                     gdb_port=args.gdb or 0, cell=cell, swap=args.swap,
                     hugepages=args.hugepages, memory_mb=args.memory or 0,
                     extra_packages=[x for x in (args.extra_packages or "").split(",") if x]
                     or None)
    try:
        wb = Workbench(opts, Path(args.artifacts) if args.artifacts else Path("."))
        if not args.artifacts:
            wb.artifacts = run_dir(f"up-{wb.name}")
        rc = wb.run()
    except (WorkbenchError, RegistryError) as exc:
        print(f"pinlab: {exc}", file=sys.stderr)
        return 2
    except (SSHError, GuestError) as exc:
        print(f"pinlab: the guest failed: {exc}", file=sys.stderr)
        return 1
    print("pinlab: torn down", file=sys.stderr)
    return rc


def _shift_name(args: argparse.Namespace) -> None:
    """The guest name is optional before a script or command: ``pinlab run x.py 3`` and
    ``pinlab ssh uname -r`` mean the only guest up when no guest is called x.py/uname."""
    from pinlab.orchestrator import registry

    if args.cmd not in ("ssh", "run") or args.name is None:
        return
    if registry.NAME.match(args.name) and registry.path_of(args.name).exists():
        return
    if args.cmd == "run" and args.script is not None and Path(args.name).is_file():
        args.args = [args.script, *args.args]
        args.script = args.name
    elif args.cmd == "ssh":
        args.command = [args.name, *args.command]
    else:
        return
    args.name = None


def _guest(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pinlab.orchestrator import registry

    return registry.resolve(args.name)


def _ssh(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.guestrun import exec_ssh

    exec_ssh(_guest(args), list(args.command))
    return 0   # not reached


def _run(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.guestrun import run_script

    return run_script(_guest(args), Path(args.script), list(args.args))


def _replug(args: argparse.Namespace) -> int:
    import json

    from pinlab.orchestrator.workbench import request

    e = _guest(args)
    resp = request(e, {"op": "replug", "rounds": args.rounds, "ready_file": args.ready_file,
                       "ready_timeout": args.ready_timeout, "force": args.force})
    if args.json:
        print(json.dumps(resp, indent=2))
    if "error" in resp:
        msg = str(resp["error"])
        if resp.get("dead"):     # QEMU's exit status and the last line it logged
            dead = str(resp["dead"]).splitlines()
            msg = (msg.split(": QEMU exited")[0] + f"\npinlab: the guest is gone: "
                   f"{dead[0].split(':')[0]}: {dead[-1].strip()}")
        print(f"pinlab: replug of {e.name}: {msg}", file=sys.stderr)
        return 1
    if not args.json:
        for r in resp["rounds"]:
            print(f"round {r['round']}: device_del {r['unplug_s']}s, device_add "
                  f"{r['plug_s']}s, {r['node']}; the guest logged:")
            for line in r["dmesg"]:
                print(f"  {line}")
    return 0


def _qmp(args: argparse.Namespace) -> int:
    e = _guest(args)
    argv = [sys.executable, "-m", "qemu.qmp.qmp_shell", *(["-p"] if args.pretty else []),
            e.device_control if args.device else e.qmp_human]
    if args.device and not e.device_control:
        raise SystemExit(f"pinlab: guest {e.name} has no device")
    os.execv(argv[0], argv)
    return 0   # not reached


def _down(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.workbench import down

    e = _guest(args)
    down(e)
    print(f"pinlab: {e.name} is down")
    return 0


def _ps(args: argparse.Namespace) -> int:
    import json
    import time as _time

    from pinlab.orchestrator import registry

    rows = registry.entries()
    if args.json:
        print(json.dumps([{**e.__dict__, "alive": alive} for e, alive in rows], indent=2))
    else:
        print(f"{'NAME':<14} {'KERNEL':<6} {'PID':>7} {'SSH':>6} {'IRQ':<5} {'GDB':<16} "
              f"{'UP':>6}  CELL / STATE")
        for e, alive in rows:
            age = f"{(_time.time() - e.started) / 60:.0f}m"
            state = e.cell or "-"
            if not alive:
                state = f"stale (pid {e.pid} gone): removed"
            print(f"{e.name:<14} {e.kernel:<6} {e.pid:>7} {e.ssh_port:>6} {e.irq or '-':<5} "
                  f"{e.gdb or '-':<16} {age:>6}  {state}")
    registry.prune()
    return 0


def _device(args: argparse.Namespace, rest: list[str]) -> int:
    from pinlab.device.serve import main as serve_main

    return serve_main(rest)


def _matrix(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.matrix import resolve_shard, run_matrix

    return run_matrix(kernels=args.kernel, tags=args.tags, json_out=args.json,
                      html_dir=args.html, concurrent=not args.serial,
                      shard=resolve_shard(args.shard), jobs=args.jobs,
                      out=Path(args.out) if args.out else None, full=args.full)


def _merge(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.merge import main as merge_main

    return merge_main(args.dirs, args.out)


def _validate(args: argparse.Namespace) -> int:
    from pinlab.orchestrator.validate import run_validate

    return run_validate(args)


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
    if what == "shards":
        from pinlab.bench.shards import main as shards_main

        return shards_main(rest)
    if what == "kbuild":
        from pinlab.bench.kbuild import main as kbuild_main

        return kbuild_main(rest)
    if what == "validate":
        from pinlab.bench.validate import main as validate_main

        return validate_main(rest)
    from pinlab.bench.device import main as device_main

    return device_main(rest)


def terminate_on_sigterm() -> None:
    """Make SIGTERM end the process as Ctrl-C does: ``SystemExit(143)`` is raised in the
    main thread, so ``finally`` blocks and context managers run (``pinlab matrix`` stops
    its Avocado jobs, a booting guest is shut down) instead of the interpreter dying with
    child processes left behind. A command that needs its own handler installs it later."""
    def on_term(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # once: the clean-up runs unhurried
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def main(argv: list[str] | None = None) -> int:
    from pinlab.orchestrator.shard import add_shard_argument

    terminate_on_sigterm()

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="pinlab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    im = sub.add_parser("images", help="build or reuse guest images")
    ims = im.add_subparsers(dest="images_cmd", required=True)
    b = ims.add_parser("build", help="build QEMU runtime, rootfs, kernels and pinlab.ko")
    b.add_argument("--kernel", action="append", help="6.1, 6.12, 7 or all (repeatable)")
    b.add_argument("--extra-packages", help="comma-separated Debian packages for the rootfs")

    up = sub.add_parser("up", help="boot a guest for debugging by hand, set up like a "
                        "matrix guest")
    up.add_argument("--kernel", default=None, metavar="K", help=kernel_help())
    up.add_argument("--name", help="the guest's name for ssh/run/replug/qmp/down "
                    "(default lab-KERNEL, lab-KERNEL-2, ...)")
    up.add_argument("--cell", metavar="KERNEL/MODE/BACKING/EVENT",
                    help="boot as that matrix cell's guest did, its environment set up "
                    "(also accepts the cell's Avocado test id)")
    up.add_argument("--no-device", action="store_true", help="boot without the DMA device "
                    "(pinlab.ko is still copied to /tmp/pinlab.ko)")
    up.add_argument("--no-module", action="store_true", help="do not load pinlab.ko")
    up.add_argument("--irq", choices=["msi", "msix"], default=None,
                    help="the device's interrupts (default: the --cell event's, as in the "
                    "matrix, else msi; device_del of an MSI-X device aborts QEMU 11.1)")
    up.add_argument("--fault", action="append", metavar="NAME[=VALUE]",
                    help="device fault set at start (repeatable): never-ack-revoke, "
                    "delay-revoke-ms=MS, write-after-revoke, drop-irq, delay-irq-ms=MS")
    up.add_argument("--append", action="append", metavar="ARGS",
                    help="extra kernel command-line arguments (repeatable)")
    up.add_argument("--swap", action="store_true", help="swap on the 128 MiB pinlab-swap disk")
    up.add_argument("--hugepages", type=int, default=0, metavar="N",
                    help="raise vm.nr_hugepages by N (2 MiB pages)")
    up.add_argument("--memory", type=int, metavar="MIB", help="guest RAM (default 1024)")
    up.add_argument("--gdb", type=int, metavar="PORT",
                    help="QEMU's gdbstub on 127.0.0.1:PORT (the kernel boots nokaslr)")
    up.add_argument("--extra-packages", metavar="P1,P2",
                    help="Debian packages for the rootfs (rebuilds the cached rootfs)")
    up.add_argument("--artifacts", help="directory for console log and other artifacts")

    sh = sub.add_parser("ssh", help="a shell (or one command) in an up guest")
    sh.add_argument("name", nargs="?", help="guest name (default: the only one up)")
    sh.add_argument("command", nargs=argparse.REMAINDER, help="command to run instead")

    rn = sub.add_parser("run", help="run a local Python script in an up guest, with the "
                        "guest API (pinlab_ioctl, pinlab_mm, pinlab_kmsg, pinlab_env) "
                        "importable")
    rn.add_argument("name", nargs="?", help="guest name (default: the only one up)")
    rn.add_argument("script")
    rn.add_argument("args", nargs=argparse.REMAINDER)

    rp = sub.add_parser("replug", help="device_del + device_add of the device, with what "
                        "the guest logged")
    rp.add_argument("name", nargs="?", help="guest name (default: the only one up)")
    rp.add_argument("--rounds", type=int, default=1)
    rp.add_argument("--ready-file", default="", metavar="GUEST_PATH",
                    help="before each round wait until this guest file exists, remove it")
    rp.add_argument("--ready-timeout", type=float, default=120, metavar="S")
    rp.add_argument("--force", action="store_true", help="replug an MSI-X device anyway")
    rp.add_argument("--json", action="store_true")

    qm = sub.add_parser("qmp", help="qmp-shell on the guest's QMP socket for humans")
    qm.add_argument("name", nargs="?", help="guest name (default: the only one up)")
    qm.add_argument("--device", action="store_true",
                    help="the device server's control socket instead")
    qm.add_argument("--pretty", action="store_true")

    dn = sub.add_parser("down", help="tear an up guest down")
    dn.add_argument("name", nargs="?", help="guest name (default: the only one up)")

    ps = sub.add_parser("ps", help="list the up guests (stale entries are removed)")
    ps.add_argument("--json", action="store_true")

    sub.add_parser("device", help="run the DMA device server: pinlab device serve --help",
                   add_help=False)

    m = sub.add_parser("matrix", help="run the scenario matrix and write verdicts")
    m.add_argument("--kernel", action="append", metavar="K",
                   help="kernel(s), repeatable; default: all of " + kernel_help())
    m.add_argument("--tags", action="append",
                   help="avocado tag filter, e.g. mode:odp,backing:ext4 (repeatable: ORed)")
    m.add_argument("--full", action="store_true",
                   help="every cell; default without --tags: the main job's slice, which "
                   "leaves out the read-only flow's cells (option:readonly) but their "
                   "smoke cells")
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

    from pinlab.orchestrator.validate import add_subject_arguments

    va = sub.add_parser("validate", help="run the matrix on a base and a candidate kernel and "
                        "report each cell as regression, fix, changed, unchanged, flaky or "
                        "infra-error (exit 0 no regression, 1 regression, 2 incomplete)")
    add_subject_arguments(va)
    va.add_argument("--tags", action="append",
                    help="avocado tag filter, e.g. mode:longterm,backing:ext4 (repeatable: ORed)")
    va.add_argument("--reruns", type=int, default=3,
                    help="re-runs on freshly booted guests, on both kernels, of a cell that "
                    "differs (default 3)")
    va.add_argument("--out", help="report directory (default: a new $PINLAB_RESULTS/validate-*)")
    add_shard_argument(va)
    va.add_argument("--serial", action="store_true",
                    help="run the kernels one after another (default: at the same time)")
    va.add_argument("--no-base-cache", action="store_true",
                    help="run the base's cells even if $PINLAB_CACHE/validate-base has "
                    "their results for this base, selection and pinlab; store nothing")

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

    sub.add_parser("bench", help="benchmarks: pinlab bench "
                   "device|cells|shards|kbuild|validate [--json]",
                   add_help=False)

    if argv[:1] == ["bench"]:
        if argv[1:2] not in (["device"], ["cells"], ["shards"], ["kbuild"], ["validate"]):
            p.error("usage: pinlab bench device|cells|shards|kbuild|validate [--json]")
        return _bench(argv[1], argv[2:])
    if argv[:1] == ["device"]:
        if argv[1:2] != ["serve"]:
            p.error("usage: pinlab device serve --socket PATH --control PATH [--audit FILE]")
        return _device(argparse.Namespace(), argv[2:])
    args = p.parse_args(argv)
    if args.cmd == "images":
        return _images(args)
    if args.cmd == "up":
        return _up(up, args)
    if args.cmd in ("ssh", "run", "replug", "qmp", "down"):
        from pinlab.orchestrator.registry import RegistryError
        from pinlab.orchestrator.ssh import SSHError
        from pinlab.orchestrator.workbench import WorkbenchError

        _shift_name(args)
        try:
            return {"ssh": _ssh, "run": _run, "replug": _replug, "qmp": _qmp,
                    "down": _down}[args.cmd](args)
        except (RegistryError, WorkbenchError, SSHError, FileNotFoundError) as exc:
            print(f"pinlab {args.cmd}: {exc}", file=sys.stderr)
            return 2
        except BrokenPipeError:      # our output went to a closed pipe (`| head`)
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - until exit
            return 1
    if args.cmd == "ps":
        return _ps(args)
    if args.cmd == "matrix":
        return _matrix(args)
    if args.cmd == "merge":
        return _merge(args)
    if args.cmd == "fuzz":
        return _fuzz(args)
    if args.cmd == "validate":
        return _validate(args)
    if args.cmd == "kernel":
        return _kernel(args)
    if args.cmd == "bisect":
        return _bisect(args)
    p.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
