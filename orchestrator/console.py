"""The guest's serial console, written by QEMU to a file, read incrementally."""

from __future__ import annotations

from pathlib import Path

READY = "PINLAB-READY"
FATAL_MARKERS = ("PINLAB-FATAL", "Kernel panic - not syncing", "end Kernel panic")


class Console:
    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def contains(self, marker: str) -> bool:
        return marker in self.text()

    def ready_line(self) -> str | None:
        for line in self.text().splitlines():
            if READY in line:
                return line
        return None

    def fatal(self) -> str | None:
        text = self.text()
        for m in FATAL_MARKERS:
            i = text.find(m)
            if i >= 0:
                return text[i:].splitlines()[0]
        return None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])
