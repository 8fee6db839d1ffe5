"""End to end: the Python DMA device, QEMU, pinlab.ko and a Debian guest.

These tests boot real guests (TCG by default) and so take tens of seconds each.
"""

from __future__ import annotations

import json
import os
import signal
import time

from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.guesttest import GuestTest
from pinlab.orchestrator.procs import process_alive, wait_for
from pinlab.orchestrator.session import GuestSession
from pinlab.orchestrator.ssh import SSHError

PAGE = 4096


class EndToEnd(GuestTest):
    """:avocado: enable"""

    def test_dma_write_anon_longterm(self) -> None:
        """
        Register anonymous memory long-term, have the device write a pattern, check the
        bytes in the guest, the audit log and dmesg.

        :avocado: tags=guest,kernel:6.12,mode:longterm,backing:anon,event:dma-write
        """
        with GuestSession.boot(self.kernel, self.artifacts) as s:
            self.remember(s)
            g = s.guest
            lspci = g.ssh.run("lspci -nnk -d 1de5:0001", check=True).out
            self.log.info("lspci:\n%s", lspci)
            self.assertIn("[1de5:0001]", lspci)
            self.assertIn("Kernel driver in use: pinlab", lspci)

            rep = s.workload("dma-write", "--mode", "longterm", "--pages", "64",
                             "--generation", "7")
            (self.artifacts / "workload.json").write_text(json.dumps(rep, indent=2))
            self.assertNotIn("error", rep, rep.get("error"))
            self.assertEqual(rep["errno"], 0, rep)
            self.assertEqual(rep["bytes_written"], 64 * PAGE)
            self.assertEqual(rep["mismatches"], 0, rep.get("first_mismatches"))
            self.assertEqual(rep["pfns"], rep["pfns_after"], "pinned pages moved")

            # The oracle: the device touched exactly the registered pages.
            region = rep["region"]
            records = s.device("query-audit", region=region, limit=100000)["records"]
            (self.artifacts / "audit-extract.json").write_text(json.dumps(records, indent=1))
            written = {r["gpa"] // PAGE for r in records if r.get("dir") == "w"}
            self.assertEqual(written, set(rep["pfns"]),
                             "device wrote pages other than the registered ones")
            self.assertEqual(s.device("query-violations")["violations"], [])

            # Pins were taken and all released.
            before, pinned, after = (rep["vmstat_before"], rep["vmstat_pinned"],
                                     rep["vmstat_after"])
            # FOLL_PIN is counted per folio, not per page: 64 pages may be fewer pins.
            acquired = pinned["nr_foll_pin_acquired"] - before["nr_foll_pin_acquired"]
            self.log.info("nr_foll_pin_acquired grew by %d for 64 pages", acquired)
            self.assertGreater(acquired, 0)
            self.assertEqual(rep["query"]["pinned"], 64)
            self.assertEqual(rep["query"]["maybe_dma_pinned"], 64)
            outstanding = lambda v: v["nr_foll_pin_acquired"] - v["nr_foll_pin_released"]  # noqa: E731
            self.assertEqual(outstanding(after), outstanding(before), "pins leaked")

            dm = classify(g.dmesg())
            self.assertEqual(dm.severe(), {}, f"kernel complained: {dm.severe()}")


class Robustness(GuestTest):
    """:avocado: enable"""

    def test_qemu_killed_mid_run(self) -> None:
        """
        Kill QEMU under a running session: the next guest command fails with a clear error
        within its deadline, teardown leaves no process, and the console log is kept.

        :avocado: tags=guest,kernel:6.12,robustness
        """
        with GuestSession.boot(self.kernel, self.artifacts) as s:
            self.remember(s)
            g = s.guest
            assert g.qemu is not None
            os.kill(g.qemu.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with self.assertRaises(SSHError) as cm:
                g.ssh.run("sleep 60", timeout=30)
            self.log.info("error after QEMU death (%.1fs): %s", time.monotonic() - t0,
                          cm.exception)
            self.assertLess(time.monotonic() - t0, 31)
            wait_for(lambda: g.dead() is not None, 10, what="QEMU's death to be noticed")
            self.assertIn("QEMU exited", g.dead() or "")
        console = (self.artifacts / "console.log").read_text(errors="replace")
        self.assertIn("PINLAB-READY", console)
        for p in self.pids:
            self.assertFalse(process_alive(p), f"pid {p} survived teardown")
