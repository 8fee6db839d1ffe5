"""Which cells the matrix has: every applicable (mode, backing, event) per kernel."""

from __future__ import annotations

from pinlab.images.kernel import KERNELS

from .expectations import Cell

MODES = ["gup", "pin", "longterm", "odp"]

# (backing, event) pairs that make sense; every mode runs each of them.
PAIRS: list[tuple[str, str]] = [
    ("anon", "dma-write"),
]

# One cell per event is the smoke slice CI runs on the non-default kernels.
SMOKE_MODE_ORDER = ["pin", "odp", "longterm", "gup"]


def all_cells(kernel: str) -> list[Cell]:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    return [Cell(kernel, m, b, e) for b, e in PAIRS for m in MODES]


def smoke(cells: list[Cell]) -> set[Cell]:
    """The first cell of each event, preferring the modes in SMOKE_MODE_ORDER."""
    out: dict[str, Cell] = {}
    rank = {m: i for i, m in enumerate(SMOKE_MODE_ORDER)}
    for c in sorted(cells, key=lambda c: (c.event, rank.get(c.mode, 99), c.backing)):
        out.setdefault(c.event, c)
    return set(out.values())
