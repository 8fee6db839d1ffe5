"""``python -m pinlab.device``: readiness line, signals, socket clean-up, die fault."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from qemu.qmp import QMPClient

from pinlab.device.testclient import VfioUserClient


class CliTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="pinlab-cli-")
        self.sock = os.path.join(self.tmp.name, "vfio.sock")
        self.ctl = os.path.join(self.tmp.name, "control.sock")
        self.audit = os.path.join(self.tmp.name, "audit.jsonl")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pinlab.device", "--socket", self.sock, "--control",
             self.ctl, "--audit", self.audit, "--log-level", "WARNING"],
            stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.ready = self.proc.stderr.readline()

    def tearDown(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        self.tmp.cleanup()

    def test_ready_line_and_sigterm(self) -> None:
        self.assertEqual(self.ready.strip(), f"pinlab-device: listening on {self.sock}")
        self.assertTrue(os.path.exists(self.sock) and os.path.exists(self.ctl))
        with VfioUserClient(self.sock) as c:
            c.version()
            self.assertEqual(c.get_info()[2], 9)
            self.proc.send_signal(signal.SIGTERM)
            self.assertEqual(self.proc.wait(10), 0)
        self.assertFalse(os.path.exists(self.sock))
        self.assertFalse(os.path.exists(self.ctl))
        self.assertTrue(os.path.exists(self.audit))

    def test_sigint(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.assertEqual(self.proc.wait(10), 0)
        self.assertFalse(os.path.exists(self.sock))

    def test_die_fault(self) -> None:
        async def go() -> None:
            qmp = QMPClient("t")
            await qmp.connect(self.ctl)
            self.assertEqual(await qmp.execute("set-fault", {"die": True}), {})
            await qmp.disconnect()
        asyncio.run(asyncio.wait_for(go(), 10))
        deadline = time.monotonic() + 10
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.proc.returncode, 99)


class CliMsiTest(unittest.TestCase):
    def test_irq_msi(self) -> None:
        from pinlab.device import protocol as P

        with tempfile.TemporaryDirectory(prefix="pinlab-cli-") as tmp:
            sock, ctl = os.path.join(tmp, "vfio.sock"), os.path.join(tmp, "control.sock")
            proc = subprocess.Popen(
                [sys.executable, "-m", "pinlab.device", "--socket", sock, "--control", ctl,
                 "--irq", "msi", "--log-level", "WARNING"], stderr=subprocess.PIPE, text=True)
            try:
                assert proc.stderr is not None
                self.assertIn("listening", proc.stderr.readline())
                with VfioUserClient(sock) as c:
                    c.version()
                    self.assertEqual(c.cfg_read(0x40, 1), 0x05)  # MSI capability
                    self.assertEqual(c.region_info(P.PCI_BAR2)[4], 0)
                    self.assertEqual(c.irq_info(P.IRQ_MSI)[3], 4)
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(10), 0)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                if proc.stderr is not None:
                    proc.stderr.close()
            bad = subprocess.run([sys.executable, "-m", "pinlab.device", "--socket", sock,
                                  "--control", ctl, "--irq", "intx"], capture_output=True,
                                 text=True)
            self.assertEqual(bad.returncode, 2)
            self.assertIn("--irq", bad.stderr)


if __name__ == "__main__":
    unittest.main()
