"""Smoke test against a real QEMU (vfio-user-pci client), no guest OS.

Uses the project's QEMU runtime (the host's if it has vfio-user-pci, else the one
``pinlab images build`` unpacks into the cache); ``PINLAB_QEMU`` names another binary.
Skipped only when no such QEMU is available (e.g. not root and nothing built yet).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
import unittest
from typing import IO

from qemu.qmp.legacy import QEMUMonitorProtocol

from pinlab.device.regions import pattern
from pinlab.device.testclient import LocalServer
from pinlab.images.cache import Cache
from pinlab.images.qemu import QemuRuntime, ensure_qemu


def _runtime() -> QemuRuntime | None:
    try:
        return ensure_qemu(Cache.default())
    except (RuntimeError, OSError, SystemExit):
        return None


RUNTIME = _runtime()


def qemu_command() -> list[str] | None:
    return RUNTIME.command() if RUNTIME else None


def stop_process(proc: subprocess.Popen, log: IO[str]) -> None:
    """Never leave QEMU behind: ask politely, then kill, and always reap."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@unittest.skipIf(qemu_command() is None, "no QEMU found")
class QemuSmokeTest(unittest.TestCase):
    def setUp(self) -> None:
        self.srv = LocalServer(audit=True)
        self.addCleanup(self.srv.close)
        self.qmp_path = os.path.join(self.srv.tmp, "qmp.sock")
        self.log = open(os.path.join(self.srv.tmp, "qemu.log"), "w+")  # noqa: SIM115
        cmd = [*(qemu_command() or []),
               "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-m", "256M",
               "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
               "-device", '{"driver":"vfio-user-pci","id":"dma0","socket":'
                          f'{{"type":"unix","path":"{self.srv.path}"}}}}',
               "-display", "none", "-serial", "none", "-monitor", "none", "-nodefaults",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-S"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(RUNTIME.env if RUNTIME else {})})
        self.addCleanup(stop_process, self.proc, self.log)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.fail(f"QEMU did not start: {self.qemu_log()}")
            time.sleep(0.05)
        self.qmp = QEMUMonitorProtocol(self.qmp_path)
        self.qmp.connect()

    def tearDown(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.cmd("quit")
        with contextlib.suppress(Exception):
            self.qmp.close()

    def qemu_log(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def our_device(self) -> dict:
        for bus in self.qmp.cmd("query-pci"):
            for dev in bus["devices"]:
                if dev["id"]["vendor"] == 0x1DE5:
                    return dev
        self.fail("device not found in query-pci")

    def test_realize_and_mmio(self) -> None:
        dev = self.our_device()
        self.assertEqual(dev["id"]["device"], 0x0001)
        self.assertEqual(dev["class_info"]["class"], 0x0880)
        bars = {r["bar"]: r for r in dev["regions"]}
        self.assertEqual(sorted(bars), [0, 2])
        self.assertEqual((bars[0]["size"], bars[2]["size"]), (4096, 4096))
        self.assertTrue(self.srv.device.connected)
        backed = [m for m in self.srv.device.memory.mappings() if m["backed"]]
        self.assertTrue(backed, "no fd-backed DMA map from QEMU")
        # let SeaBIOS assign the BARs, then read BAR0 registers through QEMU (HMP xp)
        self.qmp.cmd("cont")
        deadline = time.monotonic() + 30
        while self.our_device()["regions"][0]["address"] in (0, 0xFFFFFFFFFFFFFFFF):
            self.assertLess(time.monotonic(), deadline, "firmware did not assign BAR0")
            time.sleep(0.2)
        while not self.srv.device.pci.config.read(0x04, 2)[0] & 2:  # wait for MEM enable
            self.assertLess(time.monotonic(), deadline, "firmware did not enable MEM")
            time.sleep(0.2)
        bar0 = self.our_device()["regions"][0]["address"]
        out = self.qmp.cmd("human-monitor-command", **{"command-line": f"xp /2wx {bar0:#x}"})
        self.assertIn("0x50494e4c", out.lower())
        self.assertIn("0x00010000", out.lower())
        self.qmp.cmd("system_reset")
        time.sleep(0.5)
        self.assertTrue(self.srv.device.connected)
        self.assertGreaterEqual(self.srv.device.engine.stats["resets"], 2)
        self.assertNotIn("error", self.qemu_log().lower())


if __name__ == "__main__":
    unittest.main()


class Qtest:
    """Minimal client for QEMU's qtest text protocol (QEMU connects to our socket)."""

    def __init__(self, listener: socket.socket) -> None:
        self.sock, _ = listener.accept()
        self.sock.settimeout(20)
        self.f = self.sock.makefile("rwb")

    def cmd(self, line: str) -> str:
        self.f.write(line.encode() + b"\n")
        self.f.flush()
        while True:
            reply = self.f.readline().decode().strip()
            if not reply:
                raise ConnectionError("qtest connection closed")
            if reply.startswith("IRQ"):
                continue
            if not reply.startswith("OK"):
                raise RuntimeError(f"qtest {line!r}: {reply}")
            return reply[2:].strip()

    def write(self, addr: int, data: bytes) -> None:
        self.cmd(f"write {addr:#x} {len(data)} 0x{data.hex()}")

    def read(self, addr: int, n: int) -> bytes:
        return bytes.fromhex(self.cmd(f"read {addr:#x} {n}")[2:])

    def cfg_addr(self, devfn: int, reg: int) -> int:
        return 0x80000000 | devfn << 8 | reg

    def cfg_write(self, devfn: int, reg: int, val: int) -> None:
        self.cmd(f"outl 0xcf8 {self.cfg_addr(devfn, reg & ~3):#x}")
        self.cmd(f"outl 0xcfc {val:#x}")

    def cfg_read(self, devfn: int, reg: int) -> int:
        self.cmd(f"outl 0xcf8 {self.cfg_addr(devfn, reg & ~3):#x}")
        return int(self.cmd("inl 0xcfc"), 16)

    def close(self) -> None:
        self.f.close()
        self.sock.close()


@unittest.skipIf(qemu_command() is None, "no QEMU found")
class QemuDmaTest(unittest.TestCase):
    """qtest protocol: program the device through QEMU and check DMA + MSI-X in RAM."""

    BAR0, BAR2 = 0xFE000000, 0xFE001000
    SQ, CQ, EQ, LIST, MSI = 0x100000, 0x101000, 0x102000, 0x103000, 0x300000

    def setUp(self) -> None:
        self.srv = LocalServer(audit=True)
        self.addCleanup(self.srv.close)
        qt_path = os.path.join(self.srv.tmp, "qtest.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(qt_path)
        self.listener.listen(1)
        self.listener.settimeout(20)
        self.log = open(os.path.join(self.srv.tmp, "qemu.log"), "w+")  # noqa: SIM115
        cmd = [*(qemu_command() or []),
               # this QEMU build has no qtest accelerator: tcg with stopped vCPUs (-S)
               "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-S", "-m", "64M",
               "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
               "-device", '{"driver":"vfio-user-pci","id":"dma0","addr":"0x4","socket":'
                          f'{{"type":"unix","path":"{self.srv.path}"}}}}',
               "-display", "none", "-serial", "none", "-monitor", "none", "-nodefaults",
               "-qtest", f"unix:{qt_path}"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(RUNTIME.env if RUNTIME else {})})
        self.addCleanup(stop_process, self.proc, self.log)
        self.addCleanup(self.listener.close)
        self.qt = Qtest(self.listener)
        self.addCleanup(self.qt.close)

    def reg(self, off: int, val: int | None = None, width: int = 4) -> int:
        op = "l" if width == 4 else "q"
        if val is not None:
            self.qt.cmd(f"write{op} {self.BAR0 + off:#x} {val:#x}")
            return val
        return int(self.qt.cmd(f"read{op} {self.BAR0 + off:#x}"), 16)

    def submit(self, slot: int, op: int, region: int, *args: int) -> None:
        a = [*args, *[0] * (7 - len(args))]
        self.qt.write(self.SQ + slot * 64, struct.pack("<BBHI7Q", op, 0, slot, region, *a))
        self.reg(0x01C, slot + 1)

    def completion(self, slot: int) -> tuple[int, int, int, int]:
        deadline = time.monotonic() + 10
        while True:
            cid, status, flags, r0 = struct.unpack("<HHIQ", self.qt.read(self.CQ + 32 * slot,
                                                                         16))
            if flags & 1:
                return cid, status, flags, r0
            self.assertLess(time.monotonic(), deadline, "no completion")
            time.sleep(0.01)

    def test_dma_and_msix_through_qemu(self) -> None:
        qt, devfn = self.qt, 4 << 3
        self.assertEqual(qt.cfg_read(devfn, 0), 0x00011DE5)
        qt.cfg_write(devfn, 0x10, self.BAR0)
        qt.cfg_write(devfn, 0x18, self.BAR2)
        qt.cfg_write(devfn, 0x04, 0x0006)  # MEM | MASTER
        self.assertEqual(self.reg(0x000), 0x50494E4C)
        # MSI-X: enable, program vector 0 to write into RAM
        qt.cfg_write(devfn, 0x40, (0x8000 | 3) << 16 | qt.cfg_read(devfn, 0x40) & 0xFFFF)
        qt.write(self.BAR2, struct.pack("<IIII", self.MSI, 0, 0xCAFEBABE, 0))
        # rings
        self.reg(0x010, self.SQ, 8)
        self.reg(0x018, 16)
        self.reg(0x028, self.CQ, 8)
        self.reg(0x030, 16)
        self.reg(0x040, self.EQ, 8)
        self.reg(0x048, 16)
        self.reg(0x00C, 1)
        self.assertEqual(self.reg(0x008), 1)
        pages = [0x200000 + i * 0x1000 for i in range(4)]
        qt.write(self.LIST, struct.pack("<4Q", *pages))
        self.submit(0, 1, 5, 4, 1)  # CREATE_REGION 5, 4 pages, writable
        self.submit(1, 2, 5, 0, 4, self.LIST)  # MAP_PAGES
        self.submit(2, 5, 5, 0, 4 * 4096, 77)  # DMA_WRITE generation 77
        self.assertEqual(self.completion(0)[1], 0)
        self.assertEqual(self.completion(1)[1], 0)
        cid, status, _, r0 = self.completion(2)
        self.assertEqual((cid, status, r0), (2, 0, 4 * 4096))
        self.assertEqual(qt.read(pages[3], 4096), pattern(5, 77, 3 * 4096, 4096))
        self.assertEqual(struct.unpack("<I", qt.read(self.MSI, 4))[0], 0xCAFEBABE)
        self.assertEqual(self.reg(0x060), 3)
        self.assertEqual(self.srv.device.irq.triggered[0], 3)
        self.assertEqual(self.srv.device.audit.stats()["violations"], 0)
