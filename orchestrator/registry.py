"""The running ``pinlab up`` guests, by name: one JSON state file per guest.

``pinlab up`` writes ``<dir>/<name>.json`` once its guest is ready and removes it when it
tears down; ``pinlab ssh|run|replug|qmp|down|ps`` read it. ``<dir>`` is
``$PINLAB_GUESTS_DIR``, default ``$PINLAB_CACHE/guests``. An entry whose ``up`` process is
gone (killed with SIGKILL, machine rebooted) is stale: ``entries()`` reports it as such and
``prune()`` removes it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pinlab.images.cache import cache_root

from .procs import process_alive

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class RegistryError(RuntimeError):
    """No such guest, an ambiguous name, or a name already taken; the message says which
    guests there are."""


@dataclass
class GuestEntry:
    """What the commands beside ``up`` need to reach one guest. Paths are absolute."""

    name: str
    pid: int                    # the ``pinlab up`` process
    kernel: str                 # pinlab kernel name (6.12, 6.1, 7)
    release: str                # uname -r in the guest
    ssh_port: int               # on 127.0.0.1
    client_key: str
    known_hosts: str            # the guest's pinned host key, for OpenSSH
    host_key_pub: str
    control: str                # the up process's request socket (replug, down)
    qmp_human: str              # QEMU's QMP socket for humans (qmp-shell)
    device_control: str = ""    # the device server's QMP control socket; "" without device
    device_socket: str = ""
    console: str = ""
    artifacts: str = ""
    irq: str = ""               # msi | msix; "" without device
    gdb: str = ""               # host:port of QEMU's gdbstub; "" without
    vmlinux: str = ""           # the matching debug vmlinux, when found
    cell: str = ""              # MODE/BACKING/EVENT prepared with --cell
    started: float = 0.0        # time.time()
    extra: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        return process_alive(self.pid) and Path(self.control).exists()


def guests_dir() -> Path:
    env = os.environ.get("PINLAB_GUESTS_DIR")
    return Path(env) if env else cache_root() / "guests"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise RegistryError(f"bad guest name {name!r}: letters, digits, '.', '_' and '-', "
                            "at most 32, starting with a letter or digit")
    return name


def path_of(name: str) -> Path:
    return guests_dir() / f"{check_name(name)}.json"


def load(name: str) -> GuestEntry:
    """The entry of ``name``; RegistryError when there is none."""
    p = path_of(name)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise RegistryError(f"no guest named {name!r} is up ({_known()})") from None
    except ValueError as exc:
        raise RegistryError(f"{p}: unreadable state file: {exc}") from None
    return GuestEntry(**data)


def entries() -> list[tuple[GuestEntry, bool]]:
    """Every entry with whether it is alive (False: stale), sorted by name."""
    out = []
    d = guests_dir()
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            e = GuestEntry(**json.loads(p.read_text()))
        except (ValueError, TypeError):
            continue
        out.append((e, e.alive()))
    return out


def prune() -> list[str]:
    """Remove stale entries; returns their names."""
    gone = []
    for e, alive in entries():
        if not alive:
            path_of(e.name).unlink(missing_ok=True)
            gone.append(e.name)
    return gone


def _known() -> str:
    live = [e.name for e, alive in entries() if alive]
    return f"running: {', '.join(live)}" if live else "none is running; start one with " \
        "`pinlab up`"


def resolve(name: str | None) -> GuestEntry:
    """The live guest called ``name``, or the only live guest when ``name`` is None.
    Raises RegistryError (none, several, stale)."""
    if name is not None:
        e = load(name)
        if not e.alive():
            raise RegistryError(f"guest {name!r} is stale: its `pinlab up` (pid {e.pid}) is "
                                f"gone; `pinlab ps` removes the entry")
        return e
    live = [e for e, alive in entries() if alive]
    if not live:
        raise RegistryError("no guest is up; start one with `pinlab up`")
    if len(live) > 1:
        raise RegistryError("several guests are up, name one: "
                            + ", ".join(e.name for e in live))
    return live[0]


def free_name(base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... the first not held by a live guest."""
    taken = {e.name for e, alive in entries() if alive}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return check_name(name)


def register(entry: GuestEntry) -> Path:
    """Write the entry; RegistryError when a live guest already has that name."""
    p = path_of(entry.name)
    if p.exists():
        try:
            old = load(entry.name)
        except RegistryError:
            old = None
        if old is not None and old.pid != entry.pid and old.alive():
            raise RegistryError(f"a guest named {entry.name!r} is already up (pid {old.pid})")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(entry), indent=2) + "\n")
    tmp.replace(p)
    return p


def unregister(name: str, pid: int) -> None:
    """Remove the entry if it is still the one ``pid`` wrote."""
    p = path_of(name)
    try:
        if json.loads(p.read_text()).get("pid") == pid:
            p.unlink()
    except (FileNotFoundError, ValueError):
        pass
