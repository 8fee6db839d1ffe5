"""Debian trees made with mmdebstrap from binary packages only."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .steps import need_root, run

MIRROR = os.environ.get("PINLAB_DEBIAN_MIRROR", "http://deb.debian.org/debian")


@dataclass(frozen=True)
class Suite:
    """A Debian release as a list of apt sources, with an optional pin (e.g. backports)."""

    name: str  # codename used by mmdebstrap, e.g. "trixie"
    components: tuple[str, ...] = ("main",)
    extra_suites: tuple[str, ...] = ()  # e.g. ("trixie-backports",)
    prefer: str | None = None  # a suite whose packages win over the base suite's
    epoch: int = 0  # SOURCE_DATE_EPOCH for reproducible trees (0 = unset)

    def sources(self) -> list[str]:
        comps = " ".join(self.components)
        return [f"deb {MIRROR} {s} {comps}" for s in (self.name, *self.extra_suites)]

    def pin_file(self) -> str | None:
        if not self.prefer:
            return None
        return f"Package: *\nPin: release n={self.prefer}\nPin-Priority: 500\n"


@dataclass
class Tree:
    """Arguments for one mmdebstrap run."""

    suite: Suite
    target: Path
    variant: str = "essential"
    include: list[str] = field(default_factory=list)
    hooks: list[tuple[str, str]] = field(default_factory=list)  # (kind, shell command)


def mmdebstrap(tree: Tree, *, log: Path, title: str) -> None:
    """Create ``tree.target`` (a directory), replacing whatever was there."""
    need_root("building Debian trees")
    if tree.target.exists():
        shutil.rmtree(tree.target)
    tree.target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tree.target.with_name(tree.target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    cmd: list[str] = ["mmdebstrap", "--mode=root", f"--variant={tree.variant}"]
    if tree.include:
        cmd.append("--include=" + ",".join(tree.include))
    pin = tree.suite.pin_file()
    if pin:
        pinpath = tree.target.parent / f".{tree.target.name}.pin"
        pinpath.write_text(pin)
        cmd.append(
            f'--setup-hook=mkdir -p "$1/etc/apt/preferences.d" && '
            f'cp {pinpath} "$1/etc/apt/preferences.d/pinlab"'
        )
    for kind, hook in tree.hooks:
        cmd.append(f"--{kind}-hook={hook}")
    cmd += [tree.suite.name, str(tmp), *tree.suite.sources()]
    env = {"SOURCE_DATE_EPOCH": str(tree.suite.epoch)} if tree.suite.epoch else None
    run(cmd, log=log, title=title, env=env)
    tmp.rename(tree.target)
