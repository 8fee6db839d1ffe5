"""The expectations table (data in ``data/expectations.toml``) and cell matching."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True, order=True)
class Cell:
    """One cell of the matrix: ``event`` on ``kernel`` with the region registered in
    ``mode`` over ``backing``, and ``options`` (common/vocab.py OPTIONS: a canonical
    ``+``-joined string, "" for none)."""

    kernel: str
    mode: str
    backing: str
    event: str
    options: str = ""

    @property
    def name(self) -> str:
        """``KERNEL/MODE/BACKING/EVENT`` with ``+OPTIONS`` after the event when it has some
        (``6.12/pin/anon/migrate+fast``)."""
        return f"{self.kernel}/{self.short}"

    @property
    def short(self) -> str:
        """The name without the kernel: ``MODE/BACKING/EVENT[+OPTIONS]``."""
        return f"{self.mode}/{self.backing}/{self.variant}"

    @property
    def variant(self) -> str:
        """The event with its options: ``migrate+fast``, or ``migrate``."""
        return f"{self.event}+{self.options}" if self.options else self.event

    @property
    def option_names(self) -> tuple[str, ...]:
        """The cell's options, e.g. ``("readonly", "fast")``."""
        return tuple(self.options.split("+")) if self.options else ()

    @classmethod
    def parse(cls, text: str) -> Cell:
        """The cell named ``KERNEL/MODE/BACKING/EVENT[+OPTIONS]`` (:attr:`name`). Raises
        ValueError if it has not four parts or its options are unknown."""
        from pinlab.common.vocab import split_options

        parts = text.strip().split("/")
        if len(parts) != 4:
            raise ValueError(f"a cell is KERNEL/MODE/BACKING/EVENT[+OPTIONS] "
                             f"(e.g. 6.12/longterm/ext4/2018), not {text!r}")
        event, _, options = parts[3].partition("+")
        split_options(options)
        return cls(parts[0], parts[1], parts[2], event, options)


@dataclass(frozen=True)
class Expectation:
    """A cell's expected outcome class, the rule's source and ``races``: other classes the
    kernel has been observed to give the same cell run to run (a race inside the kernel,
    counted in the rule's source). A cell that shows one of them matches its rule, and its
    verdict says it raced."""

    expected: str
    source: str
    races: tuple[str, ...] = ()

    def accepts(self, observed: str) -> bool:
        """Whether ``observed`` is the expected class or one of the observed races."""
        return observed == self.expected or observed in self.races


def _matches(value: str, want: Any) -> bool:
    if want == "*" or want is None:
        return True
    if isinstance(want, list):
        return value in want
    return bool(value == want)


# the class of a cell whose evidence is missing, truncated or contradictory
# (orchestrator/classify.py); reported as an error, never expected
INCONCLUSIVE = "INCONCLUSIVE"


def load(path: Path | None = None) -> list[dict[str, Any]]:
    """The rules of the expectations table, in order. Raises ValueError for a rule without
    ``expected`` or ``source``, one that expects an INCONCLUSIVE outcome (also among its
    ``races``), or ``races`` that is not a list of other classes."""
    if path is None:
        text = resources.files("pinlab.orchestrator").joinpath(
            "data", "expectations.toml").read_text()
    else:
        text = path.read_text()
    rules = tomllib.loads(text).get("rule", [])
    for r in rules:
        missing = {"expected", "source"} - set(r)
        if missing:
            raise ValueError(f"expectation rule {r} lacks {sorted(missing)}")
        if str(r["expected"]).startswith(INCONCLUSIVE):
            raise ValueError(f"expectation rule {r} expects {r['expected']}: missing evidence "
                             "is never an expected outcome")
        races = r.get("races", [])
        if (not isinstance(races, list) or not all(isinstance(c, str) and c for c in races)
                or r["expected"] in races):
            raise ValueError(f"expectation rule {r}: races must list classes other than "
                             "the expected one")
        if any(c.startswith(INCONCLUSIVE) for c in races):
            raise ValueError(f"expectation rule {r}: missing evidence is never a race")
    return rules


def expect(cell: Cell, rules: list[dict[str, Any]]) -> Expectation | None:
    for r in rules:
        if all(_matches(getattr(cell, f), r.get(f, "*"))
               for f in ("kernel", "mode", "backing", "event", "options")):
            return Expectation(str(r["expected"]), str(r["source"]),
                               tuple(str(c) for c in r.get("races", [])))
    return None
