"""The verdict logic of the device hot-unplug loop (orchestrator/hotplug_loop.py) and how
its MSI-X variant gets its guest: which cycle failed first, what counts as positive
evidence of a QEMU abort, and which device IRQ mode a cell's guest is booted with. The
abort evidence is also checked on QEMU's real abort (tests/unit/test_device_qemu.py
QemuHotUnplugTest.test_device_del_with_msix_aborts) and on real processes here."""

from __future__ import annotations

import subprocess
import sys
import unittest

from pinlab.common.vocab import Outcome
from pinlab.orchestrator import events
from pinlab.orchestrator.guestenv import IRQ_MODES, guest_config, irq_of
from pinlab.orchestrator.hotplug_loop import (
    CYCLES,
    abort_evidence,
    cycle_outcome,
    loop_outcome,
)

QEMU_ASSERT = ("qemu-system-x86_64: ../system/memory.c:2714: memory_region_del_subregion: "
               "Assertion `subregion->container == mr' failed.")
CLEAN = Outcome.DEVICE_GONE_CLEAN


def _run(code: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    return p.returncode, p.stderr


class AbortEvidenceTest(unittest.TestCase):
    def test_a_real_sigabrt_with_the_assertion_line(self) -> None:
        rc, err = _run(f"import os, sys; sys.stderr.write({QEMU_ASSERT!r} + '\\n'); "
                       "sys.stderr.flush(); os.abort()")
        ev = abort_evidence(rc, "qemu: some warning\n" + err)
        self.assertIsNotNone(ev)
        assert ev is not None
        self.assertEqual(ev["signal"], "SIGABRT")
        self.assertEqual(ev["returncode"], rc)
        self.assertIn("subregion->container == mr", ev["assertion"])

    def test_sigabrt_alone_and_assertion_alone_count(self) -> None:
        rc, _ = _run("import os; os.abort()")
        self.assertEqual(abort_evidence(rc, ""), {"signal": "SIGABRT", "returncode": rc,
                                                  "assertion": None})
        # through a shell: 128 + SIGABRT
        self.assertEqual(abort_evidence(134, "")["signal"], "SIGABRT")  # type: ignore[index]
        ev = abort_evidence(1, QEMU_ASSERT + "\n")
        self.assertIsNotNone(ev)
        self.assertIsNone(ev["signal"])  # type: ignore[index]

    def test_no_evidence_is_no_abort(self) -> None:
        rc_term, err = _run("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
        rc_kill, _ = _run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        for rc, text in ((None, QEMU_ASSERT), (0, ""), (1, "qemu: could not open socket"),
                         (rc_term, err), (rc_kill, "terminating on signal 9"),
                         (-6 + 6, "Assertion failed somewhere")):
            with self.subTest(rc=rc, text=text):
                self.assertIsNone(abort_evidence(rc, text))


def host(**kw: object) -> dict[str, object]:
    return {"device_deleted": True, "module_refs": 0, "rebound": True, "replug_severe": [],
            **kw}


class CycleOutcomeTest(unittest.TestCase):
    def test_clean_cycle(self) -> None:
        self.assertEqual(cycle_outcome(CLEAN, host()), CLEAN)

    def test_the_guest_class_comes_first(self) -> None:
        for cls in (Outcome.KERNEL_ERROR, Outcome.PINS_LEAKED, Outcome.DMA_AFTER_REVOKE,
                    Outcome.DEVICE_NOT_REMOVED, "INCONCLUSIVE(audit unavailable)"):
            with self.subTest(cls=cls):
                self.assertEqual(cycle_outcome(cls, host(module_refs=2, rebound=False)), cls)

    def test_each_host_check_in_order(self) -> None:
        self.assertEqual(cycle_outcome(CLEAN, host(device_deleted=False, module_refs=1)),
                         Outcome.DEVICE_NOT_REMOVED)
        self.assertEqual(cycle_outcome(CLEAN, host(module_refs=1, rebound=False)),
                         Outcome.REGION_NOT_RELEASED)
        self.assertEqual(cycle_outcome(CLEAN, host(module_refs="?")),
                         Outcome.REGION_NOT_RELEASED)
        self.assertEqual(cycle_outcome(CLEAN, host(replug_severe=["WARN"], rebound=False)),
                         Outcome.KERNEL_ERROR)
        self.assertEqual(cycle_outcome(CLEAN, host(rebound=False)),
                         Outcome.DEVICE_NOT_REPLUGGED)

    def test_missing_fact_raises(self) -> None:
        with self.assertRaises(KeyError):
            cycle_outcome(CLEAN, {"device_deleted": True})


class LoopOutcomeTest(unittest.TestCase):
    def cycles(self, *classes: str) -> list[dict[str, object]]:
        return [{"cycle": i, "observed": c} for i, c in enumerate(classes, 1)]

    def test_all_clean(self) -> None:
        self.assertEqual(loop_outcome(self.cycles(*[CLEAN] * CYCLES)), (CLEAN, None))

    def test_first_failure_decides(self) -> None:
        got = loop_outcome(self.cycles(CLEAN, CLEAN, Outcome.QEMU_CRASHED, Outcome.KERNEL_ERROR))
        self.assertEqual(got, (Outcome.QEMU_CRASHED, 3))
        self.assertEqual(loop_outcome(self.cycles(Outcome.PINS_LEAKED)), (Outcome.PINS_LEAKED, 1))

    def test_a_short_loop_is_inconclusive(self) -> None:
        cls, failed = loop_outcome(self.cycles(CLEAN, CLEAN))
        self.assertTrue(cls.startswith("INCONCLUSIVE"), cls)
        self.assertIn("2 of 10", cls)
        self.assertIsNone(failed)
        self.assertTrue(loop_outcome([])[0].startswith("INCONCLUSIVE"))

    def test_cycles_out_of_order(self) -> None:
        with self.assertRaises(ValueError):
            loop_outcome([{"cycle": 2, "observed": CLEAN}])


class IrqTest(unittest.TestCase):
    def test_irq_of_a_device_server(self) -> None:
        self.assertEqual(irq_of(["--irq", "msi"]), "msi")
        self.assertEqual(irq_of(["--x", "1", "--irq", "msix"]), "msix")
        self.assertEqual(irq_of([]), "msix")   # the device server's default
        for irq in IRQ_MODES:
            self.assertEqual(irq_of(guest_config(irq).device_args), irq)
        with self.assertRaises(ValueError):
            guest_config("intx")

    def test_events_ask_for_a_known_irq(self) -> None:
        for ev in events.events():
            with self.subTest(event=ev.name):
                self.assertIn(ev.irq, IRQ_MODES)
        msix = events.event("hot-unplug-loop-msix")
        loop = events.event("hot-unplug-loop")
        assert msix is not None and loop is not None
        self.assertEqual((msix.irq, loop.irq), ("msix", "msi"))
        self.assertEqual(msix.scenario, loop.scenario)


if __name__ == "__main__":
    unittest.main()
