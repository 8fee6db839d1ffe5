"""One guest: the device server, QEMU, the serial console, QMP and SSH, with teardown.

    with Guest(images, artifacts) as g:
        g.ssh.run("uname -r")

Every wait has a deadline; a failure says what was waited for and carries the console's
tail. Teardown (also on exceptions and Ctrl-C) leaves no QEMU or device process behind and
keeps every artifact: console.log, qemu.log, device.log, audit.jsonl, qmp.log, dmesg.txt.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pinlab.common.vocab import GUEST_MODULE  # where load_module() puts pinlab.ko
from pinlab.images.build import GuestImages

from .console import Console
from .procs import Child, wait_for
from .qmp import QMP, QMPError
from .ssh import GuestSSH

DEVICE_ID = "pinlab0"



class GuestError(RuntimeError):
    """A guest failed to start or died; the message carries the evidence."""


@dataclass
class GuestConfig:
    accel: str = "tcg"
    memory_mb: int = 1024
    cpus: int = 2
    device: bool = True
    boot_timeout: float = 180.0
    ssh_timeout: float = 90.0
    msg_timeout_ms: int = 10000  # vfio-user x-msg-timeout; a late reply kills the device
    cmdline: str = ""
    disks: list[tuple[str, Path]] = field(default_factory=list)  # (serial, image)
    scratch_disks: dict[str, int] = field(default_factory=dict)  # serial -> MiB, made blank
    device_args: list[str] = field(default_factory=list)
    # room for memory hot-add (pc-dimm through QMP); 0: none
    hotplug_mb: int = 0
    # a second NUMA node of numa_mb MiB of RAM and no CPU (0: one node). Node 0 keeps
    # memory_mb and every CPU, so what a one-node guest allocates stays where it was
    numa_mb: int = 0
    # QEMU's gdbstub on 127.0.0.1:gdb_port (0: none); the kernel then boots with nokaslr
    # so that symbol addresses (vmlinux, /proc/kallsyms) are the link-time ones
    gdb_port: int = 0


class Guest:
    def __init__(self, images: GuestImages, artifacts: Path,
                 config: GuestConfig | None = None) -> None:
        self.images = images
        self.cfg = config or GuestConfig()
        self.artifacts = artifacts
        artifacts.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 108 bytes: keep them short, apart from artifacts.
        self.rundir = Path(tempfile.mkdtemp(prefix="pinlab-"))
        self.device_sock = self.rundir / "device.sock"
        self.control_sock = self.rundir / "control.sock"
        self.qmp_sock = self.rundir / "qmp.sock"
        self.human_qmp_sock = self.rundir / "qmp-human.sock"
        self.console = Console(artifacts / "console.log")
        self.device: Child | None = None
        self.qemu: Child | None = None
        self.qmp: QMP | None = None
        self.ssh: GuestSSH = None  # type: ignore[assignment]  # set by start()
        self.ssh_port = 0
        self.boot_seconds = 0.0
        self.ready_line = ""
        self._stopped = False

    # -- start -----------------------------------------------------------------------
    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        if self.cfg.device:
            self.start_device()
        self.qemu = Child("qemu", self.images.qemu.command(*self.qemu_args()),
                          self.artifacts / "qemu.log", env=self.images.qemu.env)
        wait_for(self.qmp_sock.exists, 30, what="QEMU's QMP socket", abort=self.dead)
        self.qmp = QMP(self.qmp_sock, self.artifacts / "qmp.log")
        self.qmp.connect()
        try:
            wait_for(lambda: self.console.ready_line() is not None, self.cfg.boot_timeout,
                     step=0.1, what="the guest's READY marker on the console",
                     abort=self.dead)
        except (TimeoutError, RuntimeError) as exc:
            raise GuestError(f"{exc}\n--- console tail ---\n{self.console.tail()}") from exc
        self.ready_line = self.console.ready_line() or ""
        self.ssh_port = self._forwarded_port()
        self.ssh = GuestSSH("127.0.0.1", self.ssh_port, self.images.rootfs.client_key,
                            self.images.rootfs.host_key_pub)
        self.ssh.connect(self.cfg.ssh_timeout)
        self.boot_seconds = time.monotonic() - t0
        self._write_info()

    def start_device(self) -> None:
        argv = [sys.executable, "-m", "pinlab.device", "--socket", str(self.device_sock),
                "--control", str(self.control_sock),
                "--audit", str(self.artifacts / "audit.jsonl"), *self.cfg.device_args]
        self.device = Child("device", argv, self.artifacts / "device.log")
        wait_for(self.device_sock.exists, 30, what="the device server's socket",
                 abort=lambda: None if self.device and self.device.alive() else
                 f"device server exited: {self.device.tail(10) if self.device else ''}")

    def qemu_args(self) -> list[str]:
        c, im = self.cfg, self.images
        # no_timer_check: on a busy host a TCG guest's early IO-APIC timer test can miss
        # its ticks and panic ("IO-APIC + timer doesn't work!"; seen in a CI-equivalent
        # run with other guests busy); the check means nothing for an emulated timer
        append = (f"console=ttyS0 panic=-1 no_timer_check pinlab.hostname=pinlab "
                  f"{c.cmdline}").strip()
        if c.gdb_port:
            append += " nokaslr"
        args = [
            "-name", "pinlab,debug-threads=on",
            "-machine", "q35" if c.numa_mb else "q35,memory-backend=mem", "-accel",
            "tcg,thread=multi" if c.accel == "tcg" else "kvm",
            "-cpu", "max" if c.accel == "tcg" else "host", "-smp", str(c.cpus),
            *self.memory_args(),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(im.kernel.vmlinuz), "-initrd", str(im.kernel.initramfs),
            "-append", append,
            "-chardev", f"file,id=con,path={self.console.path}", "-serial", "chardev:con",
            "-drive", f"if=none,id=root,file={im.rootfs.image},format=raw,snapshot=on",
            "-device", "virtio-blk-pci,drive=root,serial=pinlab-root",
            "-drive", f"if=none,id=mods,file={im.kernel.modules_img},format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=mods,serial=pinlab-mods",
            "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22",
            "-device", "virtio-net-pci,netdev=net0",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-qmp", f"unix:{self.human_qmp_sock},server=on,wait=off",
        ]
        if c.gdb_port:   # localhost only: the stub gives full control of the guest
            args += ["-gdb", f"tcp:127.0.0.1:{c.gdb_port}"]
        disks = list(c.disks)
        for serial, mib in sorted(c.scratch_disks.items()):
            img = self.rundir / f"{serial}.img"  # sparse: costs nothing until written
            with open(img, "wb") as fh:
                fh.truncate(mib << 20)
            disks.append((serial, img))
        for i, (serial, image) in enumerate(disks):
            args += ["-drive", f"if=none,id=disk{i},file={image},format=raw",
                     "-device", f"virtio-blk-pci,drive=disk{i},serial={serial}"]
        if c.device:
            # Behind a PCIe root port: devices on q35's root complex cannot be hot-unplugged.
            args += ["-device", "pcie-root-port,id=pinlab-port,chassis=1,slot=1",
                     "-device", json.dumps(self.device_spec(), separators=(",", ":"))]
        return args

    def memory_args(self) -> list[str]:
        """QEMU's RAM options: ``-m`` (with hotplug slots when ``hotplug_mb``) and one
        shared memfd backend per NUMA node (the device reads and writes guest RAM through
        those memfds). With ``numa_mb`` the guest has two nodes (QEMU ``-numa node``):
        node 0 with ``memory_mb`` and every CPU, node 1 with ``numa_mb`` and no CPU, so
        NUMA balancing has a remote node to move pages away from
        (Documentation/admin-guide/sysctl/kernel.rst, numa_balancing)."""
        c = self.cfg
        total = c.memory_mb + c.numa_mb
        m = f"{total}M"
        if c.hotplug_mb:
            m += f",slots=2,maxmem={total + c.hotplug_mb}M"
        args = ["-m", m,
                "-object", f"memory-backend-memfd,id=mem,size={c.memory_mb}M,share=on"]
        if c.numa_mb:
            args += ["-object", f"memory-backend-memfd,id=mem1,size={c.numa_mb}M,share=on",
                     "-numa", f"node,nodeid=0,cpus=0-{c.cpus - 1},memdev=mem",
                     "-numa", "node,nodeid=1,memdev=mem1"]
        return args

    def device_spec(self) -> dict[str, Any]:
        """The vfio-user-pci device, as -device JSON and as QMP device_add arguments."""
        return {"driver": "vfio-user-pci", "id": DEVICE_ID,
                "x-msg-timeout": self.cfg.msg_timeout_ms, "bus": "pinlab-port",
                "socket": {"type": "unix", "path": str(self.device_sock)}}

    def replug_device(self, timeout: float = 30, node: str = "/dev/pinlab0") -> str:
        """Plug the device back in after a device_del (QMP device_add on the same root
        port; the device server kept running and accepts QEMU's new connection), and wait
        for its char device. ``node`` may be a shell glob: the driver names the new device
        pinlab1 when a file of the removed pinlab0 is still open. Returns the node found.
        Raises QMPError, SSHError (no node within ``timeout`` seconds)."""
        assert self.qmp
        self.qmp.cmd("device_add", **self.device_spec())
        return self.ssh.run(
            f"for i in $(seq {int(timeout * 10)}); do for n in {node}; do [ -c \"$n\" ] && "
            f"echo \"$n\" && exit 0; done; sleep 0.1; done; "
            f"echo 'no {node} after device_add' >&2; exit 1",
            check=True, timeout=timeout + 10).out.strip()

    def dead(self) -> str | None:
        """Why the guest can no longer work (QEMU or the device server exited, or the
        console shows a panic), or None while it is alive."""
        if self.qemu and not self.qemu.alive():
            return f"QEMU exited with {self.qemu.returncode()}: {self.qemu.tail(10).strip()}"
        if self.cfg.device and self.device and not self.device.alive():
            return f"device server exited with {self.device.returncode()}"
        return self.console.fatal()

    def _forwarded_port(self) -> int:
        assert self.qmp
        text = self.qmp.hmp("info usernet")
        m = re.search(r"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+10\.0\.2\.15\s+22", text)
        if not m:
            raise GuestError(f"no SSH port forward in 'info usernet':\n{text}")
        return int(m.group(1))

    def _write_info(self) -> None:
        info = {
            "ssh": self.ssh_command(), "ssh_port": self.ssh_port,
            "qmp_human": str(self.human_qmp_sock), "device_socket": str(self.device_sock),
            "device_control": str(self.control_sock), "console": str(self.console.path),
            "kernel": self.images.kernel.release, "qemu": self.images.qemu.version,
            "accel": self.cfg.accel, "boot_seconds": round(self.boot_seconds, 2),
            "gdb": f"127.0.0.1:{self.cfg.gdb_port}" if self.cfg.gdb_port else None,
            "device_spec": self.device_spec() if self.cfg.device else None,
            "ready": self.ready_line,
        }
        (self.artifacts / "guest.json").write_text(json.dumps(info, indent=2) + "\n")

    def ssh_command(self) -> str:
        return (f"ssh -i {self.images.rootfs.client_key} -p {self.ssh_port} "
                f"-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@127.0.0.1")

    # -- in the guest ------------------------------------------------------------------
    def push_module(self) -> None:
        """Copy this kernel's pinlab.ko to GUEST_MODULE in the guest."""
        self.ssh.put(self.images.kmod, GUEST_MODULE)

    def load_module(self, params: str = "") -> None:
        self.push_module()
        self.ssh.run(f"insmod {GUEST_MODULE} {params}", check=True, timeout=60)
        self.ssh.run("for i in $(seq 100); do [ -c /dev/pinlab0 ] && exit 0; sleep 0.1; done;"
                     " echo 'no /dev/pinlab0' >&2; exit 1", check=True, timeout=30)

    def dmesg(self, name: str = "dmesg.txt") -> str:
        text = self.ssh.run("dmesg", timeout=60, check=True).out
        (self.artifacts / name).write_text(text)
        return text

    # -- stop --------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.ssh is not None:
            with contextlib.suppress(Exception):
                if self.ssh.client is not None:
                    self.dmesg("dmesg-final.txt")
            self.ssh.close()
        if self.qmp:
            with contextlib.suppress(QMPError):
                self.qmp.cmd("quit", timeout=5)
            self.qmp.close()
        if self.qemu:
            with contextlib.suppress(Exception):
                self.qemu.proc.wait(timeout=10)
            self.qemu.stop(grace=5)
        if self.device:
            self.device.stop(grace=5)
        shutil.rmtree(self.rundir, ignore_errors=True)
