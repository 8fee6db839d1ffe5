"""The matrix's events, one module each: ``orchestrator/events/ev_<event>.py``.

Every module defines ``EVENT``, an :class:`Event`: the event's name, where it stands in the
matrix, which backings and modes it applies to (and why, in the module's docstring), how
the host runs it (:attr:`Event.scenario`, a function of ``orchestrator/scenario.py``;
default: the guest workload in one go) and how the host classifies its report
(:attr:`Event.classify`, on top of the shared checks of ``orchestrator/classify.py``).
The guest side of the same event is ``guest/events/ev_<event>.py`` (its steps); its
expected outcomes are rules in ``orchestrator/data/expectations.toml``. Adding an event
is those three files (README, "Adding an event"); tests/unit/test_events.py checks that
they agree.

The registry is discovered, not listed: :func:`events` imports every ``ev_*`` module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pinlab.common.vocab import MODES, OPTION_BACKINGS, OPTION_MODES, split_options

if TYPE_CHECKING:
    from ..classify import Judge
    from ..expectations import Cell
    from ..scenario import Observation
    from ..session import GuestSession


@dataclass(frozen=True)
class Event:
    """One event of the matrix.

    ``name``: the event's name (``Cell.event``, the ``event:`` tag, the guest's
    ``--event``). ``order``: its place in the matrix (cells, test names and the report
    list events by it; unique). ``backings``: the backings it applies to, in the matrix's
    backing order; ``modes``: the modes each of them runs in. ``classify``: the event's
    classifier, called with the :class:`~pinlab.orchestrator.classify.Judge` after the
    shared checks; returns an outcome class or raises
    :class:`~pinlab.orchestrator.classify.Inconclusive`. ``scenario``: the name of the function of
    ``orchestrator/scenario.py`` that runs one cell on the host (``(session, cell,
    artifacts dir) -> Observation``; imported only when a cell runs, so listing the
    cells stays light). ``shared_checks``: False when the
    event judges kernel errors and the audit itself (device removal). ``ext4_check``:
    False when the event judges ext4's dirty-path warning itself (2018). ``last_gen``:
    the device generation written last (what a btrfs or ext4 data loss is judged on).
    ``swap_control``: backings whose cells must show that reclaim reached the mapping
    (the guest adds unregistered control pages; classify.py ``swap_reached``).
    ``faults``: device faults a ``pinlab up --cell`` guest of this event is booted with
    (the matrix sets them in ``scenario``). ``smoke``: the (mode, backing) of the event's
    smoke cell when the default choice (cells.py ``smoke``) would not be the cell that
    tells the kernels apart. ``variants``: the cell options (common/vocab.py OPTIONS,
    canonical ``+``-joined strings; "" = none) each (backing, mode) runs with; an option
    runs only in the modes and on the backings it applies to (``OPTION_MODES``,
    ``OPTION_BACKINGS``). ``irq``: the device's
    interrupts in the guest a cell of this event runs in (guestenv.IRQ_MODES; the pool
    boots a guest with them when its guest has the other kind). ``thp_small``: the cells
    of a THP backing register small pages on purpose (madv-collapse), so classify.py
    ``Judge.need_thp`` asks for small pages in a VM_HUGEPAGE VMA instead of one large
    folio. ``not_on``: backing -> the kernels (names of images/kernel.py KERNELS) on
    which the event cannot happen to that backing, so the matrix has no such cell there
    (the module's docstring says why, with the observation). ``readonly``: the event
    registers read-only by nature (its guest module's ``READONLY``: cpu-write), whatever
    the cell's options."""

    name: str
    order: int
    backings: tuple[str, ...]
    classify: Callable[[Judge], str]
    modes: tuple[str, ...] = MODES
    scenario: str = "run_cell"
    shared_checks: bool = True
    ext4_check: bool = True
    last_gen: int = 2
    swap_control: tuple[str, ...] = ()
    faults: dict[str, Any] = field(default_factory=dict)
    smoke: tuple[str, str] | None = None
    variants: tuple[str, ...] = ("",)
    irq: str = "msi"
    thp_small: bool = False
    not_on: dict[str, tuple[str, ...]] = field(default_factory=dict)
    readonly: bool = False

    def __post_init__(self) -> None:
        for v in self.variants:
            split_options(v)  # raises ValueError naming an unknown option
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"event {self.name}: variants {self.variants} repeat one")

    def applies(self, backing: str, kernel: str) -> bool:
        """Whether the event has cells of ``backing`` on ``kernel`` (:attr:`not_on`)."""
        return kernel not in self.not_on.get(backing, ())

    def variant_modes(self, options: str) -> tuple[str, ...]:
        """The modes this event runs in with ``options``: :attr:`modes` less those an
        option does not apply to."""
        return tuple(m for m in self.modes
                     if all(m in OPTION_MODES[o] for o in split_options(options)))

    def variant_backings(self, options: str) -> tuple[str, ...]:
        """The backings this event runs with ``options``: :attr:`backings` less those an
        option does not apply to (``OPTION_BACKINGS``)."""
        return tuple(b for b in self.backings
                     if all(b in OPTION_BACKINGS.get(o, (b,)) for o in split_options(options)))

    def run(self, s: GuestSession, cell: Cell, art: Path) -> Observation:
        """Run one cell of this event in ``s`` (artifacts in ``art``)."""
        from .. import scenario

        return getattr(scenario, self.scenario)(s, cell, art)  # type: ignore[no-any-return]


def module_name(event: str) -> str:
    """The module of an event: ``ev_`` + its name with ``-`` as ``_`` (``ev_punch_hole``)."""
    return "ev_" + event.replace("-", "_")


@cache
def events() -> tuple[Event, ...]:
    """Every event, by :attr:`Event.order`. Raises ImportError/ValueError for a module
    without a well-formed EVENT (a wrong module name, a duplicate name or order)."""
    found: list[Event] = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("ev_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        ev = getattr(mod, "EVENT", None)
        if not isinstance(ev, Event):
            raise ValueError(f"{info.name} defines no EVENT")
        if module_name(ev.name) != info.name:
            raise ValueError(f"{info.name} defines event {ev.name!r}: the module must be "
                             f"{module_name(ev.name)}")
        found.append(ev)
    found.sort(key=lambda e: e.order)
    for a, b in zip(found, found[1:], strict=False):
        if a.order == b.order:
            raise ValueError(f"events {a.name} and {b.name} share order {a.order}")
    return tuple(found)


def event(name: str) -> Event | None:
    """The event called ``name``, or None."""
    return next((e for e in events() if e.name == name), None)


def names() -> list[str]:
    """Every event's name, in the matrix's order."""
    return [e.name for e in events()]
