"""Harm ranks of outcome classes (data in ``data/harm.toml``).

``pinlab validate`` compares a base and a candidate kernel cell by cell: a candidate in a
more harmful class is a regression, in a less harmful one a fix. The matrix's HTML page
colours each cell by the same rank.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any


class UnknownClass(ValueError):
    """An outcome class that harm.toml does not rank (nor call infrastructure)."""


@dataclass(frozen=True)
class Level:
    harm: int          # higher is worse; infrastructure has no harm (-1 here)
    name: str
    colour: str        # CSS colour for HTML pages
    why: str


@dataclass(frozen=True)
class HarmTable:
    levels: tuple[Level, ...]          # most harmful first; several may share a harm
    by_class: dict[str, Level]
    infra: Level
    infra_classes: frozenset[str]
    infra_prefixes: tuple[str, ...]
    regression_dmesg: frozenset[str]   # dmesg.py classes whose new signatures regress

    @staticmethod
    def base_name(observed: str) -> str:
        """``PIN_REFUSED(EFAULT)`` -> ``PIN_REFUSED``."""
        return observed.split("(", 1)[0].strip()

    def is_infra(self, observed: str) -> bool:
        """True for classes that say nothing about the kernel (ERROR, QEMU_CRASHED,
        INCONCLUSIVE(...), ...): they are retried, never compared."""
        name = self.base_name(observed)
        return name in self.infra_classes or observed.startswith(self.infra_prefixes)

    def level(self, observed: str) -> Level:
        """The level of an outcome class (``infra`` for infrastructure classes).

        Raises UnknownClass when harm.toml does not list it: an unranked class must not
        pass as harmless."""
        if self.is_infra(observed):
            return self.infra
        try:
            return self.by_class[self.base_name(observed)]
        except KeyError:
            raise UnknownClass(f"outcome class {observed!r} has no harm rank in harm.toml"
                               ) from None

    def harm(self, observed: str) -> int:
        """Harm rank (0 no harm: coherent, revoked in time, refused, blocked .. 6 kernel
        error); -1 for infrastructure classes."""
        return self.level(observed).harm


def parse(data: dict[str, Any]) -> HarmTable:
    """Build a HarmTable from harm.toml's parsed data. Raises ValueError on a class listed
    twice or a level without its fields."""
    levels: list[Level] = []
    by_class: dict[str, Level] = {}
    for raw in data.get("level", []):
        missing = {"harm", "name", "colour", "classes"} - set(raw)
        if missing:
            raise ValueError(f"harm level {raw.get('name')!r} lacks {sorted(missing)}")
        lv = Level(int(raw["harm"]), str(raw["name"]), str(raw["colour"]), str(raw.get("why", "")))
        levels.append(lv)
        for c in raw["classes"]:
            if c in by_class:
                raise ValueError(f"outcome class {c} is ranked twice in harm.toml")
            by_class[c] = lv
    inf = data.get("infra", {})
    infra = Level(-1, str(inf.get("name", "infrastructure")), str(inf.get("colour", "#bbb")),
                  str(inf.get("why", "")))
    infra_classes = frozenset(inf.get("classes", []))
    both = infra_classes & set(by_class)
    if both:
        raise ValueError(f"classes both ranked and infrastructure: {sorted(both)}")
    return HarmTable(tuple(sorted(levels, key=lambda lv: -lv.harm)), by_class, infra,
                     infra_classes, tuple(inf.get("prefixes", [])),
                     frozenset(data.get("dmesg", {}).get("regression_classes", [])))


@cache
def _default() -> HarmTable:
    text = resources.files("pinlab.orchestrator").joinpath("data", "harm.toml").read_text()
    return parse(tomllib.loads(text))


def load(path: Path | None = None) -> HarmTable:
    """The harm table: ``orchestrator/data/harm.toml`` unless ``path`` is given."""
    if path is None:
        return _default()
    return parse(tomllib.loads(path.read_text()))
