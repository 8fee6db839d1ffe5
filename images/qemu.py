"""The QEMU that serves guests: the host's when it has ``vfio-user-pci``, else our own.

Debian 12's QEMU (7.2) has no vfio-user client. Then QEMU 11.1 from trixie-backports is
installed into the cache with mmdebstrap and run from there through that tree's own dynamic
loader: no chroot, and nothing changes on the host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .cache import Cache, digest
from .debian import Suite, Tree, mmdebstrap

RECIPE = "qemu-v1"
SUITE = Suite("trixie", extra_suites=("trixie-backports",), prefer="trixie-backports")
MIN_VERSION = (10, 1)


@dataclass(frozen=True)
class QemuRuntime:
    """How to start qemu-system-x86_64: an argv prefix plus environment."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    version: str = ""
    origin: str = "host"  # "host" or the cache path of the private tree

    def command(self, *args: str) -> list[str]:
        return [*self.argv, *args]

    def probe(self, *args: str, timeout: float = 30) -> str:
        out = subprocess.run(self.command(*args), capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, **self.env}, check=False)
        return out.stdout + out.stderr


def _version(text: str) -> tuple[int, ...]:
    m = re.search(r"version (\d+)\.(\d+)\.?(\d*)", text)
    return tuple(int(x) for x in m.groups() if x) if m else ()


def _usable(rt: QemuRuntime) -> QemuRuntime | None:
    try:
        ver = rt.probe("--version")
        if _version(ver)[:2] < MIN_VERSION:
            return None
        if "vfio-user-pci" not in rt.probe("-device", "help"):
            return None
    except (OSError, subprocess.TimeoutExpired):
        return None
    return QemuRuntime(rt.argv, rt.env, ver.splitlines()[0], rt.origin)


def tree_runtime(root: Path) -> QemuRuntime:
    """A runtime that runs the binaries of an unpacked Debian tree through its own ld.so."""
    libdirs = [root / "usr/lib/x86_64-linux-gnu", root / "lib/x86_64-linux-gnu"]
    argv = (
        str(root / "lib64/ld-linux-x86-64.so.2"),
        "--library-path", ":".join(str(d) for d in libdirs if d.is_dir()),
        str(root / "usr/bin/qemu-system-x86_64"),
        "-L", str(root / "usr/share/qemu"),
        "-L", str(root / "usr/share/seabios"),
    )
    env = {"QEMU_MODULE_DIR": str(root / "usr/lib/x86_64-linux-gnu/qemu")}
    return QemuRuntime(argv, env, origin=str(root))


def _relink_absolute(root: Path) -> None:
    """Point absolute symlinks inside the tree at the tree, not at the host."""
    for dirpath, dirnames, filenames in os.walk(root / "usr/share"):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                target = os.readlink(p)
                if target.startswith("/"):
                    p.unlink()
                    p.symlink_to(os.path.relpath(root / target.lstrip("/"), p.parent))


def ensure_qemu(cache: Cache, *, force_private: bool = False) -> QemuRuntime:
    """Return a QEMU with vfio-user-pci, building the private tree when needed."""
    override = os.environ.get("PINLAB_QEMU")
    if override:
        rt = _usable(QemuRuntime((override,)))
        if not rt:
            raise RuntimeError(f"PINLAB_QEMU={override} is not a QEMU >= 10.1 with vfio-user-pci")
        return rt
    host = shutil.which("qemu-system-x86_64")
    if host and not force_private:
        rt = _usable(QemuRuntime((host,)))
        if rt:
            return rt
    root = cache.path("qemu", "trixie-backports")
    key = digest(RECIPE, SUITE)
    if not cache.fresh("qemu", key, [root / "usr/bin/qemu-system-x86_64"]):
        mmdebstrap(Tree(SUITE, root, include=["qemu-system-x86"]),
                   log=cache.logs() / "qemu.log",
                   title="QEMU 11.1 runtime from trixie-backports")
        _relink_absolute(root)
        rt = _usable(tree_runtime(root))
        if not rt:
            raise RuntimeError(f"the QEMU unpacked in {root} lacks vfio-user-pci")
        cache.record("qemu", key, version=rt.version, path=str(root))
    rt = _usable(tree_runtime(root))
    if not rt:
        raise RuntimeError(f"the QEMU in {root} does not run; remove it and rebuild")
    return rt
