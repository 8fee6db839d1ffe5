"""pinlab bisect's decisions that need no kernel build: the step status for git bisect
run, the cell argument, and input it refuses before building anything."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

from pinlab.images.ksource import GIT_IDENTITY
from pinlab.orchestrator import bisect


class StepStatus(unittest.TestCase):
    def test_statuses(self) -> None:
        good = "PIN_REFUSED(EFAULT)"
        self.assertEqual(bisect.step_status(good, good), 0)
        self.assertEqual(bisect.step_status("WRITES_LOST_SILENTLY", good), 1)
        self.assertEqual(bisect.step_status("KERNEL_ERROR", good), 1)
        self.assertEqual(bisect.step_status("ERROR", good), 125)   # infrastructure

    def test_cells(self) -> None:
        self.assertEqual(bisect.parse_cell("longterm/ext4/truncate"),
                         ("longterm", "ext4", "truncate"))
        self.assertEqual(bisect.parse_cell("6.12/longterm/ext4/truncate"),
                         ("longterm", "ext4", "truncate"))
        for bad in ("longterm/ext4", "a//b", ""):
            with self.assertRaises(ValueError):
                bisect.parse_cell(bad)


class BadInput(unittest.TestCase):
    def test_unknown_revision_is_exit_2_before_any_build(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="pinlab-bisect-"))
        try:
            env = {**os.environ, **GIT_IDENTITY}
            subprocess.run(["git", "init", "-q", str(tmp)], check=True, env=env)
            (tmp / "Makefile").write_text("all:\n")
            subprocess.run(["git", "-C", str(tmp), "add", "."], check=True, env=env)
            subprocess.run(["git", "-C", str(tmp), "commit", "-qm", "one"], check=True, env=env)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = bisect.bisect(tmp, "HEAD", "no-such-rev", ("pin", "anon", "dma-write"))
            self.assertEqual(rc, 2)
            self.assertIn("unknown revision 'no-such-rev'", err.getvalue())
        finally:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    unittest.main()
