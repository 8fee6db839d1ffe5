"""The base kernel's first-pass results, kept in ``$PINLAB_CACHE`` so that the next
``pinlab validate`` against the same base does not run the base's cells again.

A developer validates patch after patch on one base: the base's matrix results are the
same every time, only the candidate changes. ``validate.py`` stores the base's first pass
(every attempt: the first and any infrastructure retry, with their artifacts) under
``$PINLAB_CACHE/validate-base/<key>/`` and, when a later run computes the same key, copies
them into its own run directory instead of booting the base. The flake policy is untouched:
a cell that differs is still re-run ``--reruns`` times on freshly booted guests on *both*
kernels (compare.py), and those reruns are never taken from or put into the cache.
``pinlab validate --no-base-cache`` neither reads nor writes the cache.

The key (``cache_key(parts)``, a digest of ``key_parts(...)``) covers everything that can
change a base attempt's record or its verdict:

* ``kernel``: the base's kernel id ("6.12" or "build:<key>"; a built kernel's id covers its
  source, patches, config and compiler, ``images/kbuild.py``) and the image cache
  manifest's keys of what boots: the kernel image (``kernel-<name>`` or ``kbuild-<key>``
  and ``kbuild-image-<key>``: release, initramfs, modules disk), the rootfs and the QEMU
  runtime (its manifest key and the version of the QEMU that runs, which ``PINLAB_QEMU``
  can change);
* ``kmod``: SHA-256 of the ``pinlab.ko`` the guests load;
* ``expectations``: SHA-256 of ``orchestrator/data/expectations.toml`` and the Debian
  kernel whose rows apply to the base (an attempt records its expected class);
* ``harm``: SHA-256 of ``orchestrator/data/harm.toml`` (which classes are infrastructure,
  hence retried, and which kernel-log signatures are errors);
* ``code``: pinlab's version and a digest of the code that runs and judges a cell: every
  file under ``common/``, ``device/``, ``guest/``, ``images/init/``, ``kmod/`` and
  ``orchestrator/`` (the classifier, the dmesg signatures, the pools, the guest agent and
  cell code, the guest configuration). Not the git commit: a commit that only touches the
  README or the tests keeps the key, and uncommitted edits of that code change it;
* ``accel``: ``tcg`` or ``kvm`` (``accel.choose_accel``): timing-dependent cells can differ;
* ``selection``: the ordered cell ids and ``infra_retries``. The cells run one after
  another in the same warm guest, and a WARN_ON_ONCE fires once per boot
  (include/asm-generic/bug.h), so a cell's kernel log depends on the cells before it: the
  same cell in another slice is another experiment.

An entry is written only when every cell of the base has a usable (non-infrastructure)
attempt: a base with an ``infra-error`` left is run again next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "pinlab-validate-base/1"
REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ("common", "device", "guest", "images/init", "kmod", "orchestrator")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _code_files(root: Path) -> list[Path]:
    """The files under ``CODE_DIRS``: ``git ls-files`` (tracked and untracked, not ignored:
    no build output) in a git checkout, otherwise every file but bytecode and dot-files."""
    ls = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard",
                         "--", *CODE_DIRS], capture_output=True, text=True, check=False)
    if ls.returncode == 0 and (root / ".git").exists():
        return sorted(root / line for line in ls.stdout.splitlines()
                      if (root / line).is_file())
    return sorted(p for d in CODE_DIRS if (root / d).is_dir() for p in (root / d).rglob("*")
                  if p.is_file() and not any(x.startswith(".") or x == "__pycache__"
                                             for x in p.relative_to(root).parts)
                  and p.suffix != ".pyc")


def code_digest(root: Path = REPO) -> str:
    """SHA-256 over the relative path and contents of every file under ``CODE_DIRS`` of
    ``root`` (``_code_files``; uncommitted edits count). Raises FileNotFoundError if there
    is none."""
    files = _code_files(root)
    if not files:
        raise FileNotFoundError(f"no cell code under {root} ({', '.join(CODE_DIRS)})")
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def key_parts(*, kernel: dict[str, Any], kmod: str, expectations: dict[str, Any],
              harm: str, code: dict[str, Any], accel: str, cells: list[str],
              infra_retries: int) -> dict[str, Any]:
    """The key's parts as one JSON-able dict (recorded beside the entry, so a reader can
    see what a cached base was run with). ``cells``: the cell ids in run order."""
    return {"format": FORMAT, "kernel": kernel, "kmod": kmod, "expectations": expectations,
            "harm": harm, "code": code, "accel": accel,
            "selection": {"cells": list(cells), "infra_retries": infra_retries}}


def cache_key(parts: dict[str, Any]) -> str:
    """24 hex digits of SHA-256 over the canonical JSON of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def base_parts(kernel: str, expectations_kernel: str | None, cells: list[str],
               infra_retries: int) -> dict[str, Any]:
    """``key_parts`` of a base kernel as this machine would run it now: reads the image
    cache manifest, builds or finds the images (``ensure_images``), hashes pinlab.ko, the
    tables and the cell code, and asks ``choose_accel`` (its KVM probe is cached per host
    boot). Raises what ``ensure_images`` raises for an unknown or unbuilt kernel."""
    from importlib import metadata

    from pinlab.images.build import ensure_images
    from pinlab.images.cache import Cache
    from pinlab.images.kernel import is_kernel_id

    from .accel import choose_accel

    cache = Cache.default()
    images = ensure_images(kernel)

    def key_of(name: str) -> str | None:
        e = cache.entry(name) or {}
        return e.get("key")  # type: ignore[return-value]

    if is_kernel_id(kernel):
        k = kernel.split(":", 1)[1]
        image = {"build": key_of(f"kbuild-{k}"), "image": key_of(f"kbuild-image-{k}")}
    else:
        image = {"kernel": key_of(f"kernel-{kernel}")}
    data = REPO / "orchestrator" / "data"
    try:
        version = metadata.version("pinlab")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return key_parts(
        kernel={"id": kernel, "release": images.kernel.release, **image,
                "rootfs": key_of("rootfs"), "qemu": key_of("qemu"),
                "qemu_version": images.qemu.version},
        kmod=_sha256(images.kmod),
        expectations={"table": _sha256(data / "expectations.toml"),
                      "kernel": expectations_kernel},
        harm=_sha256(data / "harm.toml"),
        code={"version": version, "sha256": code_digest()},
        accel=choose_accel(images, cache)[0], cells=cells, infra_retries=infra_retries)


def cache_root() -> Path:
    """``$PINLAB_CACHE/validate-base``."""
    from pinlab.images.cache import cache_root as root

    return root() / "validate-base"


@dataclass(frozen=True)
class BaseCache:
    """One entry of the cache: ``root/<key>/`` holds ``base.json`` (the key's parts, where
    and when it was recorded, and ``cells``: cell id -> its first-pass attempt records) and
    ``attempts/<cell>/attempt-<n>/`` (their artifacts)."""
    root: Path
    key: str
    parts: dict[str, Any]

    @classmethod
    def for_parts(cls, parts: dict[str, Any], root: Path | None = None) -> BaseCache:
        return cls(root or cache_root(), cache_key(parts), parts)

    @property
    def path(self) -> Path:
        return self.root / self.key

    def load(self) -> dict[str, Any] | None:
        """The entry, or None if there is none (or it is unreadable, or its recorded
        parts are not this key's: a half-written or foreign directory is never used)."""
        try:
            doc = json.loads((self.path / "base.json").read_text())
        except (OSError, ValueError):
            return None
        if doc.get("format") != FORMAT or doc.get("parts") != self.parts:
            return None
        return doc

    def restore(self, doc: dict[str, Any], cell: str, dest: Path) -> list[dict[str, Any]]:
        """The cached attempts of ``cell``, their artifacts copied to
        ``dest/attempt-<n>/`` (the run directory stands alone); each record gets
        ``artifacts`` pointing there and ``cached`` naming the entry and the run that
        recorded it. Raises KeyError if the entry has no such cell."""
        out = []
        for rec in doc["cells"][cell]:
            rec = dict(rec)
            src = self.path / "attempts" / cell.replace("/", "__") / f"attempt-{rec['n']}"
            dst = dest / f"attempt-{rec['n']}"
            if dst.exists():
                shutil.rmtree(dst)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                dst.mkdir(parents=True)
            rec["artifacts"] = str(dst)
            rec["cached"] = {"key": self.key, "run": doc.get("run"),
                             "recorded": doc.get("recorded")}
            out.append(rec)
        return out

    def store(self, attempts: dict[str, list[dict[str, Any]]], run: Path,
              is_infra: Any) -> bool:
        """Write the entry from ``attempts`` (cell id -> first-pass attempt records, whose
        ``artifacts`` directories are copied). Returns False, writing nothing, when a
        cell has no usable attempt (``is_infra(observed)`` true for all). The entry
        appears atomically (a temporary directory renamed into place); an entry another
        run wrote meanwhile is kept."""
        if any(all(is_infra(a["observed"]) for a in recs) or not recs
               for recs in attempts.values()):
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.key}-", dir=self.root))
        try:
            for cell, recs in attempts.items():
                for rec in recs:
                    src = Path(rec["artifacts"])
                    dst = tmp / "attempts" / cell.replace("/", "__") / f"attempt-{rec['n']}"
                    if src.is_dir():
                        shutil.copytree(src, dst)
            doc = {"format": FORMAT, "key": self.key, "parts": self.parts,
                   "run": str(run), "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()),
                   "cells": attempts}
            (tmp / "base.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
            try:
                os.rename(tmp, self.path)
            except OSError:        # another run stored the same key first: keep that one
                return self.path.is_dir()
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
