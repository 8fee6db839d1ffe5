"""Building pinlab.ko for one kernel, in that kernel's own build root and compiler."""

from __future__ import annotations

import shutil
from pathlib import Path

from .cache import Cache, digest
from .kernel import Kernel
from .steps import run

SOURCE_SUFFIXES = {".c", ".h"}


def kmod_source() -> Path:
    """The repository's kmod/ directory (the module is built from a checkout)."""
    here = Path(__file__).resolve().parent.parent / "kmod"
    if not (here / "Makefile").exists():
        raise FileNotFoundError(f"kmod sources not found at {here}")
    return here


def _sources(src: Path) -> list[Path]:
    def wanted(p: Path) -> bool:
        named = p.suffix in SOURCE_SUFFIXES or p.name in ("Makefile", "Kbuild")
        return p.is_file() and named and not p.name.endswith(".mod.c")

    return sorted(p for p in src.rglob("*") if wanted(p))


def ensure_kmod(cache: Cache, kernel: Kernel) -> Path:
    """pinlab.ko of the checkout's kmod/ for ``kernel``: built once per source, release and
    build recipe, in ``$PINLAB_CACHE/kmod/<kernel>/<key>/pinlab.ko``. The key is in the
    path, so worktrees with different module sources sharing one cache never get each
    other's module; the manifest's ``kmod-<kernel>`` entry names the key last asked for
    (what verdicts.json reports). Raises what the build step raises (its log in
    ``logs/kmod-<kernel>.log``)."""
    src = kmod_source()
    files = _sources(src)
    key = digest("kmod-v1", kernel.release,
                 *[(str(f.relative_to(src)), f.read_bytes()) for f in files])
    out = cache.path("kmod", kernel.name, key, "pinlab.ko")
    counted = out.parent / "warnings"
    if out.exists() and counted.exists():
        if (cache.entry(f"kmod-{kernel.name}") or {}).get("key") != key:
            cache.record(f"kmod-{kernel.name}", key, release=kernel.release,
                         warnings=int(counted.read_text() or 0))
        return out
    work = kernel.buildroot / "tmp/pinlab-kmod"
    if work.exists():
        shutil.rmtree(work)
    for f in files:
        dst = work / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    log = cache.logs() / f"kmod-{kernel.name}.log"
    log.unlink(missing_ok=True)
    # A private mount namespace gives the build a /proc (objtool reads it on 7.x) that
    # disappears with the build, whatever happens to it.
    root = kernel.buildroot
    script = (f"mount -t proc proc {root}/proc && exec chroot {root} "
              f"make -C {kernel.headers} M=/tmp/pinlab-kmod modules")
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        log=log, title=f"pinlab.ko for {kernel.release}")
    text = log.read_text(errors="replace")
    warnings = [line for line in text.splitlines() if "warning:" in line]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".ko.tmp")
    shutil.copy(work / "pinlab.ko", tmp)
    tmp.replace(out)
    counted.write_text(str(len(warnings)))
    cache.record(f"kmod-{kernel.name}", key, release=kernel.release, warnings=len(warnings))
    return out
