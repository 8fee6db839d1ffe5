"""common/vocab.py is the one vocabulary of host and guest: its outcome classes are the
expectations header's, its modes the driver's, and the cell report's keys are written and
read through it, never as bare strings."""

from __future__ import annotations

import ast
import re
import unittest
from pathlib import Path

from pinlab.common import vocab
from pinlab.guest import pinlab_ioctl

ROOT = Path(__file__).resolve().parents[2]
# the code that writes the cell report and the code that reads it
REPORT_WRITERS = ("guest/pinlab_cell.py", "guest/pinlab_dax.py", "guest/pinlab_thp.py",
                  *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "guest/events").glob("*.py")))
REPORT_READERS = ("orchestrator/classify.py", "orchestrator/scenario.py",
                  *sorted(str(p.relative_to(ROOT))
                          for p in (ROOT / "orchestrator/events").glob("*.py")))
BARE = re.compile(r"\b(?:self\.rep|rep|st|child)(?:\.get\(|\[)\"")


def key_uses(path: Path) -> set[str]:
    return {n.attr for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "Key"}


class VocabTest(unittest.TestCase):
    def test_outcome_classes_are_the_expectations_header(self) -> None:
        text = (ROOT / "orchestrator/data/expectations.toml").read_text()
        header = text[:text.index("\n[[rule]]")]
        documented = re.findall(r"^#   ([A-Z][A-Z0-9_]+)", header, flags=re.M)
        self.assertEqual(sorted(documented), sorted(vocab.OUTCOME_CLASSES))
        for name in vocab.OUTCOME_CLASSES:
            self.assertEqual(getattr(vocab.Outcome, name), name)

    def test_modes_are_the_drivers(self) -> None:
        self.assertEqual(tuple(pinlab_ioctl.MODES), vocab.MODES)
        self.assertEqual(set(vocab.BACKINGS), {"anon", "private-file", *vocab.FILE_SHARED,
                                               *vocab.DAX_BACKINGS, *vocab.THP_BACKINGS})

    def test_report_keys_are_names_on_both_sides(self) -> None:
        for rel in REPORT_WRITERS + REPORT_READERS:
            bare = [ln.strip() for ln in (ROOT / rel).read_text().splitlines()
                    if BARE.search(ln)]
            self.assertEqual(bare, [], f"{rel} uses bare report keys")
        keys = {k for k in vars(vocab.Key) if k.isupper()}
        written = set().union(*(key_uses(ROOT / r) for r in REPORT_WRITERS))
        read = set().union(*(key_uses(ROOT / r) for r in REPORT_READERS))
        self.assertEqual(read - keys, set(), "read but not defined")
        self.assertEqual(written - keys, set(), "written but not defined")
        # the host reads only keys the guest writes (the suffixes and agent keys aside)
        agent = {"STDERR", "EXIT", "AGENT_MS", "ERROR_SUFFIX", "BYTES_SUFFIX"}
        self.assertEqual(read - written - agent, set(), "read but never written")
        self.assertEqual(len({getattr(vocab.Key, k) for k in keys}), len(keys))


if __name__ == "__main__":
    unittest.main()
