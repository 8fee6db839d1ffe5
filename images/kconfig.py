"""Kernel config fragments: parsing, merging onto a base config, and the dropped-line check.

A fragment is a Kconfig ``.config`` excerpt: ``CONFIG_X=y``, ``CONFIG_X="text"``, or
``# CONFIG_X is not set``; other lines are comments. Fragments are merged with the kernel's
own ``scripts/kconfig/merge_config.sh -m`` and resolved by ``make olddefconfig``, which
silently drops what it cannot honour: a symbol with no prompt (``HMM_MIRROR`` since commit
9c240a7bb337 "mm/hmm: make HMM_MIRROR an implicit option"), unmet dependencies, a symbol
that does not exist in this tree. :func:`check` finds those drops in the final ``.config``
(KernelCI's kselftest fragment that was silently not merged is the cautionary tale).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .kerrors import KernelBuildError

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


class ConfigFragmentError(KernelBuildError):
    """``olddefconfig`` dropped or changed fragment lines; ``dropped`` lists them as
    ``(line, what the final .config has)`` pairs (``None``: the symbol is absent)."""

    def __init__(self, dropped: list[tuple[str, str | None]], config: Path) -> None:
        self.dropped = dropped
        self.config = config
        lines = "\n".join(f"  {want}  ->  {got or 'absent'}" for want, got in dropped)
        super().__init__(f"{len(dropped)} config fragment line(s) did not survive "
                         f"olddefconfig (final config: {config}):\n{lines}")


@dataclass(frozen=True)
class Option:
    """One fragment line: ``value`` is the text after ``=`` (``y``, ``m``, ``"str"``, a
    number) or ``None`` for ``# CONFIG_X is not set``."""

    symbol: str
    value: str | None
    line: str


def parse(text: str) -> dict[str, Option]:
    """The options set by ``text`` (a fragment or a whole ``.config``), by symbol.

    A later line for the same symbol wins, as in Kconfig's own reader.
    """
    out: dict[str, Option] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _SET.match(line)
        if m:
            out[m.group(1)] = Option(m.group(1), m.group(2), line)
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = Option(m.group(1), None, line)
    return out


def check(fragment_text: str, final_text: str, config: Path | None = None) -> None:
    """Raise :class:`ConfigFragmentError` unless every option of ``fragment_text`` holds
    in ``final_text`` (a ``.config`` after ``olddefconfig``).

    ``CONFIG_X=v`` holds when the final config has exactly ``CONFIG_X=v``; ``# CONFIG_X
    is not set`` holds when the final config does not set it to anything but ``n``.
    """
    final = parse(final_text)
    dropped: list[tuple[str, str | None]] = []
    for sym, want in parse(fragment_text).items():
        got = final.get(sym)
        if want.value is None:
            if got is not None and got.value not in (None, "n"):
                dropped.append((want.line, got.line))
        elif got is None or got.value != want.value:
            dropped.append((want.line, got.line if got else None))
    if dropped:
        raise ConfigFragmentError(dropped, config or Path(".config"))


def named_fragment(name: str) -> str:
    """The text of one of pinlab's fragments, ``images/kconfig/<name>.config``."""
    return resources.files("pinlab.images").joinpath("kconfig", f"{name}.config").read_text()


def pinlab_fragment() -> str:
    """The text of pinlab's own fragment (``images/kconfig/pinlab.config``): what the
    guest, pinlab.ko and every matrix cell need."""
    return named_fragment("pinlab")


def build_fragment(*, debug_info: bool, signing_keys: bool) -> str:
    """The per-build fragment: no release suffix in the config (the build passes make's
    ``LOCALVERSION`` instead: a suffix in ``.config`` would change ``autoconf.h``, which
    every object includes, and no object of one build could come from ccache for
    another), debug info on or off, and (for Debian's configs) no trusted-key files."""
    lines = ['CONFIG_LOCALVERSION=""', "# CONFIG_LOCALVERSION_AUTO is not set"]
    if debug_info:
        lines += ["CONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT=y"]
    else:
        lines += ["CONFIG_DEBUG_INFO_NONE=y"]
    if signing_keys:
        # (not SYSTEM_REVOCATION_KEYS: it exists only with SYSTEM_REVOCATION_LIST, which
        # Debian's cloud config leaves off; the fragment check caught that line dropped)
        lines += ['CONFIG_SYSTEM_TRUSTED_KEYS=""']
    return "\n".join(lines) + "\n"
