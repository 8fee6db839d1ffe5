"""pinlab.ko's files call one way: cdev/main -> region -> odp -> queue (kmod/README.md,
"Layering"). The layers are read from the prototype sections of kmod/pinlab.h
(``/* pinlab_<file>.c */``); a file may call functions of its own layer and of any layer
below, never one above. Callbacks the kernel calls (IRQ handlers, the event work, the
notifier ops) are installed by name, not called, and are listed as such."""

from __future__ import annotations

import re
import unittest
from pathlib import Path

KMOD = Path(__file__).resolve().parents[2] / "kmod"
# top first; main and cdev share the top layer
LAYERS = [("pinlab_main.c", "pinlab_cdev.c"), ("pinlab_region.c",), ("pinlab_odp.c",),
          ("pinlab_queue.c",)]
# installed as callbacks by pinlab_main.c's probe (request_irq, INIT_WORK)
CALLBACKS = {"pinlab_cq_irq", "pinlab_eq_irq", "pinlab_event_work"}
SECTION = re.compile(r"^/\* (pinlab_\w+\.c) \*/$", re.M)
PROTO = re.compile(r"^[a-z][\w \*]*?\b(pinlab_\w+)\(", re.M)


def exported() -> dict[str, str]:
    """Function name -> the .c file whose section of pinlab.h declares it."""
    text = (KMOD / "pinlab.h").read_text()
    owner: dict[str, str] = {}
    marks = list(SECTION.finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end():end].split("\nstatic inline", 1)[0]
        for p in PROTO.finditer(body):
            owner[p.group(1)] = m.group(1)
    return owner


def layer_of(path: str) -> int:
    for i, files in enumerate(LAYERS):
        if path in files:
            return i
    raise KeyError(path)


def upward_calls(sources: dict[str, str] | None = None) -> list[str]:
    """Every use of a function declared by a higher layer, as 'caller -> callee (file)'.

    ``sources`` replaces the text of the named files (default: read from kmod/)."""
    owner = exported()
    found = []
    for files in LAYERS:
        for f in files:
            src = (sources or {}).get(f) or (KMOD / f).read_text()
            for name, home in owner.items():
                if home == f or not re.search(rf"\b{name}\b", src):
                    continue
                if layer_of(home) < layer_of(f) and name not in CALLBACKS:
                    found.append(f"{f} -> {name} ({home})")
    return sorted(found)


class KmodLayering(unittest.TestCase):
    def test_sections_cover_every_file(self) -> None:
        homes = set(exported().values())
        for files in LAYERS[1:]:
            for f in files:
                self.assertIn(f, homes, f"pinlab.h has no /* {f} */ section")

    def test_no_call_goes_up(self) -> None:
        self.assertEqual(upward_calls(), [])

    def test_checker_sees_an_upward_call(self) -> None:
        # the call that made the cycle before: odp mapping pages through the region file
        odp = (KMOD / "pinlab_odp.c").read_text() + "\nstatic void x(void)\n{\n" \
            "\tpinlab_region_put(r);\n}\n"
        self.assertEqual(upward_calls({"pinlab_odp.c": odp}),
                         ["pinlab_odp.c -> pinlab_region_put (pinlab_region.c)"])


if __name__ == "__main__":
    unittest.main()
