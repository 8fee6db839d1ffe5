"""The debugging workbench end to end, through the command line a human uses: ``pinlab up``
(as a matrix guest, as one cell's guest, with gdb, without the device) and the commands
beside it (``ps``, ``ssh``, ``run``, ``replug``, ``qmp``, ``down``), running the README's
three experiments (examples/) on kernel 6.12 and asserting what they observe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from avocado import Test

from pinlab.orchestrator.procs import process_alive, wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
BOOT_DEADLINE = 600      # a hang, not a speed check: TCG on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workbench(Test):
    """:avocado: enable"""

    timeout = 1500

    def setUp(self) -> None:
        self.kernel = self.params.get("kernel", default="6.12")
        self.work = Path(self.workdir)
        self.env = {**os.environ, "PINLAB_GUESTS_DIR": str(self.work / "guests"),
                    "PINLAB_RESULTS": str(Path(self.logdir) / "runs")}
        self.ups: list[subprocess.Popen[bytes]] = []

    # -- helpers
    def pinlab(self, *args: str, timeout: float = 600, check: bool = True,
               stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "pinlab", *args], env=self.env, text=True,
                           capture_output=True, timeout=timeout, input=stdin)
        self.log.info("$ pinlab %s -> %d\n%s\n%s", " ".join(args), r.returncode,
                      r.stdout[-6000:], r.stderr[-3000:])
        if check and r.returncode != 0:
            self.fail(f"pinlab {' '.join(args)} exited {r.returncode}: {r.stderr[-2000:]}")
        return r

    def up(self, name: str, *args: str) -> dict[str, Any]:
        log = open(Path(self.logdir) / f"up-{name}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", "pinlab", "up", "--name", name, *args],
                             env=self.env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        self.ups.append(p)
        state = self.work / "guests" / f"{name}.json"
        wait_for(state.exists, BOOT_DEADLINE, step=0.5, what=f"guest {name} to come up",
                 abort=lambda: None if p.poll() is None else
                 f"pinlab up exited {p.returncode}: "
                 + (Path(self.logdir) / f"up-{name}.log").read_text()[-2000:])
        return dict(json.loads(state.read_text()))

    def report(self, r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
        """The JSON report an example prints as its last line."""
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        self.assertTrue(lines, f"no JSON report in: {r.stdout[-2000:]} {r.stderr[-2000:]}")
        return dict(json.loads(lines[-1]))

    def down(self, entry: dict[str, Any]) -> None:
        """`pinlab down`, then: the up process, QEMU and the device server are gone."""
        rundir = str(Path(entry["control"]).parent)
        self.pinlab("down", entry["name"], timeout=180)
        self.assertFalse(process_alive(entry["pid"]), "pinlab up outlived pinlab down")
        left = []
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if rundir in cmd and process_alive(pid):
                left.append((pid, cmd[:200]))
        self.assertEqual(left, [], "processes of the guest outlived pinlab down")
        self.assertFalse((self.work / "guests" / f"{entry['name']}.json").exists())

    def tearDown(self) -> None:
        for p in self.ups:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    # -- tests
    def test_three_experiments(self) -> None:
        """
        The README's experiments in one `up` guest (MSI, the default): a read-only pin of
        an unwritten MAP_PRIVATE ext4 file then a CPU write; MADV_DONTNEED of half a
        pinned THP; ten unplug/replug rounds of the device while it streams.

        :avocado: tags=guest,workbench,kernel:6.12
        """
        e = self.up("wb", "--kernel", self.kernel)
        ps = self.pinlab("ps").stdout
        self.assertRegex(ps, rf"(?m)^wb\s+{re.escape(self.kernel)}\s+{e['pid']}\s")
        mounts = self.pinlab("ssh", "wb", "findmnt", "-rno", "TARGET,FSTYPE").stdout
        for mnt in ("/mnt/pinlab-ext4 ext4", "/mnt/pinlab-xfs xfs",
                    "/mnt/pinlab-hugetlbfs hugetlbfs"):
            self.assertIn(mnt, mounts)
        qmp = self.pinlab("qmp", "wb", stdin="query-status\n", timeout=60).stdout
        self.assertIn('"running": true', qmp)

        # 1. R/O pin of a private file mapping, then a CPU write
        rep = self.report(self.pinlab("run", "wb", str(EXAMPLES / "ro_longterm_private_file.py"),
                                      "--modes", "longterm,pin"))
        by = {m["mode"]: m for m in rep["modes"]}
        lt, pin = by["longterm"], by["pin"]
        # FOLL_LONGTERM R/O in a COW mapping unshares: anon copies are pinned, and the CPU
        # write lands in them (gup_must_unshare(), mm/internal.h)
        self.assertEqual(lt["moved_at_register"], lt["pages"], lt)
        self.assertEqual(lt["moved_at_write"], 0, lt)
        self.assertTrue(lt["after_write"]["device_reads_mapping"], lt)
        # a short-term R/O pin keeps the page-cache page: the write COWs away from it
        self.assertEqual(pin["moved_at_register"], 0, pin)
        self.assertEqual(pin["moved_at_write"], pin["pages"], pin)
        self.assertTrue(pin["after_write"]["device_reads_file"], pin)
        self.assertFalse(pin["after_write"]["device_reads_mapping"], pin)
        for m in (lt, pin):
            self.assertTrue(m["before_write"]["device_reads_mapping"], m)
            self.assertEqual(m["pins_left"], 0, m)

        # 2. MADV_DONTNEED of half a pinned THP
        rep = self.report(self.pinlab("run", "wb", str(EXAMPLES / "thp_dontneed_half.py"),
                                      "--mode", "longterm"))
        if rep["thp_before"] != 1:
            self.cancel(f"no THP to start from (THP setting {rep['thp']}): {rep}")
        self.assertGreaterEqual(rep["vmstat_dontneed"].get("thp_split_pmd", 0), 1, rep)
        self.assertEqual(rep["thp_after_dontneed"], 0, rep)
        self.assertEqual(rep["second_half_mapped_after_dontneed"], 0, rep)
        self.assertTrue(rep["first_half_kept"], rep)
        self.assertEqual(rep["g2_first_half"], 256, rep)
        self.assertEqual(rep["g2_second_half"], 0, rep)   # the device writes the old pages
        self.assertFalse(rep["device_reads_second_half_as_process"], rep)
        self.assertEqual(rep["query"]["pinned"], 512, rep)
        self.assertEqual(rep["pins_left"], 0, rep)

        # 3. ten unplug/replug rounds while streaming
        ready = "/tmp/pinlab-stream.ready"
        stream = subprocess.Popen(
            [sys.executable, "-m", "pinlab", "run", "wb",
             str(EXAMPLES / "stream_across_replug.py"), "--rounds", "10",
             "--ready-file", ready], env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            rp = self.pinlab("replug", "wb", "--rounds", "10", "--ready-file", ready, "--json",
                             timeout=900)
            out, err = stream.communicate(timeout=300)
        finally:
            if stream.poll() is None:
                stream.kill()
                stream.wait()
        self.log.info("stream_across_replug:\n%s\n%s", out[-6000:], err[-3000:])
        self.assertEqual(stream.returncode, 0, err[-2000:])
        rounds = json.loads(rp.stdout)["rounds"]
        self.assertEqual(len(rounds), 10)
        for r in rounds:
            self.assertTrue(any("removed" in ln for ln in r["dmesg"]), r)
            self.assertTrue(any("MSI vectors" in ln for ln in r["dmesg"]), r)
            self.assertRegex(r["node"], r"^/dev/pinlab\d+$")
        rep = self.report(subprocess.CompletedProcess([], 0, out, err))
        self.assertEqual(len(rep["rounds"]), 10)
        for r in rep["rounds"]:
            self.assertEqual(r["streaming_pages"], 16, r)
            self.assertIsNotNone(r["gone"], r)
            self.assertFalse(r["written_after_gone"], r)
            self.assertEqual(r["pins_left"], 0, r)
        self.assertEqual(rep["severe"], [])
        self.down(e)

    def test_cell_guest_with_gdb(self) -> None:
        """
        `up --cell` of a file-backed cell gives a guest where the cell's mapping is made with
        no setup by hand; with --gdb a breakpoint on ext4's dirty path (ext4_dirty_folio,
        reached from set_page_dirty_lock by the 2018 cell's DIRTY ioctl) stops the guest.

        :avocado: tags=guest,workbench,gdb,kernel:6.12
        """
        gdb = shutil.which("gdb")
        port = free_port()
        cell = f"{self.kernel}/pin/ext4/2018"
        e = self.up("cellg", "--cell", cell, "--gdb", str(port))
        self.assertEqual(e["cell"], "pin/ext4/2018")
        self.assertEqual(e["gdb"], f"127.0.0.1:{port}")
        cmdline = self.pinlab("ssh", "cellg", "cat", "/proc/cmdline").stdout
        self.assertIn("nokaslr", cmdline)
        self.assertIn("page_poison=1", cmdline)    # the matrix guest's command line
        syms = dict(reversed(ln.split()[:3:2]) for ln in self.pinlab(
            "ssh", "cellg", "grep -wE 'set_page_dirty_lock|ext4_dirty_folio' /proc/kallsyms"
        ).stdout.splitlines())
        self.assertEqual(set(syms), {"set_page_dirty_lock", "ext4_dirty_folio"}, syms)
        run_args = ["run", "cellg", str(EXAMPLES / "cell_event.py"), "pin", "ext4", "2018"]
        if gdb is None:
            rep = self.report(self.pinlab(*run_args))
        else:
            cmds = self.work / "gdb.cmds"
            cmds.write_text("set pagination off\n"
                            f"target remote 127.0.0.1:{port}\n"
                            f"hbreak *0x{syms['set_page_dirty_lock']}\ncontinue\ndelete\n"
                            f"hbreak *0x{syms['ext4_dirty_folio']}\ncontinue\n"
                            "info registers rip\ndelete\ndetach\n")
            g = subprocess.Popen([gdb, "-q", "-batch", "-nx", "-x", str(cmds)], text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                time.sleep(5)   # attached: the guest stops until gdb continues
                rep = self.report(self.pinlab(*run_args))
                gout, _ = g.communicate(timeout=120)
            finally:
                if g.poll() is None:
                    g.kill()
                    g.wait()
            self.log.info("gdb:\n%s", gout)
            self.assertRegex(gout, rf"rip\s+0x{syms['ext4_dirty_folio'].lstrip('0')}\b")
            self.assertIn("Breakpoint 2", gout)
        # the cell's own mapping on its own filesystem, made by the matrix's code
        self.assertEqual(rep["errno"], 0, rep)
        self.assertTrue(rep["steps"], rep)
        self.assertEqual(rep.get("dirty_pages"), 16, rep)
        self.assertEqual(rep["map_g1"], [["g1", 0, 16]], rep)

        # a host-driven event by hand: the hot-unplug cell's event waits for the device to
        # go, `pinlab replug --ready-file` removes it when the cell says it is streaming
        hu = subprocess.Popen([sys.executable, "-m", "pinlab", "run", "cellg",
                               str(EXAMPLES / "cell_event.py"), "pin", "anon", "hot-unplug"],
                              env=self.env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        try:
            rp = self.pinlab("replug", "cellg", "--ready-file", "/tmp/pinlab-cell.ready",
                             "--json", timeout=300)
            out, err = hu.communicate(timeout=300)
        finally:
            if hu.poll() is None:
                hu.kill()
                hu.wait()
        self.assertEqual(hu.returncode, 0, err[-2000:])
        rep = self.report(subprocess.CompletedProcess([], 0, out, err))
        self.assertIsNotNone(rep["gone"], rep)
        self.assertEqual(rep["map_g1"], [["g1", 0, 16]], rep)
        self.assertIn("removed", " ".join(json.loads(rp.stdout)["rounds"][0]["dmesg"]))
        self.down(e)

    def test_no_device_and_errors(self) -> None:
        """
        `up --no-device` still puts pinlab.ko (built for the guest's kernel) in the guest;
        replug says why it cannot; a stale registry entry is detected and removed.

        :avocado: tags=guest,workbench,kernel:6.12
        """
        e = self.up("nodev", "--kernel", self.kernel, "--no-device")
        out = self.pinlab("ssh", "nodev", "modinfo -F vermagic /tmp/pinlab.ko && uname -r").stdout
        vermagic, release = out.splitlines()[:2]
        self.assertTrue(vermagic.startswith(release + " "), out)
        r = self.pinlab("replug", "nodev", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no device", r.stderr)
        stale = dict(e, name="ghost", pid=2 ** 22 + 1)
        (self.work / "guests" / "ghost.json").write_text(json.dumps(stale))
        r = self.pinlab("ssh", "ghost", "true", check=False)
        self.assertEqual(r.returncode, 2)
        self.assertIn("stale", r.stderr)
        ps = self.pinlab("ps").stdout
        self.assertRegex(ps, r"(?m)^ghost .*stale")
        self.assertFalse((self.work / "guests" / "ghost.json").exists())
        self.down(e)
