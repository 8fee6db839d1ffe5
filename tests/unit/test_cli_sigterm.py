"""SIGTERM to a pinlab command runs its clean-up (finally blocks), as Ctrl-C does: a
CI runner or `timeout` that stops `pinlab matrix` must not leave its Avocado jobs, pools
and guests running (pinlab/cli.py terminate_on_sigterm)."""

import signal
import subprocess
import sys
import unittest

CHILD = """
import time
from pinlab.cli import terminate_on_sigterm
terminate_on_sigterm()
try:
    print("ready", flush=True)
    time.sleep(60)
finally:
    print("clean-up ran", flush=True)
"""


class SigtermTest(unittest.TestCase):
    def test_sigterm_runs_finally_blocks(self) -> None:
        p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None
            self.assertEqual(p.stdout.readline().strip(), "ready")
            p.send_signal(signal.SIGTERM)
            out, _ = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.assertIn("clean-up ran", out)
        self.assertEqual(p.returncode, 128 + signal.SIGTERM)


if __name__ == "__main__":
    unittest.main()
