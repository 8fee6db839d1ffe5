"""Kernel sources for a build: a git tree at a revision, Debian's ``linux-source-X``
package, and the patches applied on top. The user's checkout is never modified: git trees
are cloned (``git clone --shared``) and Debian sources unpacked into the cache.

Debian sources come from the ``linux-source-X`` binary package (the Debian-patched tarball
``/usr/src/linux-source-X.tar.xz``) and ``linux-config-X`` (``config.amd64_none_*.xz``),
fetched with ``apt-get download`` against a private apt state in the cache (the same
releases the guest kernels come from, see :mod:`pinlab.images.kernel`: 6.1 = bookworm,
6.12 = trixie, 7 = trixie-backports), so nothing on the host's apt configuration changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .cache import Cache, digest
from .debian import MIRROR
from .kerrors import KernelBuildError
from .steps import BuildError, run

# linux-source-X per Debian kernel name, and the suite that carries it
DEBIAN_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "6.1": ("6.1", ("bookworm",)),
    "6.12": ("6.12", ("trixie",)),
    "7": ("", ("trixie-backports",)),  # version found in the suite: linux-source-7.x
}
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "pinlab", "GIT_AUTHOR_EMAIL": "pinlab@localhost",
                "GIT_COMMITTER_NAME": "pinlab", "GIT_COMMITTER_EMAIL": "pinlab@localhost",
                "GIT_COMMITTER_DATE": "2025-01-01T00:00:00Z"}


class KernelSourceError(KernelBuildError):
    """A kernel source cannot be had: an unknown Debian kernel, a missing tree, a revision
    git does not know, an apt failure."""


class PatchApplyError(KernelSourceError):
    """A patch does not apply. ``patch`` is the file, ``hunk`` the failing hunk's text (as
    far as it could be found), ``output`` what git said."""

    def __init__(self, patch: Path, output: str, hunk: str) -> None:
        self.patch, self.output, self.hunk = patch, output, hunk
        msg = f"patch {patch} does not apply:\n{output.strip()}"
        if hunk:
            msg += f"\n--- failing hunk ---\n{hunk.rstrip()}"
        super().__init__(msg)


@dataclass(frozen=True)
class SourceSpec:
    """Where a kernel's source comes from.

    ``kind`` "git": ``tree`` a git repository, ``rev`` resolved to a commit by
    :func:`resolve`; ``kind`` "debian": ``rev`` the Debian kernel name ("6.1", "6.12", "7")
    and, once resolved, ``version`` the package version.
    """

    kind: str
    rev: str
    tree: Path | None = None
    commit: str = ""
    version: str = ""

    @property
    def ident(self) -> str:
        """A stable identity for cache keys: the commit or the package version."""
        if self.kind == "git":
            return f"git:{self.commit}"
        return f"debian:{self.rev}={self.version}"

    def describe(self) -> str:
        if self.kind == "git":
            return f"{self.tree} {self.rev} ({self.commit[:12]})"
        return f"Debian linux-source {self.rev} {self.version}"


def parse_source(text: str, tree: str | Path | None = None) -> SourceSpec:
    """``debian:6.12`` or a git revision in ``tree``."""
    if text.startswith("debian:"):
        name = text.split(":", 1)[1]
        if name not in DEBIAN_SOURCES:
            raise KernelSourceError(f"unknown Debian kernel {name!r} "
                                    f"(known: {', '.join(DEBIAN_SOURCES)})")
        return SourceSpec("debian", name)
    if tree is None:
        raise KernelSourceError(f"revision {text!r} needs --tree (a git checkout of Linux)")
    return SourceSpec("git", text, Path(tree).resolve())


def _git(tree: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    r = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                       env=full, check=False)
    if check and r.returncode != 0:
        raise KernelSourceError(f"git {' '.join(args)} in {tree}: {r.stderr.strip()}")
    return r


# -- Debian ------------------------------------------------------------------------------
class DebianArchive:
    """A private apt state (lists, archives) under ``$PINLAB_CACHE/kbuild/apt/<suite>``."""

    def __init__(self, cache: Cache, suites: tuple[str, ...]) -> None:
        self.cache = cache
        self.suites = suites
        self.dir = cache.path("kbuild", "apt", suites[0])

    def _opts(self) -> list[str]:
        d = self.dir
        return ["-q", "-o", f"Dir::Etc::sourcelist={d / 'sources.list'}",
                "-o", "Dir::Etc::sourceparts=-", "-o", f"Dir::State::lists={d / 'lists'}",
                "-o", f"Dir::Cache={d / 'cache'}", "-o", f"Dir::State::status={d / 'status'}",
                "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]

    def update(self, refresh: bool = False) -> None:
        lists = self.dir / "lists"
        if not refresh and any(lists.glob("*_Packages*")):
            return
        for sub in ("lists/partial", "cache/archives/partial", "debs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "status").touch()
        (self.dir / "sources.list").write_text(
            "".join(f"deb {MIRROR} {s} main\n" for s in self.suites))
        run(["apt-get", *self._opts(), "update"], log=self.cache.logs() / "kbuild-apt.log",
            title=f"apt lists for {' '.join(self.suites)}")

    def candidate(self, package: str) -> str:
        """The version apt would download for ``package`` ("" if none)."""
        r = subprocess.run(["apt-cache", *self._opts(), "policy", package],
                           capture_output=True, text=True, check=False)
        m = re.search(r"Candidate:\s*(\S+)", r.stdout)
        return m.group(1) if m and m.group(1) != "(none)" else ""

    def newest_source_package(self) -> str:
        """The newest ``linux-source-X`` package name in these suites."""
        r = subprocess.run(["apt-cache", *self._opts(), "pkgnames", "linux-source-"],
                           capture_output=True, text=True, check=False)
        names = [n for n in r.stdout.split() if re.fullmatch(r"linux-source-[0-9.]+", n)]
        if not names:
            raise KernelSourceError(f"no linux-source package in {' '.join(self.suites)}")
        return max(names, key=lambda n: [int(x) for x in n.split("-")[-1].split(".")])

    def download(self, package: str, version: str) -> Path:
        debs = self.dir / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        have = sorted(debs.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
        if have:
            return have[0]
        run(["sh", "-c", f"cd {debs} && apt-get {' '.join(self._opts())} download "
             f"{package}={version}"], log=self.cache.logs() / "kbuild-apt.log",
            title=f"download {package} {version}")
        have = sorted(debs.glob(f"{package}_*.deb"))
        if not have:
            raise KernelSourceError(f"apt-get download {package}={version} left no .deb")
        return have[0]


def resolve(cache: Cache, spec: SourceSpec, refresh: bool = False) -> SourceSpec:
    """Fill in ``commit`` (git) or ``version`` (Debian)."""
    if spec.kind == "git":
        assert spec.tree is not None
        if not (spec.tree / ".git").exists() and not (spec.tree / "HEAD").exists():
            raise KernelSourceError(f"{spec.tree} is not a git tree")
        r = _git(spec.tree, "rev-parse", "--verify", "--quiet", f"{spec.rev}^{{commit}}",
                 check=False)
        if r.returncode != 0:
            raise KernelSourceError(f"{spec.tree}: unknown revision {spec.rev!r}")
        return SourceSpec("git", spec.rev, spec.tree, commit=r.stdout.strip())
    ver, suites = DEBIAN_SOURCES[spec.rev]
    archive = DebianArchive(cache, suites)
    try:
        archive.update(refresh)
    except BuildError as exc:
        raise KernelSourceError(f"apt for {' '.join(suites)}: {exc}") from exc
    pkg = f"linux-source-{ver}" if ver else archive.newest_source_package()
    version = archive.candidate(pkg)
    if not version:
        raise KernelSourceError(f"{pkg} is not in {' '.join(suites)}")
    return SourceSpec("debian", spec.rev, None, version=f"{pkg.split('-')[-1]}_{version}")


def debian_source(cache: Cache, spec: SourceSpec) -> Path:
    """The unpacked, pristine Debian source of ``spec`` (resolved): a directory with
    ``src/`` (the kernel tree) and the ``config.amd64_none_*`` files of ``linux-config-X``.
    Unpacked once; never built in (builds copy it)."""
    series, version = spec.version.split("_", 1)
    d = cache.path("kbuild", "sources", f"debian-{series}_{version}")
    if (d / "src" / "Makefile").exists():
        return d
    _, suites = DEBIAN_SOURCES[spec.rev]
    archive = DebianArchive(cache, suites)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log = cache.logs() / "kbuild-source.log"
    src_deb = archive.download(f"linux-source-{series}", version)
    run(["dpkg-deb", "-x", src_deb, tmp / "pkg"], log=log, title=f"unpack {src_deb.name}")
    cfg_version = archive.candidate(f"linux-config-{series}")
    if cfg_version:  # Debian ships it for the main archive's kernels
        cfg_deb = archive.download(f"linux-config-{series}", cfg_version)
        run(["dpkg-deb", "-x", cfg_deb, tmp / "cfg"], log=log, title=f"unpack {cfg_deb.name}")
        import lzma

        for xz in (tmp / "cfg").rglob("config.amd64_*.xz"):
            (tmp / xz.name.removesuffix(".xz")).write_bytes(lzma.decompress(xz.read_bytes()))
    tarballs = sorted((tmp / "pkg").rglob("linux-source-*.tar.*"))
    if not tarballs:
        raise KernelSourceError(f"{src_deb.name} has no linux-source tarball")
    run(["tar", "-C", tmp, "-xf", tarballs[0]], log=log, title=f"unpack {tarballs[0].name}")
    top = [p for p in tmp.iterdir() if p.is_dir() and (p / "Makefile").exists()]
    if len(top) != 1:
        raise KernelSourceError(f"{tarballs[0].name}: expected one kernel tree, got {top}")
    top[0].rename(tmp / "src")
    shutil.rmtree(tmp / "pkg")
    shutil.rmtree(tmp / "cfg", ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return d


# -- trees ---------------------------------------------------------------------------------
def copy_tree(src: Path, dst: Path) -> None:
    """A real copy keeping modification times (``cp -a``): a copy of a built tree rebuilds
    only what a later patch or checkout touches. No hard links: Kbuild rewrites files
    such as ``.cmd`` in place, which would write through into the source."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["cp", "-a", str(src), str(dst)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise KernelSourceError(f"cp -a {src} {dst}: {r.stderr.strip()}")


def git_checkout(spec: SourceSpec, dst: Path, seeded: bool) -> None:
    """``dst`` at ``spec.commit``: a ``git clone --shared`` of the user's tree (objects
    borrowed, the user's repository untouched), or, when ``seeded`` (``dst`` is a copy of
    another built clone), a checkout there, which touches only the files that differ."""
    assert spec.tree is not None
    if not seeded:
        shutil.rmtree(dst, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(spec.tree),
                            str(dst)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise KernelSourceError(f"git clone --shared {spec.tree}: {r.stderr.strip()}")
    else:
        _git(dst, "fetch", "-q", str(spec.tree), spec.commit, check=False)
        _git(dst, "am", "--abort", check=False)
    _git(dst, "checkout", "-q", "--force", "--detach", spec.commit)


_FAILED = re.compile(r"patch failed: (\S+?):(\d+)")
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def failing_hunk(patch_text: str, path: str, line: int) -> str:
    """The hunk of ``patch_text`` for ``path`` whose old range starts at ``line`` (git's
    "patch failed: PATH:LINE"), after its file's ``+++`` header; "" if there is none.
    Hunk lengths come from the ``@@`` line's counts, so removed lines that look like
    headers (``--- ...``) are kept."""
    lines = patch_text.splitlines()
    current = ""
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("+++ "):
            name = ln[4:].split("\t")[0]
            current = name[2:] if name.startswith("b/") else name
        m = _HUNK.match(ln)
        if not m:
            i += 1
            continue
        old = int(m.group(2)) if m.group(2) is not None else 1
        new = int(m.group(3)) if m.group(3) is not None else 1
        body: list[str] = []
        j = i + 1
        while j < len(lines) and (old > 0 or new > 0):
            b = lines[j]
            if b.startswith("-"):
                old -= 1
            elif b.startswith("+"):
                new -= 1
            elif b.startswith("\\"):
                pass
            else:  # context (a blank context line may have lost its space)
                old -= 1
                new -= 1
            body.append(b)
            j += 1
        if current == path and int(m.group(1)) == line:
            return "\n".join([f"+++ b/{path}", ln, *body])
        i = j
    return ""


def _patch_error(patch: Path, output: str) -> PatchApplyError:
    m = _FAILED.search(output)
    hunk = ""
    if m:
        hunk = failing_hunk(patch.read_text(errors="replace"), m.group(1), int(m.group(2)))
    return PatchApplyError(patch, output, hunk)


def apply_patches(tree: Path, patches: list[Path], *, git_am: bool) -> None:
    """Apply ``patches`` in order: ``git am`` in a git clone (each patch a commit; an mbox
    series is one file), ``git apply`` in an unpacked tree. Raises
    :class:`PatchApplyError` with the failing hunk on the first that does not apply."""
    for p in patches:
        if not p.is_file():
            raise KernelSourceError(f"no such patch: {p}")
        if git_am:
            r = _git(tree, "am", "--quiet", "--no-gpg-sign", str(p.resolve()), check=False,
                     env=GIT_IDENTITY)
            if r.returncode != 0:
                out = r.stdout + r.stderr
                _git(tree, "am", "--abort", check=False)
                raise _patch_error(p, out)
        else:
            # outside a repository git apply is a patch tool; the ceiling keeps it from
            # finding a repository above the tree (it would apply relative to that)
            r = subprocess.run(["git", "apply", "--verbose", "-p1", str(p.resolve())],
                               cwd=tree, capture_output=True, text=True, check=False,
                               env={**os.environ, "GIT_CEILING_DIRECTORIES":
                                    str(tree.resolve().parent)})
            if r.returncode != 0:
                raise _patch_error(p, r.stdout + r.stderr)


def check_patches(tree: Path, patches: list[Path]) -> None:
    """Check, without changing anything, that ``patches`` apply in order on ``tree`` (an
    unpacked source): a series that cannot apply fails before a tree is copied. Raises
    :class:`PatchApplyError` naming the patch that holds the failing hunk."""
    if not patches:
        return
    for p in patches:
        if not p.is_file():
            raise KernelSourceError(f"no such patch: {p}")
    r = subprocess.run(["git", "apply", "--check", "--verbose", "-p1",
                        *[str(p.resolve()) for p in patches]], cwd=tree, capture_output=True,
                       text=True, check=False,
                       env={**os.environ, "GIT_CEILING_DIRECTORIES": str(tree.resolve().parent)})
    if r.returncode == 0:
        return
    out = r.stdout + r.stderr
    m = _FAILED.search(out)
    if m:
        for p in patches:
            hunk = failing_hunk(p.read_text(errors="replace"), m.group(1), int(m.group(2)))
            if hunk:
                raise PatchApplyError(p, out, hunk)
    raise PatchApplyError(patches[-1] if len(patches) == 1 else patches[0], out, "")


def patch_identity(patches: list[Path]) -> list[str]:
    """The patches' content hashes, in order: what a cache key needs (renaming or moving a
    patch file does not change the kernel). Raises :class:`KernelSourceError` if one is
    missing."""
    for p in patches:
        if not p.is_file():
            raise KernelSourceError(f"no such patch: {p}")
    return [digest(p) for p in patches]


def read_tarball_release(tarball: Path) -> str:
    """The ``lib/modules/<release>`` name inside a modules tarball."""
    with tarfile.open(tarball) as tf:
        for name in tf.getnames():
            m = re.search(r"(?:^|/)lib/modules/([^/]+)/", name)
            if m:
                return m.group(1)
    raise KernelSourceError(f"{tarball}: no lib/modules/<release>/ inside")
