"""The harm table (orchestrator/data/harm.toml) ranks every outcome class there is."""

from __future__ import annotations

import errno
import re
import tempfile
import tomllib
import unittest
from pathlib import Path

from pinlab.orchestrator import dmesg
from pinlab.orchestrator.expectations import load as load_rules
from pinlab.orchestrator.harm import UnknownClass, load, parse

# the one kind of expected class that is infrastructure: a known bug of the host side whose
# cell records it until it is fixed (README.md "The matrix": QEMU 11.1.3 aborts on
# device_del of an MSI-X vfio-user-pci device)
KNOWN_HOST_BUGS = {"hot-unplug-loop-msix": "QEMU_CRASHED"}

REPO = Path(__file__).resolve().parents[2]
EXPECTATIONS = REPO / "orchestrator" / "data" / "expectations.toml"
# the shared checks and the per-event classifiers
CLASSIFIERS = [REPO / "orchestrator" / "classify.py",
               *sorted((REPO / "orchestrator" / "events").glob("*.py"))]


def header_classes() -> list[str]:
    """The outcome classes listed in the header comment of expectations.toml."""
    text = EXPECTATIONS.read_text()
    head = text[text.index("# Outcome classes"):text.index("\n[[rule]]")]
    return re.findall(r"^#   ([A-Z][A-Z0-9_]+)(?:\([A-Z]+\))?\s", head, re.M)


class HarmTableTest(unittest.TestCase):
    def test_every_class_in_the_expectations_header_is_ranked(self) -> None:
        table = load()
        classes = header_classes()
        self.assertGreater(len(classes), 20, "the header's class list was not found")
        for c in classes:
            with self.subTest(cls=c):
                lv = table.level(c)      # raises UnknownClass if harm.toml lacks it
                self.assertTrue(lv.name)

    def test_every_class_the_classifier_returns_is_ranked(self) -> None:
        src = "\n".join(p.read_text() for p in CLASSIFIERS if p.exists())
        # Outcome.CLASS (common/vocab.py) / return f"CLASS({...})" / "CLASS" if ... else ...
        found = set(re.findall(r'(?:return f?|else |\(|= )"([A-Z][A-Z_]{3,})[("]', src))
        found |= set(re.findall(r"\bOutcome\.([A-Z][A-Z0-9_]+)\b", src))
        # kernel-log classes (dmesg.py) and errno names are not outcome classes
        found -= {name for name, _ in dmesg.PATTERNS} | set(errno.errorcode.values()) \
            | {"DEVICE_DELETED"}
        self.assertIn("WRITES_LOST_SILENTLY", found)
        table = load()
        for c in sorted(found):
            with self.subTest(cls=c):
                table.level(c)

    def test_every_expected_class_is_a_kernel_outcome(self) -> None:
        table = load()
        for r in load_rules():
            if str(r.get("event")) in KNOWN_HOST_BUGS:
                self.assertEqual(r["expected"], KNOWN_HOST_BUGS[r["event"]])
                continue
            with self.subTest(expected=r["expected"]):
                self.assertFalse(table.is_infra(r["expected"]))
                self.assertGreaterEqual(table.harm(r["expected"]), 0)

    def test_order_named_in_the_issue(self) -> None:
        t = load()
        self.assertGreater(t.harm("KERNEL_ERROR"), t.harm("DMA_AFTER_REVOKE"))
        self.assertGreater(t.harm("DMA_AFTER_REVOKE"), t.harm("WRITES_LOST_SILENTLY"))
        self.assertGreater(t.harm("WRITES_LOST_SILENTLY"), t.harm("WRITEBACK_STALE"))
        self.assertGreater(t.harm("WRITEBACK_STALE"), t.harm("COHERENT"))
        # "refused / coherent / revoked in time" are equally harmless; so is a migration or
        # offline that a pin blocks (no data harmed); each keeps its own colour
        for c in ("REVOKED_IN_TIME", "PIN_REFUSED(EFAULT)", "MIGRATION_FAILS", "OFFLINE_BLOCKED"):
            self.assertEqual(t.harm(c), t.harm("COHERENT"), c)
        self.assertNotEqual(t.level("PIN_REFUSED(EFAULT)").colour, t.level("COHERENT").colour)

    def test_parameterised_and_infra_classes(self) -> None:
        t = load()
        self.assertEqual(t.level("PIN_REFUSED(EFAULT)"), t.level("PIN_REFUSED(EPERM)"))
        for c in ("ERROR", "QEMU_CRASHED", "INCONCLUSIVE(no audit records)",
                  "ERROR(pool)"):
            with self.subTest(cls=c):
                self.assertTrue(t.is_infra(c))
                self.assertEqual(t.harm(c), -1)
        self.assertFalse(t.is_infra("COHERENT"))

    def test_unknown_class_is_an_error(self) -> None:
        with self.assertRaises(UnknownClass):
            load().harm("SOMETHING_NEW")

    def test_a_class_ranked_twice_is_rejected(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d, "h.toml")
            p.write_text('[[level]]\nharm = 1\nname = "a"\ncolour = "#fff"\nclasses = ["X"]\n'
                         '[[level]]\nharm = 2\nname = "b"\ncolour = "#fff"\nclasses = ["X"]\n')
            with self.assertRaises(ValueError):
                parse(tomllib.loads(p.read_text()))

    def test_regression_dmesg_classes_exist_in_dmesg_py(self) -> None:
        known = {c for c, _ in dmesg.PATTERNS}
        self.assertLessEqual(load().regression_dmesg, known)
        self.assertLessEqual(dmesg.SEVERE, load().regression_dmesg)


if __name__ == "__main__":
    unittest.main()
