"""The device process's scheduling (device/sched.py) and what it must not change: every
thread that may hold the interpreter lock runs SCHED_FIFO, the compiled stream loop runs
at normal priority, and revokes that race with streams in that process still leave no
access after an acknowledgement (the audit log and its file). Skipped where real-time
scheduling is not permitted."""

from __future__ import annotations

import contextlib
import json
import os
import time
import unittest

from pinlab.bench.device import ProcessRig
from pinlab.device import engine as E

KiB = 1024
REVOKES = 60  # per chunk size (the audit file stays far below its 512 MiB bound)


def realtime_permitted() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


def policies(pid: int) -> dict[int, int]:
    """Thread id -> scheduling policy of every thread of process ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # the thread exited meanwhile
            out[int(tid)] = os.sched_getscheduler(int(tid))
    return out


@unittest.skipUnless(realtime_permitted(), "real-time scheduling not permitted")
class DeviceSchedTest(unittest.TestCase):
    def setUp(self) -> None:
        self.rig = ProcessRig(64 << 20, audit=True)
        self.addCleanup(self.rig.close)
        self.rig.wait_ready()
        self.d = self.rig.driver
        self.npages = 1024
        self.assertEqual(self.d.cmd(E.OP_CREATE_REGION, 1, self.npages, 1).status, E.OK)
        self.pages = self.rig.pages(self.npages)
        self.assertEqual(self.rig.map_pages(1, 0, self.pages).status, E.OK)

    def test_every_thread_realtime_stream_loop_normal(self) -> None:
        pid = self.rig.proc.pid
        sched = self.rig.query("query-status")["engine"]["scheduling"]
        self.assertTrue(sched["realtime"])
        threads = sched["threads"]
        self.assertLessEqual({"MainThread", "engine", "engine-fetch", "vfio-user",
                              "qmp-accept", "qmp-reader", "qmp-writer"}, set(threads))
        self.assertTrue(all(t["realtime"] for t in threads.values()), sched)
        # (the query's own qmp-reader/writer end with its connection)
        idle = {t["tid"] for n, t in threads.items() if not n.startswith("qmp-")}
        now = policies(pid)
        self.assertEqual({now.get(t) for t in idle}, {os.SCHED_FIFO}, (threads, now))
        comp = self.d.cmd(E.OP_STREAM_START, 1, 0, self.npages * 4096, 1, 64 * KiB, 0)
        self.assertEqual(comp.status, E.OK)
        seen: dict[int, set[int]] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for tid, pol in policies(pid).items():
                seen.setdefault(tid, set()).add(pol)
            new = [t for t in seen if t not in now]
            if new and os.SCHED_OTHER in seen[new[0]] and os.SCHED_FIFO in seen[new[0]]:
                break
            time.sleep(0.0005)
        stream_tids = [t for t in seen if t not in idle and t not in now]
        self.assertEqual(len(stream_tids), 1, seen)
        # the stream thread: normal priority in its compiled loop, real-time outside it
        self.assertEqual(seen[stream_tids[0]], {os.SCHED_OTHER, os.SCHED_FIFO})
        # every other thread stayed real-time throughout
        self.assertEqual({p for t, s in seen.items() if t in idle for p in s},
                         {os.SCHED_FIFO})
        self.assertGreater(self.d.cmd(E.OP_STREAM_STOP, 1).result0, 10)

    def test_python_path_stream_runs_at_normal_priority(self) -> None:
        """A stream whose chunks go through the Python path with no interval (64 KiB
        chunks over guest-physically scattered pages) would keep a CPU busy at real-time
        priority: its thread runs at normal priority once its first chunk is written."""
        self.assertEqual(self.d.cmd(E.OP_CREATE_REGION, 2, 64, 1).status, E.OK)
        pages = self.rig.pages(64)[::-1]  # descending: no two pages contiguous
        self.assertEqual(self.rig.map_pages(2, 0, pages).status, E.OK)
        comp = self.d.cmd(E.OP_STREAM_START, 2, 0, 64 * 4096, 1, 64 * KiB, 0)
        self.assertEqual(comp.status, E.OK)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            streams = self.rig.query("query-status")["streams"]
            if streams and streams[0]["chunks"] >= 10:
                break
            time.sleep(0.01)
        threads = self.rig.query("query-status")["engine"]["scheduling"]["threads"]
        tid = threads["stream-2"]["tid"]
        samples = []
        for _ in range(200):
            samples.append(os.sched_getscheduler(tid))
            time.sleep(0.001)
        self.assertEqual(set(samples), {os.SCHED_OTHER})
        self.assertGreater(self.d.cmd(E.OP_STREAM_STOP, 2).result0, 10)

    def test_revokes_race_realtime_streams(self) -> None:
        """Revokes into 64 KiB and 1 MiB chunks of a stream whose compiled loop runs at
        normal priority and is boosted by the fence: no access after an acknowledgement,
        in the device's audit and in its file (formatted by the compiled formatter)."""
        for chunk in (64 * KiB, 1 << 20):
            comp = self.d.cmd(E.OP_STREAM_START, 1, 0, self.npages * 4096, 1, chunk, 0)
            self.assertEqual(comp.status, E.OK)
            time.sleep(0.05)
            for i in range(REVOKES):
                first = (i * 37) % (self.npages - 16)
                comp = self.d.cmd(E.OP_INVALIDATE, 1, first, 16)
                self.assertEqual((comp.status, comp.result0), (E.OK, 16))
                comp = self.rig.map_pages(1, first, self.pages[first:first + 16])
                self.assertEqual(comp.status, E.OK)
                self.d.events()
            self.assertGreater(self.d.cmd(E.OP_STREAM_STOP, 1).result0, 10)
        self.assertEqual(self.rig.violations(), 0)
        self.rig.stop()  # the device flushes its audit file
        revoked: set[int] = set()
        acks = accesses = 0
        seq = 0
        with open(self.rig.audit) as f:
            for line in f:
                # access lines (millions) by their fixed layout, the others as JSON
                if line.startswith('{"kind":"access"'):
                    page = int(line.split('"page":', 1)[1].split(",", 1)[0])
                    accesses += 1
                    self.assertNotIn(page, revoked, line)
                    seq += 1
                    self.assertIn(f'"seq":{seq},', line)
                    continue
                rec = json.loads(line)
                seq += 1
                self.assertEqual(rec["seq"], seq)  # complete, in order, never truncated
                if rec["kind"] == "invalidate_ack":
                    acks += 1
                    revoked |= set(range(rec["first"], rec["first"] + rec["count"]))
                elif rec["kind"] == "map":
                    revoked -= set(range(rec["first"], rec["first"] + rec["count"]))
                self.assertNotIn(rec["kind"], ("violation", "truncated"), rec)
        self.assertEqual(acks, 2 * REVOKES)
        self.assertGreater(accesses, 1000)

    def test_write_after_revoke_is_caught(self) -> None:
        """The check above can fail: with the device's injected stale write after the
        acknowledgement, the audit reports a violation."""
        comp = self.d.cmd(E.OP_STREAM_START, 1, 0, self.npages * 4096, 1, 64 * KiB, 0)
        self.assertEqual(comp.status, E.OK)
        self.rig.query("set-fault", {"write-after-revoke": True})
        comp = self.d.cmd(E.OP_INVALIDATE, 1, 0, 16)
        self.assertEqual(comp.status, E.OK)
        deadline = time.monotonic() + 10
        while not self.rig.violations() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertGreater(self.rig.violations(), 0)
        self.d.cmd(E.OP_STREAM_STOP, 1)


if __name__ == "__main__":
    unittest.main()
