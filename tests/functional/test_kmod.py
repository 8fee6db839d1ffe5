"""pinlab.ko at runtime: every mode, odp revoke and its escalation, device death,
device removal and a short ioctl fuzz, many checks per booted guest.

The guest side is guest/kcheck.py (one JSON line per check) and
guest/ioctl_fuzz.py.
"""

from __future__ import annotations

import errno
import json
import time

from pinlab.common.vocab import guest_python
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.guesttest import GuestTest
from pinlab.orchestrator.session import GuestSession, push_guest_files
from pinlab.orchestrator.vm import GuestConfig

MARK_RETURNED = 0x5A5A0001   # guest/kcheck.py: the invalidation has returned
VMSTAT = ("echo 1 > /proc/sys/vm/stat_refresh; "
          "grep -E '^nr_foll_pin_(acquired|released) ' /proc/vmstat")
HOLD = (f"for m in pin odp; do setsid nohup {guest_python('kcheck', 'hold')} $m "
        "> /tmp/hold-$m.out 2>&1 < /dev/null & done; sleep 3; cat /tmp/hold-*.out")


def _outstanding(text: str) -> int:
    v = dict(line.split() for line in text.splitlines() if line.strip())
    return int(v["nr_foll_pin_acquired"]) - int(v["nr_foll_pin_released"])


class KmodTest(GuestTest):
    """:avocado: enable"""

    def kcheck(self, s: GuestSession, args: str, timeout: float = 180) -> list[dict]:
        res = s.guest.ssh.run(f"{guest_python('kcheck')} {args}", timeout=timeout)
        self.log.info("kcheck %s rc=%d\n%s\n%s", args, res.rc, res.out, res.err)
        lines = [json.loads(ln) for ln in res.out.splitlines() if ln.startswith("{")]
        results = [r for r in lines if not r.get("summary")]
        with open(self.artifacts / "kcheck.jsonl", "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        self.assertEqual(res.rc, 0, f"kcheck {args}: {res.err[-2000:]}")
        bad = [r for r in results if not r["ok"]]
        self.assertEqual(bad, [], f"kcheck {args} failed checks")
        self.assertTrue(results, f"kcheck {args} reported nothing")
        return results

    def push(self, s: GuestSession) -> None:
        """The whole guest package (kcheck, ioctl_fuzz), as every session pushes it."""
        push_guest_files(s.guest.ssh)

    def assert_clean_dmesg(self, s: GuestSession) -> None:
        dm = classify(s.guest.dmesg())
        self.assertEqual(dm.severe(), {}, f"kernel complained: {dm.severe()}")

    def assert_no_violations(self, s: GuestSession) -> None:
        v = s.device("query-violations")
        self.assertEqual(v["violations"], [], "device accessed memory after a revoke")

    def everything(self, kernel: str, ext4: str | None = None) -> None:
        """Every check on one freshly booted guest of ``kernel``. ``ext4``: "ok" or "fail",
        what a writable FOLL_LONGTERM pin of a MAP_SHARED ext4 file must do (default: ok
        on 6.1, refused on later kernels, 8ac268436e6d)."""
        ext4 = ext4 or ("ok" if kernel == "6.1" else "fail")
        with GuestSession.boot(kernel, self.artifacts) as s:
            self.remember(s)
            g = s.guest
            self.push(s)
            base = _outstanding(g.ssh.run(VMSTAT, timeout=60, check=True).out)

            # 1. every mode: register, DMA write/read, query, dirty, deregister,
            #    read-only, stream, close with regions, exit while registered
            self.kcheck(s, "modes")
            # longterm on a writable MAP_SHARED ext4 file: refused since 6.2
            self.kcheck(s, f"ext4 {ext4}")
            # 2. odp revoke: DONTNEED, PAGEOUT, munmap, memfd ftruncate, refault
            self.kcheck(s, "odp")
            self.assert_no_violations(s)
            #    slow acknowledgement: still correct, no access after the ack
            s.device("set-fault", delay_revoke_ms=300)
            self.kcheck(s, "odp")
            s.device("clear-fault")
            self.assert_no_violations(s)
            #    escalation: the fence never completes -> reset, region failed
            g.ssh.run("echo 1500 > /sys/module/pinlab/parameters/fence_timeout_ms",
                      check=True, timeout=30)
            s.device("set-fault", never_ack_revoke=True)
            t0 = time.monotonic()
            self.kcheck(s, "escalate")
            self.assertLess(time.monotonic() - t0, 60)
            s.device("clear-fault")
            self.kcheck(s, "after-reset")
            self.assert_no_violations(s)
            stats = g.ssh.run("cat /sys/kernel/debug/pinlab/pinlab0/stats", timeout=30,
                              check=True).out
            (self.artifacts / "debugfs-stats.txt").write_text(stats)
            st = dict(line.split(None, 1) for line in stats.splitlines() if " " in line)
            self.assertGreaterEqual(int(st["escalations"]), 1)
            self.assertGreaterEqual(int(st["revokes"]), 1)
            self.assertTrue(any(k.startswith("revoke_latency_us_lt_") for k in st), st)
            self.assertGreaterEqual(int(st["invalidations_clear"]), 1)   # DONTNEED
            self.assertGreaterEqual(int(st["invalidations_unmap"]), 1)   # munmap
            self.assertEqual(int(st["pins_held"]), 0)
            self.assertEqual(int(st["odp_mapped"]), 0)

            # 4. short fuzz
            fz = g.ssh.run(guest_python("ioctl_fuzz", "--iterations", "600"), timeout=300)
            self.log.info("fuzz: %s %s", fz.out, fz.err[-2000:])
            self.assertEqual(fz.rc, 0, fz.err[-2000:])
            self.assertEqual(_outstanding(g.ssh.run(VMSTAT, timeout=60, check=True).out),
                             base, "pins leaked")
            self.assert_clean_dmesg(s)

            # 3. device server dies under registered, streaming regions
            g.ssh.run(HOLD, timeout=60, check=True)
            assert g.device is not None
            g.device.proc.kill()
            out = g.ssh.run("touch /tmp/go; sleep 5; cat /tmp/hold-*.out; "
                            "pgrep -f 'kcheck.py hold' || true", timeout=90).out
            self.log.info("after device death:\n%s", out)
            removed = [json.loads(ln) for ln in out.splitlines()
                       if ln.startswith('{"check": "removed"')]
            self.assertEqual(len(removed), 2, out)
            self.assertTrue(all(r["ok"] for r in removed), removed)
            self.assertEqual(_outstanding(g.ssh.run(VMSTAT, timeout=60, check=True).out),
                             base, "pins leaked after device death")
            rm = g.ssh.run("rmmod pinlab", timeout=60)
            self.assertEqual(rm.rc, 0, rm.err)
            self.assert_clean_dmesg(s)

    def test_full_queue_invalidation(self) -> None:
        """
        An odp invalidation while every command slot is taken must not return before
        the device stopped: the driver resets the function when no slot frees within
        the fence timeout. The device drops its interrupts (so no command completes
        from the driver's view), 255 FENCE commands fill the slots, MADV_DONTNEED of a
        streaming odp region runs the notifier, and right after madvise returns the
        guest writes a marker into the device's audit log (debugfs ``mark``, SCRATCH).
        No access to the region may follow that marker.

        :avocado: tags=guest,kernel:6.12,mode:odp,kmod
        """
        with GuestSession.boot("6.12", self.artifacts) as s:
            self.remember(s)
            g = s.guest
            self.push(s)
            g.ssh.run("echo 60000 > /sys/module/pinlab/parameters/cmd_timeout_ms; "
                      "echo 1500 > /sys/module/pinlab/parameters/fence_timeout_ms",
                      check=True, timeout=30)
            s.mark()
            g.ssh.run("rm -f /tmp/go-full; setsid nohup "
                      f"{guest_python('kcheck', 'full-queue')} > /tmp/fq.out 2>&1 < /dev/null &",
                      check=True, timeout=30)
            self.wait_output(g, "/tmp/fq.out", '"ready"', 60)
            s.device("set-fault", **{"drop-irq": True})
            try:
                g.ssh.run("touch /tmp/go-full", check=True, timeout=30)
                out = self.wait_output(g, "/tmp/fq.out", '"summary"', 240)
            finally:
                s.device("clear-fault", names=["drop-irq"])
            (self.artifacts / "full-queue.out").write_text(out)
            res = [json.loads(ln) for ln in out.splitlines()
                   if ln.startswith('{"check": "full-queue"')]
            self.assertEqual(len(res), 1, out)
            r = res[0]
            self.assertGreaterEqual(r["filled"], 255, "the command slots were not all taken")
            records: list[dict] = []
            while True:   # the device answers at most 100000 records a query
                page = s.audit(since=records[-1]["seq"] if records else s.audit_since,
                               limit=100_000)
                records += page
                if len(page) < 100_000:
                    break
            with open(self.artifacts / "full-queue-audit.jsonl", "w") as f:
                for rec in records:
                    f.write(json.dumps(rec) + "\n")
            rid = r["region"]
            inst = [x["inst"] for x in records if x["kind"] == "create" and x["region"] == rid]
            self.assertTrue(inst, "the audit has no create record for the region")
            marks = [x["seq"] for x in records
                     if x["kind"] == "scratch" and x.get("value") == MARK_RETURNED]
            self.assertEqual(len(marks), 1, "the guest's marker is not in the audit log")
            mine = [x for x in records if x["kind"] == "access"
                    and x.get("region") == rid and x.get("inst") == inst[-1]]
            before = [x for x in mine if x["seq"] < marks[0]]
            after = [x for x in mine if x["seq"] > marks[0]]
            self.assertTrue(before, "the region was never streamed into")
            self.assertEqual(after[:5], [], f"{len(after)} accesses after the notifier "
                             "returned")
            resets = [x for x in records if x["kind"] == "reset" and x["seq"] < marks[0]]
            self.assertTrue(resets, "no reset reached the device before the notifier returned")
            self.assertIn(errno.ECANCELED, r["fence_errnos"], r)
            dm = g.dmesg()
            self.assertIn("no command slot", dm)

    def wait_output(self, g, path: str, needle: str, timeout: float) -> str:
        """The guest file ``path`` once it contains ``needle`` (polled; AssertionError
        with its contents after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = g.ssh.run(f"cat {path}", timeout=30).out
            if needle in out:
                return out
            time.sleep(0.5)
        self.fail(f"{path} never showed {needle} within {timeout} s: {out[-2000:]}")

    def test_kernel_6_12(self) -> None:
        """
        :avocado: tags=guest,kernel:6.12,mode:gup,mode:pin,mode:longterm,mode:odp,kmod
        """
        self.everything("6.12")

    def test_kernel_6_1(self) -> None:
        """
        :avocado: tags=guest,kernel:6.1,mode:gup,mode:pin,mode:longterm,mode:odp,kmod,smoke
        """
        self.everything("6.1")

    def test_kernel_7(self) -> None:
        """
        :avocado: tags=guest,kernel:7,mode:gup,mode:pin,mode:longterm,mode:odp,kmod,smoke
        """
        self.everything("7")

    def test_built_kernel(self) -> None:
        """
        Everything above on a kernel pinlab built (``pinlab kernel build``): ``-p
        kernel=build:<key>``, by default the newest built kernel in the cache (cancelled
        when there is none). ``-p ext4=ok`` for a kernel that lets writable FOLL_LONGTERM
        pins of a MAP_SHARED ext4 file through again (Debian's 6.12 source with
        tests/data/patches/6.12-gup-allow-longterm-file-pins.patch); the default, ``fail``,
        is what 6.5 and later do.

        :avocado: tags=guest,kbuild,kmod
        """
        from pinlab.images import kbuild
        from pinlab.images.cache import Cache

        kid = self.params.get("kernel", default=None)
        if not kid or not kbuild.is_kernel_id(kid):
            kid = kbuild.newest_built(Cache.default())
        if kid is None:
            self.cancel("no built kernel in the cache")
        ext4 = self.params.get("ext4", default="fail")
        self.assertIn(ext4, ("ok", "fail"), "-p ext4=ok|fail")
        self.log.info("kernel %s, ext4 %s", kid, ext4)
        self.everything(kid, ext4)

    def test_device_del(self) -> None:
        """
        device_del over QMP while regions are registered and streaming.

        The device runs with MSI: QEMU 11.1's vfio-user-pci aborts on device_del of an
        MSI-X device (tests/unit/test_device_qemu.py QemuHotUnplugTest shows both).

        :avocado: tags=guest,kernel:6.12,mode:pin,mode:odp,kmod,event:hot-unplug
        """
        cfg = GuestConfig(device_args=["--irq", "msi"])
        with GuestSession.boot("6.12", self.artifacts, config=cfg) as s:
            self.remember(s)
            g = s.guest
            self.push(s)
            g.ssh.run(HOLD, timeout=60, check=True)
            g.qmp.cmd("device_del", id="pinlab0")
            time.sleep(5)
            self.assertIsNone(g.dead(), "QEMU or the device died on device_del")
            out = g.ssh.run("touch /tmp/go; sleep 4; cat /tmp/hold-*.out", timeout=60).out
            removed = [json.loads(ln) for ln in out.splitlines()
                       if ln.startswith('{"check": "removed"')]
            self.assertEqual(len(removed), 2, out)
            rm = g.ssh.run("rmmod pinlab", timeout=60)
            self.assertEqual(rm.rc, 0, rm.err)
            self.assert_clean_dmesg(s)


