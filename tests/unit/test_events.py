"""The event registry is consistent: every event has its guest steps
(guest/events/ev_<event>.py), its host side (orchestrator/events/ev_<event>.py: where it
applies, how it runs, how it is classified) and an expectation for every cell."""

from __future__ import annotations

import unittest

from pinlab.common import vocab
from pinlab.guest import events as guest_events
from pinlab.images.kernel import KERNELS
from pinlab.orchestrator import events
from pinlab.orchestrator.cells import all_cells
from pinlab.orchestrator.classify import base_class
from pinlab.orchestrator.expectations import expect, load


class EventRegistryTest(unittest.TestCase):
    def test_guest_and_host_have_the_same_events(self) -> None:
        self.assertEqual(sorted(events.names()), guest_events.names())
        self.assertEqual(len(set(events.names())), len(events.names()))

    def test_every_event_is_complete(self) -> None:
        for ev in events.events():
            with self.subTest(event=ev.name):
                self.assertTrue(callable(ev.classify))
                self.assertTrue(ev.backings, "no backing")
                self.assertTrue(ev.modes, "no mode")
                self.assertLessEqual(set(ev.backings), set(vocab.BACKINGS))
                self.assertEqual(list(ev.backings),
                                 [b for b in vocab.BACKINGS if b in ev.backings],
                                 "backings out of the matrix's order")
                self.assertLessEqual(set(ev.modes), set(vocab.MODES))
                self.assertLessEqual(set(ev.swap_control), set(ev.backings))
                g = guest_events.event(ev.name)
                self.assertTrue(callable(g.run))
                self.assertTrue(g.__doc__ and events.module_name(ev.name) in g.__doc__,
                                f"the docstring of guest/events/{events.module_name(ev.name)}"
                                f".py must name its host module orchestrator/events/"
                                f"{events.module_name(ev.name)}.py")
                # the guest adds the control pages the host then requires
                self.assertEqual(tuple(getattr(g, "SWAP_CONTROL", ())), ev.swap_control)
                # read-only by nature on both sides; the read-only flow needs its steps
                self.assertEqual(bool(getattr(g, "READONLY", False)), ev.readonly)
                if any("readonly" in vocab.split_options(v) for v in ev.variants):
                    self.assertFalse(ev.readonly, "read-only by nature and as an option")
                    self.assertTrue(callable(getattr(g, "run_readonly", None)),
                                    "the readonly variant needs run_readonly(c)")

    def test_every_cell_has_an_expected_rule(self) -> None:
        rules = load()
        for k in KERNELS:
            for c in all_cells(k):
                with self.subTest(cell=c.name):
                    e = expect(c, rules)
                    self.assertIsNotNone(e)
                    assert e is not None
                    self.assertIn(base_class(e.expected), vocab.OUTCOME_CLASSES)

    def test_lookup(self) -> None:
        self.assertIsNone(events.event("no-such-event"))
        with self.assertRaises(KeyError):
            guest_events.event("no-such-event")
        self.assertEqual(events.module_name("punch-hole"), "ev_punch_hole")
        self.assertEqual(events.event("no-ack").faults, {"never-ack-revoke": True})


if __name__ == "__main__":
    unittest.main()
