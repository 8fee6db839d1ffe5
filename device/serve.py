"""Command line: ``python -m pinlab.device --socket PATH --control PATH [--audit FILE]
[--irq msix|msi]``."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from types import FrameType

from .control import ControlServer
from .device import Device
from .engine import SWITCH_INTERVAL
from .fastpath import ready as fastpath_ready
from .limits import AUDIT_FILE_MAX
from .pci import IRQ_MODES
from .sched import device_thread, enable_realtime
from .server import VfioUserServer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pinlab-device",
                                description="pinlab emulated PCI DMA engine (vfio-user server)")
    p.add_argument("--socket", required=True, help="vfio-user Unix socket path")
    p.add_argument("--control", required=True, help="QMP control Unix socket path")
    p.add_argument("--audit", help="append every audit record to this JSONL file (created "
                                   "0600; a symlink is refused)")
    p.add_argument("--audit-max-bytes", type=int, default=AUDIT_FILE_MAX, metavar="N",
                   help="bound of the audit file: past it a 'truncated' record ends the file "
                        f"(default {AUDIT_FILE_MAX})")
    p.add_argument("--bar0-mirror", action="store_true",
                   help="offer BAR0 page 1 (the register mirror) for the client to map "
                        "(device/REGISTERS.md)")
    p.add_argument("--irq", choices=IRQ_MODES, default="msix",
                   help="interrupt capability: MSI-X (default) or MSI (no BAR2; use it when "
                        "the device is hot-unplugged: QEMU 11.1 aborts on device_del of a "
                        "vfio-user-pci device with MSI-X)")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.setswitchinterval(SWITCH_INTERVAL)  # prompt hand-offs between device threads
    enable_realtime()  # the doorbell path does not queue behind CPU hogs (sched.py)
    device_thread()  # the main thread too (it holds the interpreter lock now and then)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        device = Device(args.audit, irq=args.irq, audit_max=args.audit_max_bytes,
                        mirror=args.bar0_mirror)
    except OSError as exc:
        print(f"pinlab-device: --audit: {exc}", file=sys.stderr)
        for s, h in old.items():
            signal.signal(s, h)
        return 1
    control: ControlServer | None = None
    server: VfioUserServer | None = None
    try:
        control = ControlServer(device, args.control)
        control.start()
        server = VfioUserServer(device, args.socket)  # the socket file appears here
        server.start()
        print(f"pinlab-device: listening on {args.socket}", file=sys.stderr, flush=True)
        frozen = False
        while not stop.wait(0.5):
            if not frozen and fastpath_ready():
                # what numba loaded and compiled stays for the process's life: out of the
                # collector's way, a full collection no longer walks it (20-30 ms, in
                # whichever device thread allocates, a revoke's too)
                gc.freeze()
                frozen = True
            if not server.thread.is_alive():
                logging.error("vfio-user server thread died")
                return 1
        return 0
    except OSError as exc:
        print(f"pinlab-device: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        if control is not None:
            control.stop()
        device.close()
        for s, h in old.items():
            signal.signal(s, h)
