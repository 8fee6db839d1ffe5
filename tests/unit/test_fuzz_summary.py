"""``pinlab fuzz ioctl``: the guest deadline scales with the work; the summary's figures."""

from __future__ import annotations

import unittest

from pinlab.common import jsonlines
from pinlab.orchestrator.fuzz import _json_lines, errors_by_errno, fuzz_budget, summary_text


class FuzzSummaryTest(unittest.TestCase):
    def test_budget_is_linear_in_the_work(self) -> None:
        small, big = fuzz_budget(2000, 4), fuzz_budget(20000, 4)
        self.assertGreater(big, small)
        # linear in operations, not a fixed multiple of the iteration count
        self.assertAlmostEqual(fuzz_budget(4000, 4) - fuzz_budget(2000, 4),
                               fuzz_budget(6000, 4) - fuzz_budget(4000, 4))
        self.assertGreater(fuzz_budget(2000, 8), fuzz_budget(2000, 4))
        self.assertGreater(fuzz_budget(1, 1), 0)

    def test_progress_lines_among_other_stderr(self) -> None:
        sp = jsonlines.Splitter(64)
        sp.feed(b'{"progress": 10, "total": 100, "elapsed": 1.0}\nTraceback (most')
        self.assertEqual(_json_lines(sp), [{"progress": 10, "total": 100, "elapsed": 1.0}])
        sp.feed(b' recent call last):\n[1, 2]\n' + b"x" * 100 + b'\n{"progress": 20}\n{"pro')
        self.assertEqual(_json_lines(sp), [{"progress": 20}])   # text, a list, too long
        sp.feed(b'gress": 30}\n')
        self.assertEqual(_json_lines(sp), [{"progress": 30}])

    def test_errors_by_errno(self) -> None:
        counts = {"raw-EINVAL": 5, "reg-EINVAL": 2, "reg-ok": 9, "write-EFAULT": 1,
                  "raw-py": 3, "race-close": 4, "ftruncate": 2, "raw-ENOTTY": 7}
        self.assertEqual(errors_by_errno(counts),
                         {"EINVAL": 7, "ENOTTY": 7, "py": 3, "EFAULT": 1})

    def test_summary_names_every_figure(self) -> None:
        s = {"done": 8000, "total": 8000, "elapsed": 35.2, "deadline_hit": False,
             "errors_by_errno": {"EINVAL": 12}, "kernel": {"WARN": 1},
             "pins_before": 0, "pins_after": 0, "problems": ["WARN: x"]}
        text = summary_text(s)
        for want in ("8000/8000", "EINVAL 12", "WARN 1", "before 0, after 0", "FAIL",
                     "problem: WARN: x"):
            self.assertIn(want, text)
        s.update(problems=[], kernel={}, deadline_hit=True, done=10)
        text = summary_text(s)
        self.assertIn("stopped at the deadline", text)
        self.assertIn("PASS", text)
        self.assertIn("Oops (pinlab-related): none", text)


if __name__ == "__main__":
    unittest.main()
