"""Unit tests for the orchestrator and image layers that need no guest."""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

from pinlab.images.cache import Cache, digest
from pinlab.images.cpio import Newc
from pinlab.images.kernel import _module_order
from pinlab.orchestrator.console import Console
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.procs import Child, process_alive, wait_for

WARN_TRACE = """\
[   12.345678] ------------[ cut here ]------------
[   12.345679] WARNING: CPU: 1 PID: 321 at fs/ext4/inode.c:3934 ext4_dirty_folio+0x4b/0x60 [ext4]
[12.3457] EXT4-fs warning (device vdc): ext4_dirty_folio:3936: page 0 does not have buffers attached
[   13.000000] pinlab 0000:00:04.0: region 3 registered (longterm, 16 pages)
[   14.000000] INFO: task python3:400 blocked for more than 120 seconds.
"""


class DmesgTest(unittest.TestCase):
    def test_classes(self) -> None:
        rep = classify(WARN_TRACE)
        self.assertEqual(rep.classes(), {"WARN", "EXT4_NO_BUFFERS", "HUNG_TASK"})
        self.assertEqual(set(rep.severe()), {"WARN", "HUNG_TASK"})
        self.assertEqual(len(rep.pinlab_lines), 1)

    def test_clean_log(self) -> None:
        rep = classify("[    0.000000] Linux version 6.12.117+deb13-amd64\n")
        self.assertEqual(rep.classes(), set())
        self.assertEqual(rep.summary(), {})

    def test_oops_and_bug(self) -> None:
        rep = classify("[1.0] BUG: kernel NULL pointer dereference, address: 0\n"
                       "[1.1] Oops: 0002 [#1] PREEMPT SMP NOPTI\n"
                       "[1.2] BUG: Bad page state in process x  pfn:1234\n")
        self.assertEqual(rep.classes(), {"BUG", "OOPS", "BAD_PAGE"})


class CpioTest(unittest.TestCase):
    def test_kernel_format_roundtrip(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            c = Newc()
            c.dir("bin")
            c.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
            c.symlink("sh", "bin/hello")
            c.file("odd", b"x" * 5)
            out = Path(d, "i.cpio.gz")
            c.write(out)
            raw = gzip.decompress(out.read_bytes())
            self.assertTrue(raw.startswith(b"070701"))
            self.assertIn(b"TRAILER!!!", raw)
            if subprocess.run(["which", "cpio"], capture_output=True).returncode == 0:
                listing = subprocess.run(["cpio", "-it"], input=raw, capture_output=True,
                                         check=True).stdout.decode().split()
                self.assertEqual(listing, ["bin", "bin/hello", "sh", "odd"])


class ModuleOrderTest(unittest.TestCase):
    def test_dependencies_first(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            Path(d, "modules.dep").write_text(
                "kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz "
                "kernel/lib/crc16.ko.xz\n"
                "kernel/fs/jbd2/jbd2.ko.xz:\nkernel/fs/mbcache.ko.xz:\nkernel/lib/crc16.ko.xz:\n"
                "kernel/drivers/block/virtio_blk.ko.xz:\n")
            order = _module_order(Path(d), ["virtio_blk", "ext4", "crc32c_generic"])
            self.assertEqual(order[0], "kernel/drivers/block/virtio_blk.ko.xz")
            self.assertEqual(order[-1], "kernel/fs/ext4/ext4.ko.xz")
            self.assertEqual(len(order), 5)  # crc32c_generic absent: built in


class CacheTest(unittest.TestCase):
    def test_manifest(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            c = Cache(Path(d))
            out = Path(d, "thing")
            k = digest("recipe", 1, b"x")
            self.assertFalse(c.fresh("thing", k, [out]))
            out.write_text("built")
            c.record("thing", k, note="n")
            self.assertTrue(c.fresh("thing", k, [out]))
            self.assertFalse(c.fresh("thing", digest("recipe", 2), [out]))
            out.unlink()
            self.assertFalse(c.fresh("thing", k, [out]))

    def test_digest_of_directory_changes_with_content(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            Path(d, "a.c").write_text("int x;")
            k1 = digest(Path(d))
            Path(d, "a.c").write_text("int y;")
            self.assertNotEqual(k1, digest(Path(d)))


class ProcsTest(unittest.TestCase):
    def test_stop_kills_the_whole_group(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            # a parent that ignores SIGTERM and has a child of its own
            script = ("import os, signal, subprocess, time\n"
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "p = subprocess.Popen(['sleep', '300'])\n"
                      "print('GRANDCHILD', p.pid, flush=True)\n"
                      "time.sleep(300)\n")
            c = Child("t", [sys.executable, "-c", script], Path(d, "log"))
            log = Path(d, "log")
            wait_for(lambda: "GRANDCHILD " in log.read_text(), 10, what="grandchild pid")
            grandchild = int(log.read_text().split("GRANDCHILD ")[-1].split()[0])
            t0 = time.monotonic()
            c.stop(grace=0.5)
            self.assertLess(time.monotonic() - t0, 10)
            self.assertFalse(c.alive())
            wait_for(lambda: not process_alive(grandchild), 5, what="grandchild to die")

    def test_wait_for_deadline_and_abort(self) -> None:
        with self.assertRaises(TimeoutError):
            wait_for(lambda: False, 0.2, what="never")
        with self.assertRaisesRegex(RuntimeError, "gone"):
            wait_for(lambda: False, 5, what="x", abort=lambda: "gone")


class ConsoleTest(unittest.TestCase):
    def test_ready_and_fatal(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            con = Console(Path(d, "console.log"))
            self.assertIsNone(con.ready_line())
            con.path.write_text("boot\npinlab-init: PINLAB-READY uptime_ms=4000\n")
            self.assertIn("uptime_ms=4000", con.ready_line() or "")
            self.assertIsNone(con.fatal())
            con.path.write_text("x\nKernel panic - not syncing: VFS: Unable to mount root\n")
            self.assertIn("Kernel panic", con.fatal() or "")


if __name__ == "__main__":
    unittest.main()
