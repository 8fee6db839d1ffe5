"""Running Avocado jobs at most ``limit`` at a time: every job runs, in waves, and each
job's environment reaches its tests."""

from __future__ import annotations

import json
import tempfile
import threading
import unittest
from pathlib import Path

from pinlab.orchestrator.avocadojob import Job, run_concurrently

# a quick real Avocado test whose outcome depends on the job's environment; written at run
# time so that a run of tests/unit does not collect it by itself
PROBE = '''
import os
from pathlib import Path

from avocado import Test


class EnvProbe(Test):
    def test(self):
        value = os.environ.get("PINLAB_ENVPROBE")
        if value is None:
            self.fail("PINLAB_ENVPROBE did not reach the test")
        (Path(self.logdir) / "envprobe.txt").write_text(value)
'''


class RunConcurrentlyTest(unittest.TestCase):
    def test_waves_run_every_job_with_its_env(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            probe = Path(d) / "envprobe.py"
            probe.write_text(PROBE)
            jobs = [Job(f"job {i}", Path(d) / f"job-{i}", [str(probe)],
                        env={"PINLAB_ENVPROBE": str(i)}) for i in range(3)]
            t = threading.Thread(target=run_concurrently, args=(jobs,),
                                 kwargs={"poll": 0.2, "limit": 2}, daemon=True)
            t.start()
            t.join(timeout=600)    # a deadline that means a hang, not a performance bound
            self.assertFalse(t.is_alive(), "run_concurrently did not return")
            for i, job in enumerate(jobs):
                self.assertEqual(job.rc, 0, f"{job.name}: exit {job.rc}; log {job.log}")
                found = job.results()
                self.assertIsNotNone(found, job.name)
                res = json.loads(found.read_text())
                self.assertEqual(res["pass"], 1, job.name)
                seen = Path(res["tests"][0]["logdir"]) / "envprobe.txt"
                self.assertEqual(seen.read_text(), str(i))


if __name__ == "__main__":
    unittest.main()
