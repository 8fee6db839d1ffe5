"""The guest agent (guest/pinlab_agent.py), run here on the host: it is standard
library Python, and its protocol is JSON lines on stdin/stdout."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import unittest
import uuid
from typing import Any


class AgentTest(unittest.TestCase):
    def setUp(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pinlab.guest.pinlab_agent"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.ready = self._line()

    def tearDown(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        self.assertTrue(line, "agent closed its output")
        obj = json.loads(line)
        self.assertIsInstance(obj, dict)
        return obj

    def send_raw(self, data: bytes) -> dict[str, Any]:
        assert self.proc.stdin
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        return self._line()

    def req(self, op: str, **args: Any) -> dict[str, Any]:
        return self.send_raw(json.dumps({"op": op, "id": 7, **args}).encode() + b"\n")

    def test_ready_and_ping(self) -> None:
        self.assertTrue(self.ready["ready"])
        r = self.req("ping")
        self.assertEqual(r["id"], 7)
        self.assertEqual(r["pid"], self.proc.pid)

    def test_bad_requests_get_errors_and_the_agent_goes_on(self) -> None:
        self.assertIn("error", self.send_raw(b"{not json\n"))
        self.assertIn("error", self.send_raw(b"[1, 2]\n"))
        self.assertIn("unknown op", self.req("frobnicate")["error"])
        self.assertIn("error", self.req("dmesg-since", mark=12345))
        self.assertIn("error", self.req("run"))            # no argv
        self.assertTrue(self.req("ping")["ok"])

    def test_oversize_request_is_refused_and_skipped(self) -> None:
        big = b'{"op": "ping", "pad": "' + b"x" * (1 << 20) + b'"}\n'
        r = self.send_raw(big)
        self.assertIn("longer than", r["error"])
        self.assertIsNone(r["id"])
        self.assertEqual(self.req("ping")["id"], 7)         # the stream is usable again

    def test_eof_mid_request_ends_the_agent(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(b'{"op": "pi')
        self.proc.stdin.close()
        self.assertEqual(self.proc.wait(timeout=10), 0)

    def test_run_forks_a_reporting_child(self) -> None:
        r = self.req("run", argv=["--device", "/nonexistent", "info"], timeout=60)
        self.assertNotIn("error", r)
        self.assertEqual(r["exit"], 0)
        self.assertNotEqual(r["pid"], self.proc.pid)
        self.assertIs(r["report"]["device"], False)
        self.assertIn("vmstat", r["report"])

    def test_start_answers_at_once_and_wait_gets_the_report(self) -> None:
        job = self.req("start", argv=["--device", "/nonexistent", "info"], timeout=60)
        self.assertNotIn("error", job)
        self.assertNotEqual(job["pid"], self.proc.pid)
        self.assertTrue(self.req("ping")["ok"])          # the agent serves meanwhile
        r = self.req("wait", job=job["job"], until="done")
        self.assertEqual(r["exit"], 0)
        self.assertEqual(r["pid"], job["pid"])
        self.assertIsNone(r["ready_ms"])
        self.assertIs(r["report"]["device"], False)
        self.assertIn("unknown job", self.req("wait", job=job["job"])["error"])

    def test_wait_ready_for_a_job_that_ends_first_gives_its_report(self) -> None:
        # a cell that cannot open its device ends before notify_ready()
        job = self.req("start", argv=["cell", "--mode", "pin", "--backing", "anon",
                                      "--event", "hot-unplug", "--device", "/nonexistent"],
                       timeout=60)
        r = self.req("wait", job=job["job"], until="ready", timeout=30)
        self.assertNotIn("ready", r)
        self.assertIsInstance(r["report"], dict)
        self.assertIsNone(r["ready_ms"])

    def test_jobs_are_bounded(self) -> None:
        jobs = [self.req("start", argv=["--device", "/nonexistent", "info"], timeout=60)
                for _ in range(4)]
        self.assertIn("jobs already started", self.req("start", argv=["info"])["error"])
        for j in jobs:
            self.assertEqual(self.req("wait", job=j["job"])["exit"], 0)

    def test_write_read_listdir(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "f")
            with open(path, "w"):
                pass
            r = self.req("write", path=path, text="online_movable", wait_for=path)
            self.assertTrue(r["ok"])
            self.assertEqual(self.req("read", path=path)["text"], "online_movable")
            self.assertEqual(self.req("listdir", path=d)["names"], ["f"])
            r = self.req("write", path=os.path.join(d, "none", "x"), text="1")
            self.assertEqual(r["errno"], errno.ENOENT)
            r = self.req("write", path=path, text="1", wait_for=path + ".never",
                         wait_timeout=0.2)
            self.assertIn("after writing", r["error"])

    def test_run_with_bad_arguments_reports_them(self) -> None:
        r = self.req("run", argv=["cell", "--mode", "nonsense"], timeout=60)
        self.assertIn("bad workload arguments", r["report"]["error"])
        self.assertIn("invalid choice", r["output"])   # argparse's message, not on our stdout
        self.assertTrue(self.req("ping")["ok"])

    def test_reload_of_a_missing_module_fails_cleanly(self) -> None:
        r = self.req("reload", name="pinlab_no_such_module", module="/nonexistent/x.ko")
        self.assertIn("error", r)
        self.assertTrue(self.req("ping")["ok"])

    @unittest.skipUnless(os.access("/dev/kmsg", os.R_OK | os.W_OK), "needs /dev/kmsg (root)")
    def test_dmesg_since_a_mark(self) -> None:
        before = f"pinlab-agent-test before {uuid.uuid4()}"
        after = f"pinlab-agent-test after {uuid.uuid4()}"
        with open("/dev/kmsg", "w") as k:
            k.write(before + "\n")
        mark = self.req("dmesg-mark")["mark"]
        with open("/dev/kmsg", "w") as k:
            k.write(after + "\n")
        text = self.req("dmesg-since", mark=mark)["text"]
        self.assertIn(after, text)
        self.assertNotIn(before, text)
        self.assertRegex(text.splitlines()[0], r"^\[ *\d+\.\d{6}\] ")
        self.assertIn("error", self.req("dmesg-since", mark=mark))   # a mark is used once

    @unittest.skipUnless(os.access("/dev/kmsg", os.R_OK), "needs /dev/kmsg (root)")
    def test_unread_marks_are_dropped(self) -> None:
        marks = [self.req("dmesg-mark")["mark"] for _ in range(12)]
        self.assertIn("unknown dmesg mark", self.req("dmesg-since", mark=marks[0])["error"])
        self.assertIn("text", self.req("dmesg-since", mark=marks[-1]))
        fds = os.listdir(f"/proc/{self.proc.pid}/fd")
        self.assertLess(len(fds), 20, f"the agent keeps {len(fds)} fds open")

    def test_exit(self) -> None:
        self.assertTrue(self.req("exit")["ok"])
        self.assertEqual(self.proc.wait(timeout=10), 0)


if __name__ == "__main__":
    unittest.main()
