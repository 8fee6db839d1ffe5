"""Fault injection settings shared by the engine and the control socket."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Faults:
    delay_revoke_ms: int = 0  # INVALIDATE completes this much later (pages already unmapped)
    never_ack_revoke: bool = False  # INVALIDATE never completes (until clear-fault or reset)
    write_after_revoke: bool = False  # after an INVALIDATE ack, write once to a revoked page
    drop_irq: bool = False  # never signal MSI-X
    delay_irq_ms: int = 0  # signal MSI-X this much later
    die: bool = False  # the process exits at once (set-fault only; never stored as true)
    changed: threading.Condition = field(default_factory=threading.Condition, repr=False,
                                         compare=False)

    # QMP argument names use dashes
    @staticmethod
    def names() -> list[str]:
        return [f.name.replace("_", "-") for f in fields(Faults) if f.name != "changed"]

    def update(self, args: dict[str, Any]) -> None:
        """Validate every argument first, then apply them all. Raises ValueError."""
        parsed: dict[str, Any] = {}
        for key, value in args.items():
            name = key.replace("-", "_")
            if name == "changed" or name not in {f.name for f in fields(Faults)}:
                raise ValueError(f"unknown fault '{key}'")
            default = getattr(Faults, name)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"'{key}' must be a boolean")
            elif (isinstance(value, bool) or not isinstance(value, int)
                  or not 0 <= value <= 3600_000):
                raise ValueError(f"'{key}' must be an integer 0..3600000")
            parsed[name] = value
        with self.changed:
            for name, value in parsed.items():
                setattr(self, name, value)
            self.changed.notify_all()

    def clear(self, names: list[str] | None = None) -> None:
        with self.changed:
            for f in fields(Faults):
                if f.name != "changed" and (names is None or f.name in names):
                    setattr(self, f.name, f.default)
            self.changed.notify_all()

    def as_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name)
                for f in fields(self) if f.name != "changed"}
