"""Which cells a run gets: the tag filter, then a deterministic shard of what is left.

A shard is ``I/N`` (1-based), given on the command line or read from the variables the CI
engines set: GitLab CI's ``parallel:`` sets ``CI_NODE_INDEX`` (1-based) and
``CI_NODE_TOTAL``; a Kubernetes Indexed Job sets ``JOB_COMPLETION_INDEX`` (0-based) and the
manifest passes the total as ``PINLAB_SHARD_TOTAL`` (Kubernetes exports no total); any
engine may set ``PINLAB_SHARD=I/N``. GitHub Actions passes ``--shard`` from its matrix.

The split depends only on the cell ids, the expectations table and ``N``, so every machine
computes the same shards. Cells are ordered by kernel, then by whether they make the pool
reboot the guest, then by a stable hash (SHA-256) of the cell id, and that list is cut into
``N`` contiguous pieces. The cut minimises the largest piece's cost, counting one guest
boot for every kernel a piece touches and for every cell that reboots the guest: so a shard
holds as few kernels as balance allows, the rebooting cells (expected kernel warnings) stay
together (and the last one of a kernel saves its reboot, which the pool does lazily before
the next cell), and the hash spreads each event's cells evenly over the pieces.

``select_cells`` is the one entry point; ``pinlab matrix`` uses it, and so can any other
command that runs cells.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pinlab.images.kernel import KERNELS

from .cells import all_cells, select
from .expectations import Cell, expect, load

# Relative costs in "cells": a cell takes about 1 s of wall time through the warm guest
# (README: about 0.65 s of TCG time plus Avocado's test process), a TCG boot to a ready
# pool about 8 s.
CELL_COST = 1
BOOT_COST = 8


@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` of ``total`` (1-based: ``1/3`` .. ``3/3``)."""

    index: int
    total: int

    def __post_init__(self) -> None:
        if self.total < 1 or not 1 <= self.index <= self.total:
            raise ValueError(f"shard {self.index}/{self.total}: need 1 <= I <= N")

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"2/3"`` -> ``Shard(2, 3)``. Raises ValueError with the reason otherwise."""
        i, sep, n = text.strip().partition("/")
        if not sep or not i.strip().isdigit() or not n.strip().isdigit():
            raise ValueError(f"shard {text!r}: expected I/N, e.g. 1/3")
        return cls(int(i), int(n))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard | None:
        """The shard the CI engine asked for, or None when no variable is set.

        Looks at ``PINLAB_SHARD`` (``I/N``), then ``CI_NODE_INDEX``/``CI_NODE_TOTAL``
        (GitLab ``parallel:``, 1-based), then ``JOB_COMPLETION_INDEX`` (Kubernetes Indexed
        Job, 0-based) with ``PINLAB_SHARD_TOTAL``. Raises ValueError for a half-set or
        malformed pair."""
        env = os.environ if env is None else env
        if env.get("PINLAB_SHARD"):
            return cls.parse(env["PINLAB_SHARD"])
        if env.get("CI_NODE_INDEX") or env.get("CI_NODE_TOTAL"):
            return cls._pair(env, "CI_NODE_INDEX", "CI_NODE_TOTAL", base=1)
        if env.get("JOB_COMPLETION_INDEX"):
            return cls._pair(env, "JOB_COMPLETION_INDEX", "PINLAB_SHARD_TOTAL", base=0)
        return None

    @classmethod
    def resolve(cls, text: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
        """``--shard`` if given (``parse``), else the CI engine's variables (``from_env``).
        Raises ValueError as those do."""
        return cls.parse(text) if text else cls.from_env(env)

    @classmethod
    def _pair(cls, env: Mapping[str, str], index: str, total: str, base: int) -> Shard:
        i, n = env.get(index, ""), env.get(total, "")
        if not i.isdigit() or not n.isdigit():
            raise ValueError(f"{index}={i!r} and {total}={n!r}: both must be set to "
                             "non-negative integers")
        return cls(int(i) + 1 - base, int(n))


SHARD_HELP = ("run only shard I of N (1-based); default from PINLAB_SHARD, "
              "CI_NODE_INDEX/CI_NODE_TOTAL or JOB_COMPLETION_INDEX/PINLAB_SHARD_TOTAL")


def add_shard_argument(parser: argparse.ArgumentParser) -> None:
    """``--shard I/N`` for a command that runs cells (``pinlab matrix``, and any other);
    resolve the value with ``Shard.resolve``."""
    parser.add_argument("--shard", metavar="I/N", help=SHARD_HELP)


def cell_id(cell: Cell) -> str:
    """A cell's id, the same everywhere: ``kernel/mode/backing/event``."""
    return cell.name


def stable_hash(cell: Cell) -> int:
    """A 64-bit hash of the cell id that does not depend on the Python process (unlike
    ``hash()``, which is salted per process)."""
    return int.from_bytes(hashlib.sha256(cell_id(cell).encode()).digest()[:8], "big")


def reboots(cell: Cell, rules: list[dict[str, Any]]) -> bool:
    """Whether the pool will reboot the guest after this cell: its expected outcome is a
    kernel warning (``EXT4_WARN_DATA_LOST``), and the pool reboots after any WARN/BUG/Oops
    in dmesg because a WARN_ON_ONCE fires only once per boot (pool.py). Hot-unplug cells
    plug the device back in (scenario.py) and reboot only when that fails, which no split
    can know in advance."""
    exp = expect(cell, rules)
    return bool(exp and "WARN" in exp.expected)


def order(cells: list[Cell], rules: list[dict[str, Any]]) -> list[Cell]:
    """The split order: kernel (in ``KERNELS`` order), non-rebooting cells before rebooting
    ones, then the stable hash of the cell id."""
    rank = {k: i for i, k in enumerate(KERNELS)}
    return sorted(cells, key=lambda c: (rank.get(c.kernel, len(rank)), c.kernel,
                                        reboots(c, rules), stable_hash(c), cell_id(c)))


def _pieces(ordered: list[Cell], weights: list[int], limit: int) -> list[list[Cell]]:
    """Greedy: fill each piece while its cost (cells + one boot per kernel) stays within
    ``limit``."""
    pieces: list[list[Cell]] = [[]]
    cost = 0
    for c, w in zip(ordered, weights, strict=True):
        piece = pieces[-1]
        extra = w + (BOOT_COST if not piece or piece[-1].kernel != c.kernel else 0)
        if piece and cost + extra > limit:
            pieces.append([c])
            cost = w + BOOT_COST
        else:
            piece.append(c)
            cost += extra
    return pieces


def split(cells: list[Cell], total: int, rules: list[dict[str, Any]] | None = None
          ) -> list[list[Cell]]:
    """Cut the cells into ``total`` contiguous pieces of ``order(cells)`` (some may be empty
    when there are fewer cells than pieces) that minimise the largest piece's cost.

    Returns a list of ``total`` lists of cells; their concatenation is ``order(cells)``.
    Raises ValueError if ``total`` < 1."""
    if total < 1:
        raise ValueError(f"cannot split into {total} pieces")
    rules = load() if rules is None else rules
    ordered = order(list(dict.fromkeys(cells)), rules)
    if not ordered:
        return [[] for _ in range(total)]
    weights = [CELL_COST + (BOOT_COST if reboots(c, rules) else 0) for c in ordered]
    lo = max(weights) + BOOT_COST
    hi = sum(weights) + BOOT_COST * len({c.kernel for c in ordered})
    while lo < hi:                      # smallest limit that needs at most `total` pieces
        mid = (lo + hi) // 2
        if len(_pieces(ordered, weights, mid)) <= total:
            hi = mid
        else:
            lo = mid + 1
    pieces = _pieces(ordered, weights, lo)
    return pieces + [[] for _ in range(total - len(pieces))]


@dataclass(frozen=True)
class Selection:
    """What a run was asked for and what this shard of it runs.

    ``kernels`` and ``tags``: the request; ``shard``: None for the whole selection;
    ``cells``: this shard's cells in split order; ``selected``: how many cells the whole
    selection (every shard together) has."""

    kernels: tuple[str, ...]
    tags: tuple[str, ...]
    shard: Shard | None
    cells: tuple[Cell, ...]
    selected: int

    def describe(self) -> dict[str, Any]:
        """The JSON-able record of the request (kernels, tags, shard, cell count)."""
        return {"kernels": list(self.kernels), "tags": list(self.tags),
                "shard": ({"index": self.shard.index, "total": self.shard.total}
                          if self.shard else None),
                "selected": self.selected}


def select_cells(kernels: list[str], tags: list[str] | None = None,
                 shard: Shard | None = None,
                 rules: list[dict[str, Any]] | None = None) -> Selection:
    """The cells of ``kernels`` that pass the tag filters (``cells.select``), and of those,
    the ones in ``shard`` (``split``). Raises ValueError for an unknown kernel."""
    names = list(dict.fromkeys(kernels))
    for k in names:
        if k not in KERNELS:
            raise ValueError(f"unknown kernel {k!r} (known: {', '.join(KERNELS)})")
    rules = load() if rules is None else rules
    chosen = select([c for k in names for c in all_cells(k)], tags)
    mine = split(chosen, shard.total, rules)[shard.index - 1] if shard else \
        order(chosen, rules)
    return Selection(tuple(names), tuple(tags or ()), shard, tuple(mine), len(chosen))
