"""The workbench's host side without a guest: the registry of up guests, cell names and
tag filters, the command line's error messages; and the guest API (pinlab.guest:
pinlab_mm, pinlab_kmsg, pinlab_ioctl's checksum), which is standard-library Python that
runs on this host as it does in a guest."""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import subprocess
import sys
import tempfile
import unittest
import zlib
from pathlib import Path
from unittest import mock

from pinlab.device.memory import GuestMemory
from pinlab.device.testclient import GuestRam
from pinlab.guest import pinlab_ioctl, pinlab_kmsg, pinlab_mm
from pinlab.orchestrator import registry
from pinlab.orchestrator.cells import all_cells, parse_cell, select
from pinlab.orchestrator.expectations import Cell
from pinlab.orchestrator.guestenv import guest_config, setup_command
from pinlab.orchestrator.registry import GuestEntry, RegistryError


def entry(d: Path, name: str, pid: int) -> GuestEntry:
    ctl = d / f"{name}.sock"
    ctl.touch()
    return GuestEntry(name=name, pid=pid, kernel="6.12", release="r", ssh_port=1,
                      client_key="k", known_hosts="h", host_key_pub="p", control=str(ctl),
                      qmp_human="q")


class RegistryTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.d = Path(self.tmp.name)
        self.env = mock.patch.dict(os.environ, {"PINLAB_GUESTS_DIR": str(self.d / "g")})
        self.env.start()
        self.dead = subprocess.Popen(["true"])
        self.dead.wait()

    def tearDown(self) -> None:
        self.env.stop()
        self.tmp.cleanup()

    def test_register_resolve_and_unregister(self) -> None:
        with self.assertRaisesRegex(RegistryError, "no guest is up"):
            registry.resolve(None)
        registry.register(entry(self.d, "a", os.getpid()))
        self.assertEqual(registry.resolve(None).name, "a")
        self.assertEqual(registry.resolve("a").pid, os.getpid())
        registry.register(entry(self.d, "b", os.getpid()))
        with self.assertRaisesRegex(RegistryError, "several guests are up, name one: a, b"):
            registry.resolve(None)
        with self.assertRaisesRegex(RegistryError, "no guest named 'c' is up"):
            registry.resolve("c")
        self.assertEqual(registry.free_name("a"), "a-2")
        registry.unregister("a", pid=1)          # not its writer: kept
        self.assertTrue(registry.path_of("a").exists())
        registry.unregister("a", os.getpid())
        self.assertFalse(registry.path_of("a").exists())

    def test_a_live_name_is_not_taken_twice(self) -> None:
        registry.register(entry(self.d, "a", os.getpid()))
        with self.assertRaisesRegex(RegistryError, "already up"):
            registry.register(entry(self.d, "a", self.dead.pid))

    def test_stale_entries_are_detected_and_pruned(self) -> None:
        registry.register(entry(self.d, "gone", self.dead.pid))
        registry.register(entry(self.d, "live", os.getpid()))
        self.assertEqual([(e.name, alive) for e, alive in registry.entries()],
                         [("gone", False), ("live", True)])
        with self.assertRaisesRegex(RegistryError, "stale"):
            registry.resolve("gone")
        self.assertEqual(registry.resolve(None).name, "live")
        self.assertEqual(registry.prune(), ["gone"])
        self.assertEqual([e.name for e, _ in registry.entries()], ["live"])
        # a live process whose control socket is gone is stale too
        Path(registry.resolve("live").control).unlink()
        self.assertEqual(registry.prune(), ["live"])

    def test_bad_names(self) -> None:
        for bad in ("", "../x", "a b", "-x", "x" * 33):
            with self.assertRaises(RegistryError):
                registry.check_name(bad)


class CellNamesTest(unittest.TestCase):
    def test_parse_cell(self) -> None:
        c = Cell("6.12", "longterm", "ext4", "2018")
        self.assertEqual(parse_cell("6.12/longterm/ext4/2018"), c)
        self.assertEqual(parse_cell(
            "tests/matrix/test_cells.py:Kernel6_12.test_longterm__ext4__2018"), c)
        self.assertEqual(parse_cell("Kernel6_1.test_odp__anon__no_ack"),
                         Cell("6.1", "odp", "anon", "no-ack"))
        for bad, msg in (("6.12/odp/xfs/2018", "not a matrix cell"),
                         ("9/pin/anon/fork", "unknown kernel"),
                         ("pin/anon/fork", "KERNEL/MODE/BACKING/EVENT"),
                         ("Kernel6_12.test_pin__anon__nothing", "no matrix cell")):
            with self.assertRaisesRegex(ValueError, msg):
                parse_cell(bad)

    def test_tag_filters_as_avocado(self) -> None:
        cell = [c for c in all_cells("6.12") if c.name == "6.12/pin/ext4/2018"]
        self.assertEqual(select(cell, None), cell)
        self.assertEqual(select(cell, ["mode:pin,backing:ext4"]), cell)
        self.assertEqual(select(cell, ["mode:pin,backing:xfs"]), [])
        self.assertEqual(select(cell, ["mode:odp", "event:2018"]), cell)     # ORed
        # negation as Avocado does it: of plain tags only (this cell is 2018's smoke cell)
        self.assertEqual(select(cell, ["smoke"]), cell)
        self.assertEqual(select(cell, ["event:2018,-smoke"]), [])
        with self.assertRaises(ValueError):
            select(cell, ["mode:pin,"])
        self.assertEqual(len(select(all_cells("6.12"), ["event:2018"])), 8)   # ext4, btrfs
        self.assertEqual(select(all_cells("6.12"), ["event:nosuch"]), [])
        self.assertEqual(len(select(all_cells("6.12"), ["smoke"])),
                         len({c.variant for c in all_cells("6.12")}))


class CommandLineTest(unittest.TestCase):
    """Bad input: a clear message and exit status 2, nothing booted."""

    def pinlab(self, *args: str) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory() as d:
            env = {**os.environ, "PINLAB_GUESTS_DIR": d, "PINLAB_RESULTS": d}
            return subprocess.run([sys.executable, "-m", "pinlab", *args], env=env,
                                  capture_output=True, text=True, timeout=120)

    def test_unknown_kernel(self) -> None:
        r = self.pinlab("up", "--kernel", "foo")
        self.assertEqual(r.returncode, 2)
        self.assertIn("unknown kernel 'foo'; choose one of: 6.12 (Debian 13", r.stderr)
        self.assertNotIn("Traceback", r.stderr)

    def test_kernel_help_lists_versions(self) -> None:
        out = self.pinlab("up", "--help").stdout
        for k in ("6.12 (Debian 13", "6.1 (Debian 12", "7 (Debian 13 trixie-backports"):
            self.assertIn(k, " ".join(out.split()))

    def test_tags_matching_no_cell(self) -> None:
        r = self.pinlab("matrix", "--kernel", "6.12", "--tags", "event:nosuch")
        self.assertEqual(r.returncode, 2)
        self.assertIn("no matrix cell matches", " ".join(r.stdout.split()))
        self.assertNotIn("Test Suite could not be created", r.stdout + r.stderr)

    def test_bad_cell_and_no_guest(self) -> None:
        r = self.pinlab("up", "--cell", "6.12/odp/xfs/2018")
        self.assertEqual(r.returncode, 2)
        self.assertIn("not a matrix cell", r.stderr)
        for cmd in (["ssh"], ["replug"], ["down"], ["run", "x.py"]):
            r = self.pinlab(*cmd)
            self.assertEqual(r.returncode, 2, cmd)
            self.assertIn("no guest", r.stderr)

    def test_html_report_names_the_cell_to_debug(self) -> None:
        from pinlab.orchestrator.matrix import write_html

        v = {"kernel": "6.12", "mode": "pin", "backing": "ext4", "event": "2018",
             "expected": "COHERENT", "observed": "EXT4_WARN_DATA_LOST", "verdict": "mismatch",
             "evidence": {}, "artifacts": "/tmp/x", "source": "s"}
        with tempfile.TemporaryDirectory() as d:
            page = write_html([v], Path(d)).read_text()
        self.assertIn("pinlab up --cell 6.12/pin/ext4/2018", page)
        self.assertIn("✗ expected COHERENT", page)

    def test_matrix_guest_config_is_shared(self) -> None:
        cfg = guest_config()
        self.assertEqual(cfg.device_args, ["--irq", "msi"])
        self.assertEqual(set(cfg.scratch_disks),
                         {"pinlab-ext4", "pinlab-xfs", "pinlab-btrfs", "pinlab-swap"})
        self.assertEqual(guest_config("msix").device_args, ["--irq", "msix"])
        with self.assertRaises(ValueError):
            guest_config("intx")
        self.assertIn("--cell pin/ext4/2018", setup_command(cell="pin/ext4/2018"))

    def test_pmem_ranges_lie_inside_guest_ram(self) -> None:
        """The fsdax pmem ranges (memmap=) sit inside the matrix guest's RAM, below its top
        48 MiB, apart from each other; an ``up --memory`` too small for them drops them."""
        from pinlab.orchestrator.guestenv import MEMORY_MB, PMEM
        from pinlab.orchestrator.workbench import UpOptions, Workbench
        cfg = guest_config()
        self.assertEqual(cfg.memory_mb, MEMORY_MB)
        spans = sorted((start, start + mib) for mib, start in PMEM.values())
        for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False):
            self.assertLess(end, nxt)          # a gap, or e820 merges them
        self.assertLessEqual(spans[-1][1], MEMORY_MB - 48)
        for mib, start in PMEM.values():
            self.assertIn(f"memmap={mib}M!{start}M", cfg.cmdline.split())
        with tempfile.TemporaryDirectory() as d:
            small = Workbench(UpOptions(memory_mb=1024), Path(d)).config()
            default = Workbench(UpOptions(), Path(d)).config()
        self.assertFalse([a for a in small.cmdline.split() if a.startswith("memmap=")])
        self.assertIn("page_poison=1", small.cmdline.split())
        self.assertEqual(default.cmdline, cfg.cmdline)


@unittest.skipUnless(os.geteuid() == 0, "PFNs in pagemap need CAP_SYS_ADMIN")
class GuestApiTest(unittest.TestCase):
    """The guest API on this host's kernel."""

    def test_pagemap_and_madvise(self) -> None:
        buf = mmap.mmap(-1, 8 * pinlab_mm.PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = pinlab_mm.address(buf)
        self.assertEqual(pinlab_mm.pagemap(addr, 8), [None] * 8)
        for off in range(0, len(buf), pinlab_mm.PAGE):
            buf[off] = 1
        pfns = pinlab_mm.pagemap(addr, 8)
        self.assertTrue(all(isinstance(p, int) and p > 0 for p in pfns), pfns)
        d = pinlab_mm.pagemap_detail(addr, 1)[0]
        self.assertTrue(d["present"] and d["exclusive"] and not d["file"], d)
        pinlab_mm.madvise(addr + 4 * pinlab_mm.PAGE, 4 * pinlab_mm.PAGE,
                          pinlab_mm.MADV_DONTNEED)
        after = pinlab_mm.pagemap(addr, 8)
        self.assertEqual(after[:4], pfns[:4])
        self.assertEqual(after[4:], [None] * 4)
        self.assertEqual(pinlab_mm.moved(pfns, after), 4)
        with self.assertRaises(OSError):
            pinlab_mm.madvise(addr + 1, pinlab_mm.PAGE, pinlab_mm.MADV_DONTNEED)
        buf.close()

    def test_smaps(self) -> None:
        buf = mmap.mmap(-1, 16 * pinlab_mm.PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addCleanup(buf.close)
        # its own VM flags, so the kernel cannot merge it with a neighbouring mapping
        buf.madvise(mmap.MADV_DONTFORK)
        addr = pinlab_mm.address(buf)
        buf[:] = b"x" * len(buf)
        s = pinlab_mm.smaps(addr + pinlab_mm.PAGE)
        self.assertEqual((s["start"], s["end"]), (addr, addr + len(buf)))
        self.assertEqual(s["Rss"], len(buf))
        self.assertEqual(pinlab_mm.huge_pages(addr),
                         {"anon": 0, "shmem": 0, "file": 0, "hugetlb": 0})
        with self.assertRaises(LookupError):   # page 0 is never mapped (mmap_min_addr)
            pinlab_mm.smaps(0)

    def test_vmstat_and_pins(self) -> None:
        v = pinlab_mm.vmstat()
        self.assertIn("nr_foll_pin_acquired", v)
        self.assertGreaterEqual(pinlab_mm.pins(v), 0)
        self.assertEqual(pinlab_mm.delta({"a": 1, "b": 2}, {"a": 1, "b": 5}), {"b": 3})

    def test_kmsg_mark(self) -> None:
        m = pinlab_kmsg.mark()
        self.assertEqual(pinlab_kmsg.since(m + 1000), [])
        lines, _ = pinlab_kmsg.read_since(max(0, m - 3))
        self.assertLessEqual(len(lines), 3)
        self.assertEqual(pinlab_kmsg.format_record("6,42,1234567,-;hello\n SUBSYSTEM=x\n"),
                         "[    1.234567] hello")
        self.assertEqual(pinlab_kmsg.record_seq("6,42,1234567,-;hello"), 42)


class ChecksumTest(unittest.TestCase):
    def test_dma_crc32_is_crc32_iso_hdlc(self) -> None:
        # the standard check value of CRC-32 (IEEE 802.3) over "123456789"
        self.assertEqual(pinlab_ioctl.dma_crc32(b"123456789"), 0xCBF43926)
        data = bytes(range(256)) * 64
        self.assertNotEqual(pinlab_ioctl.dma_crc32(data), pinlab_ioctl.dma_crc32(data[1:]))

    def test_engine_folds_the_same_checksum(self) -> None:
        """The device folds zlib.crc32 page by page over guest RAM split across maps
        (GuestMemory.crc32, as engine.crc_in does); the result is dma_crc32 of the bytes."""
        ram = GuestRam(1 << 20)
        mem = GuestMemory()
        try:
            mem.map(0, 512 << 10, 3, 0, ram.dup_fd())
            mem.map(512 << 10, 512 << 10, 3, 512 << 10, ram.dup_fd())
            data = os.urandom(3 * 4096 + 100)
            addr = (512 << 10) - 4096 - 50            # across the two maps
            mem.write(addr, data)
            crc = 0
            for off in range(0, len(data), 4096):     # page by page, as crc_in
                crc = mem.crc32(addr + off, min(4096, len(data) - off), crc, zlib.crc32)
            self.assertEqual(crc, pinlab_ioctl.dma_crc32(data))
            self.assertNotEqual(crc, pinlab_ioctl.dma_crc32(data[:-1] + b"\0"))
        finally:
            mem.unmap_all()
            ram.close()


if __name__ == "__main__":
    with contextlib.redirect_stdout(io.StringIO()):
        unittest.main()
