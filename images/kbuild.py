"""Building test kernels (and pinlab.ko against them) that boot like the Debian kernels.

API (for ``pinlab validate`` and ``pinlab bisect``)::

    from pinlab.images import kbuild, ksource
    cache = Cache.default()
    base = kbuild.BuildSpec(ksource.parse_source("debian:6.12"), [], kbuild.ConfigSpec())
    cand = kbuild.BuildSpec(base.source, [Path("0001-x.patch")], base.config)
    base_id = kbuild.build_kernel(cache, base)            # -> "build:<16 hex>"
    cand_id = kbuild.build_kernel(cache, cand)            # seeded from base: incremental
    kbuild.kernel_id(cache, cand)                         # the id without building
    kbuild.is_built(cache, cand_id)                       # already in the image cache?
    kbuild.register_prebuilt(cache, bzimage, modules, build_dir)   # -> "build:<key>"
    kbuild.kernel_meta(cache, cand_id)   # kernel.json: release, source, patches, durations

    # a git tree: --tree PATH --base REV (--candidate REV | patches)
    b = kbuild.BuildSpec(ksource.parse_source("v6.12", tree="/src/linux"))
    c = kbuild.BuildSpec(ksource.parse_source("HEAD", tree="/src/linux"))
    base_id = kbuild.build_kernel(cache, b)
    cand_id = kbuild.build_kernel(cache, c, seed=base_id)   # copy base's tree, checkout

    # one cell on a built kernel (warm-guest pool, stopped afterwards):
    from pinlab.orchestrator.bisect import observe
    outcome, answer = observe(cand_id, ("longterm", "ext4", "truncate"), artifacts_dir)

A kernel id is accepted wherever a kernel name is (``ensure_images``, ``GuestSession.boot``,
pools, ``Cell.kernel``, ``pinlab up --kernel``). Sources: ``parse_source("debian:6.12")``
or ``parse_source(REV, tree=PATH)`` (a git tree, cloned, never modified). ``ConfigSpec``:
``base`` "small" (the default: defconfig + ``kvm_guest.config`` minus what a guest never
uses, ``images/kconfig/small.config``), "defconfig" (+ ``kvm_guest.config``), "cloud"
(Debian's cloud-amd64 config; Debian sources only) or a config file; plus pinlab's
fragment (``images/kconfig/pinlab.config``) and ``debug_info`` (off by default).

Errors, all :class:`KernelBuildError` (``pinlab validate`` maps them to exit 2):
:class:`~pinlab.images.ksource.PatchApplyError` (with the failing hunk),
:class:`~pinlab.images.ksource.KernelSourceError` (no such tree/revision/package),
:class:`~pinlab.images.kconfig.ConfigFragmentError` (fragment lines dropped by
``olddefconfig``, listed), :class:`KernelCompileError` (the build failed; the log's tail).

Layout under ``$PINLAB_CACHE``: ``kbuild/sources/`` (pristine Debian sources),
``kbuild/trees/<key>/`` (source + patches, built in place so a copy rebuilds incrementally),
``kbuild/ccache/``, ``kernels/build-<key>/`` (vmlinuz, config, modules, initramfs,
modules disk, ``build.log``, ``kernel.json`` — tuxmake-style metadata with the reproducer)
and ``kmod/build-<key>/pinlab.ko``. The key covers the source identity (commit or package
version), the patches' contents, the config base, the fragments and the compiler.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .cache import Cache, digest
from .kconfig import (
    ConfigFragmentError,
    build_fragment,
    check,
    named_fragment,
    pinlab_fragment,
)
from .kernel import BUILT_PREFIX, Kernel, initramfs_image, is_kernel_id, modules_disk
from .kerrors import KernelBuildError
from .kmod import _sources, kmod_source
from .ksource import (
    KernelSourceError,
    PatchApplyError,
    SourceSpec,
    apply_patches,
    check_patches,
    copy_tree,
    debian_source,
    git_checkout,
    patch_identity,
    resolve,
)
from .rootfs import Rootfs, guest_file
from .steps import console

RECIPE = "kbuild-v1"
PREFIX = BUILT_PREFIX
BUILD_ENV = {
    # reproducible build metadata (Documentation/kbuild/reproducible-builds.rst)
    "KBUILD_BUILD_TIMESTAMP": "2025-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "pinlab",
    "KBUILD_BUILD_HOST": "pinlab",
    "KBUILD_BUILD_VERSION": "1",
}
HOST_PACKAGES = {  # what a kernel build needs on the host: command or header -> package
    "gcc": "gcc", "make": "make", "bc": "bc", "flex": "flex", "bison": "bison",
    "perl": "perl", "depmod": "kmod", "ccache": "ccache",
    "/usr/include/libelf.h": "libelf-dev", "/usr/include/openssl/ssl.h": "libssl-dev",
}
KVM_GUEST = "kernel/configs/kvm_guest.config"
_STEP = re.compile(r"^\s{2}([A-Z][A-Z0-9_]*)\s+(\S+)")

__all__ = ["BuildSpec", "ConfigFragmentError", "ConfigSpec", "KernelBuildError",
           "KernelCompileError", "KernelSourceError", "PatchApplyError", "build_kernel",
           "ensure_built_kernel", "is_built", "is_kernel_id", "kernel_id", "kernel_meta",
           "register_prebuilt"]


class KernelCompileError(KernelBuildError):
    """A build step (config, compile, modules_install, pinlab.ko) failed: ``log`` is the
    build log, ``tail`` its last lines."""

    def __init__(self, step: str, log: Path, tail: str, code: int) -> None:
        self.step, self.log, self.tail, self.code = step, log, tail, code
        super().__init__(f"kernel build step {step!r} failed (exit {code}); log: {log}\n"
                         f"--- log tail ---\n{tail}")


@dataclass(frozen=True)
class ConfigSpec:
    """``base``: "small" (defconfig + kvm_guest.config - ``images/kconfig/small.config``:
    no display, sound, USB, wireless, NIC vendors, netfilter, NFS...), "defconfig"
    (+ kvm_guest.config), "cloud" (Debian's cloud-amd64 config, Debian sources only) or a
    path to a config file; ``fragments``: extra fragment files merged after pinlab's own
    and checked the same way; ``debug_info``: DWARF debug info (off: faster builds)."""

    base: str = "small"
    fragments: tuple[Path, ...] = ()
    debug_info: bool = False

    def identity(self) -> list[object]:
        base: object = self.base
        if self.base == "small":
            base = ("small", named_fragment("small"))
        elif self.base not in ("cloud", "defconfig"):
            base = ("file", digest(Path(self.base)))
        return [base, [digest(f) for f in self.fragments], self.debug_info,
                pinlab_fragment()]


@dataclass(frozen=True)
class BuildSpec:
    """A kernel to build: a source (resolved or not), patches in order, a config."""

    source: SourceSpec
    patches: list[Path] = field(default_factory=list)
    config: ConfigSpec = field(default_factory=ConfigSpec)


# -- ids and the registry -------------------------------------------------------------------
def _key(name: str) -> str:
    if not is_kernel_id(name):
        raise KernelSourceError(f"{name!r} is not a built kernel id (build:<16 hex digits>)")
    return name[len(PREFIX):]


def _compiler() -> str:
    r = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    return r.stdout.splitlines()[0] if r.stdout else "gcc?"


def kernel_id(cache: Cache, spec: BuildSpec) -> str:
    """The id of ``spec``'s kernel, ``build:<key>``, without building it. Resolves the
    source (git rev-parse, or apt's candidate version of ``linux-source-X``)."""
    src = spec.source if (spec.source.commit or spec.source.version) else \
        resolve(cache, spec.source)
    key = digest(RECIPE, src.ident, patch_identity(spec.patches), spec.config.identity(),
                 _compiler())
    return PREFIX + key


def _dirs(cache: Cache, key: str) -> tuple[Path, Path, Path]:
    """(build tree, artifact dir, pinlab.ko) of a key."""
    return (cache.path("kbuild", "trees", key), cache.path("kernels", f"build-{key}"),
            cache.path("kmod", f"build-{key}", "pinlab.ko"))


def _meta(cache: Cache, name: str) -> dict[str, object]:
    key = _key(name)
    path = _dirs(cache, key)[1] / "kernel.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise KernelSourceError(f"kernel {name} is not built (no {path}); build it with "
                                f"`pinlab kernel build`") from exc


def kernel_meta(cache: Cache, name: str) -> dict[str, object]:
    """A built kernel's ``kernel.json``: id, release, source, source_ident, patches
    (file, sha), config (base, checked_fragment), durations_s, ccache, reproducer.
    Raises :class:`KernelSourceError` if it is not built."""
    return _meta(cache, name)


def is_built(cache: Cache, name: str) -> bool:
    """Whether ``name``'s kernel image, modules and pinlab.ko are in the cache."""
    key = _key(name)
    _, art, ko = _dirs(cache, key)
    e = cache.entry(f"kbuild-{key}")
    return bool(e and (art / "kernel.json").exists() and (art / "vmlinuz").exists()
                and ko.exists())


def newest_built(cache: Cache) -> str | None:
    """The id of the most recently built (or registered) kernel still complete in the
    cache, or None when there is none."""
    entries = [(e["built"], f"{PREFIX}{e['key']}") for n, e in cache._load().items()
               if n.startswith("kbuild-") and not n.startswith(("kbuild-steps-",
                                                                "kbuild-image-"))]
    built = [k for _, k in sorted(entries) if is_built(cache, k)]
    return built[-1] if built else None


def built_kmod(cache: Cache, name: str) -> Path:
    return _dirs(cache, _key(name))[2]


@contextlib.contextmanager
def _build_lock(cache: Cache) -> Iterator[None]:
    """One kernel build at a time (they share ccache and 2 cores); not the image lock,
    which guests take to boot."""
    p = cache.path("kbuild", ".lock")
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"waiting for another kernel build to finish (lock {p})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- host toolchain -------------------------------------------------------------------------
def ensure_toolchain(cache: Cache) -> None:
    """Install (apt) what a kernel build needs on the host and is missing."""
    missing = sorted({pkg for what, pkg in HOST_PACKAGES.items()
                      if not (Path(what).exists() if what.startswith("/")
                              else shutil.which(what) or Path(f"/sbin/{what}").exists())})
    if not missing:
        return
    log = cache.logs() / "kbuild-apt.log"
    with open(log, "a") as out:
        r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                            *missing], stdout=out, stderr=subprocess.STDOUT, check=False,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0:
        raise KernelBuildError(f"cannot install kernel build tools {missing}; see {log}")


# -- the build -------------------------------------------------------------------------------
class _Make:
    """Runs make in a tree with the fixed build environment and ccache; logs everything
    to one file and shows a progress bar of Kbuild's step lines (CC, LD, AR, ...)."""

    def __init__(self, cache: Cache, tree: Path, log: Path, jobs: int,
                 localversion: str = "") -> None:
        self.tree, self.log, self.jobs = tree, log, jobs
        kb = cache.path("kbuild")
        # LOCALVERSION (make's, not CONFIG_LOCALVERSION): the release suffix, here in the
        # environment so every make in this tree (modules_install, M=kmod) agrees on it
        self.env = {**os.environ, **BUILD_ENV, "LOCALVERSION": localversion,
                    "CCACHE_DIR": str(kb / "ccache"),
                    "CCACHE_BASEDIR": str(kb), "CCACHE_NOHASHDIR": "1",
                    "CCACHE_MAXSIZE": os.environ.get("PINLAB_CCACHE_SIZE", "20G")}
        self.cc = "ccache gcc" if shutil.which("ccache") else "gcc"
        self.steps = 0

    def __call__(self, step: str, *targets: str, expect: int = 0, **variables: str) -> None:
        argv = ["make", f"-j{self.jobs}", f"CC={self.cc}",
                *[f"{k}={v}" for k, v in variables.items()], *targets]
        with open(self.log, "a") as out:
            out.write(f"\n$ cd {self.tree} && {' '.join(argv)}\n")
            out.flush()
            proc = subprocess.Popen(argv, cwd=self.tree, env=self.env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, errors="replace")
            assert proc.stdout is not None
            with Progress(TextColumn(f"[bold]{step}[/]"), BarColumn(),
                          TextColumn("{task.completed} steps"), TimeElapsedColumn(),
                          TextColumn("{task.description}"), console=console,
                          transient=True) as bar:
                task = bar.add_task("", total=expect or None)
                try:
                    for line in proc.stdout:
                        out.write(line)
                        m = _STEP.match(line)
                        if m:
                            self.steps += 1
                            bar.update(task, advance=1, description=m.group(2)[-50:])
                    code = proc.wait()
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
        if code != 0:
            tail = "".join(self.log.read_text(errors="replace")
                           .splitlines(keepends=True)[-30:])
            raise KernelCompileError(step, self.log, tail, code)


def _ccache_stats(env: dict[str, str]) -> dict[str, int]:
    r = subprocess.run(["ccache", "--print-stats"], capture_output=True, text=True,
                       env=env, check=False)
    out: dict[str, int] = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition("\t")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def _seed(cache: Cache, spec: BuildSpec, key: str, seed: str | None) -> Path | None:
    """A built tree to copy instead of the pristine source: ``seed``'s, or the unpatched
    build of the same source and config."""
    if seed is None and spec.patches:
        with contextlib.suppress(KernelBuildError):
            seed = kernel_id(cache, BuildSpec(spec.source, [], spec.config))
    if seed is None or _key(seed) == key:
        return None
    tree = _dirs(cache, _key(seed))[0]
    return tree if is_built(cache, seed) and (tree / "vmlinux").exists() else None


def _prepare_tree(cache: Cache, spec: BuildSpec, tree: Path, seed_tree: Path | None) -> None:
    src = spec.source
    if src.kind == "debian":
        copy_tree(seed_tree or debian_source(cache, src) / "src", tree)
        apply_patches(tree, spec.patches, git_am=False)
    else:
        if seed_tree:
            copy_tree(seed_tree, tree)
        git_checkout(src, tree, seeded=seed_tree is not None)
        apply_patches(tree, spec.patches, git_am=True)


def _configure(cache: Cache, spec: BuildSpec, tree: Path, make: _Make, key: str) -> str:
    """Write ``tree/.config``: base, merge the fragments, olddefconfig, check. Returns the
    fragment text that was checked."""
    cfg = spec.config
    pl = tree / ".pinlab"
    pl.mkdir(exist_ok=True)
    fragments: list[Path] = []
    checked_extra: list[str] = []
    if cfg.base == "cloud":
        if spec.source.kind != "debian":
            raise KernelSourceError("config base 'cloud' is Debian's cloud-amd64 config: "
                                    "only for debian: sources (use defconfig or a file)")
        base = debian_source(cache, spec.source) / "config.amd64_none_cloud-amd64"
        if not base.exists():
            raise KernelSourceError(f"Debian ships no linux-config for {spec.source.rev}; "
                                    f"use --config defconfig")
        shutil.copy(base, tree / ".config")
    elif cfg.base in ("defconfig", "small"):
        make("defconfig", "defconfig")
        fragments.append(tree / KVM_GUEST)
        if cfg.base == "small":
            small = named_fragment("small")
            (pl / "small.config").write_text(small)
            fragments.append(pl / "small.config")
            checked_extra.append(small)
    else:
        shutil.copy(cfg.base, tree / ".config")
    checked = "\n".join([*checked_extra, pinlab_fragment()])
    (pl / "pinlab.config").write_text(pinlab_fragment())
    fragments.append(pl / "pinlab.config")
    for f in cfg.fragments:
        text = Path(f).read_text()
        checked += "\n" + text
        dst = pl / f"extra-{len(fragments)}.config"
        dst.write_text(text)
        fragments.append(dst)
    own = build_fragment(debug_info=cfg.debug_info,
                         signing_keys=cfg.base == "cloud")
    (pl / "build.config").write_text(own)
    fragments.append(pl / "build.config")
    checked += "\n" + own
    merge = ["scripts/kconfig/merge_config.sh", "-m", "-O", ".", ".config",
             *[str(f.relative_to(tree)) for f in fragments]]
    with open(make.log, "a") as out:
        out.write(f"\n$ {' '.join(merge)}\n")
        out.flush()
        r = subprocess.run(merge, cwd=tree, stdout=out, stderr=subprocess.STDOUT,
                           env=make.env, check=False)
    if r.returncode != 0:
        raise KernelCompileError("merge_config.sh", make.log, "", r.returncode)
    make("olddefconfig", "olddefconfig")
    check(checked, (tree / ".config").read_text(), tree / ".config")
    return checked


def _release(tree: Path, env: dict[str, str]) -> str:
    r = subprocess.run(["make", "-s", "kernelrelease"], cwd=tree, env=env, capture_output=True,
                       text=True, check=False)
    rel = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0 or not rel:
        raise KernelBuildError(f"make kernelrelease in {tree}: {r.stderr.strip()}")
    return rel


def _build_kmod(cache: Cache, kdir: Path, dest: Path, log: Path, env: dict[str, str]) -> None:
    """pinlab.ko from the repository's kmod/, compiled against the kernel tree ``kdir``."""
    src = kmod_source()
    work = dest.parent / "src"
    shutil.rmtree(work, ignore_errors=True)
    for f in _sources(src):
        d = work / f.relative_to(src)
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d)
    argv = ["make", "-C", str(kdir), f"M={work}", "modules"]
    if shutil.which("ccache"):
        argv.insert(1, "CC=ccache gcc")
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if r.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise KernelCompileError("pinlab.ko", log, tail, r.returncode)
    shutil.copy(work / "pinlab.ko", dest)


def build_kernel(cache: Cache, spec: BuildSpec, *, seed: str | None = None,
                 tree: Path | None = None, jobs: int | None = None) -> str:
    """Build ``spec`` (or reuse it from the cache) and return its kernel id.

    ``seed``: a built kernel id whose tree is copied first, so only what differs is
    recompiled (default: the unpatched build of the same source and config, if built).
    ``tree``: build in this existing checkout instead (git bisect's clone, already at
    the commit; patches are not applied there). ``jobs``: make -j (default: cores).
    Raises :class:`KernelBuildError` subclasses (see the module docstring).
    """
    if not (spec.source.commit or spec.source.version):
        spec = BuildSpec(resolve(cache, spec.source), spec.patches, spec.config)
    name = kernel_id(cache, spec)
    if is_built(cache, name):
        return name
    if spec.source.kind == "debian" and tree is None:
        # a series that does not apply fails now, not after waiting for the build lock
        # and copying 1.5 GB (the pristine source is only read)
        check_patches(debian_source(cache, spec.source) / "src", spec.patches)
    ensure_toolchain(cache)
    with _build_lock(cache):
        if is_built(cache, name):
            return name
        return _build(cache, spec, name, seed, tree, jobs or os.cpu_count() or 2)


def _build(cache: Cache, spec: BuildSpec, name: str, seed: str | None, tree: Path | None,
           jobs: int) -> str:
    key = _key(name)
    own_tree, art, ko = _dirs(cache, key)
    shutil.rmtree(art, ignore_errors=True)
    art.mkdir(parents=True)
    log = art / "build.log"
    t0 = time.monotonic()
    seed_tree = None
    if tree is None:
        tree = own_tree
        marker = tree / ".pinlab" / "prepared"
        if marker.exists() and marker.read_text() == key:
            # an earlier attempt prepared this tree (and maybe compiled most of it): go on
            console.print(f"[bold]{name}[/]: resuming in {tree}; log: {log}")
        else:
            seed_tree = _seed(cache, spec, key, seed)
            console.print(f"[bold]{name}[/]: {spec.source.describe()}"
                          + (f" + {len(spec.patches)} patch(es)" if spec.patches else "")
                          + (f", seeded from {seed_tree.name}" if seed_tree else "")
                          + f"; log: {log}")
            _prepare_tree(cache, spec, tree, seed_tree)
            marker.parent.mkdir(exist_ok=True)
            marker.write_text(key)
    make = _Make(cache, tree, log, jobs, localversion=f"-pinlab-{key[:8]}")
    stats0 = _ccache_stats(make.env) if make.cc.startswith("ccache") else {}
    t1 = time.monotonic()
    checked = _configure(cache, spec, tree, make, key)
    t2 = time.monotonic()
    steps_entry = f"kbuild-steps-{digest(spec.source.ident, spec.config.identity())}"
    prev = cache.entry(steps_entry) or {}
    make("compile", "bzImage", "modules",
         expect=0 if seed_tree else int(str(prev.get("count", 0))))
    t3 = time.monotonic()
    release = _release(tree, make.env)
    modroot = art / "modroot"
    make("modules_install", "modules_install", INSTALL_MOD_PATH=str(modroot),
         INSTALL_MOD_STRIP="1")
    for link in ("build", "source"):  # point into the cache's tree: meaningless in a guest
        (modroot / "lib" / "modules" / release / link).unlink(missing_ok=True)
    ko.parent.mkdir(parents=True, exist_ok=True)
    _build_kmod(cache, tree, ko, log, make.env)
    t4 = time.monotonic()
    shutil.copy(tree / "arch/x86/boot/bzImage", art / "vmlinuz")
    shutil.copy(tree / ".config", art / "config")
    stats1 = _ccache_stats(make.env) if stats0 else {}
    ccache = {k: stats1.get(k, 0) - stats0.get(k, 0)
              for k in ("direct_cache_hit", "preprocessed_cache_hit", "cache_miss")}
    meta = {
        "id": name, "release": release, "source": spec.source.describe(),
        "source_ident": spec.source.ident,
        "patches": [{"file": str(p), "sha": h} for p, h in
                    zip(spec.patches, patch_identity(spec.patches), strict=True)],
        "config": {"base": spec.config.base, "fragments": [str(f) for f in
                                                           spec.config.fragments],
                   "debug_info": spec.config.debug_info, "checked_fragment": checked},
        "tree": str(tree), "seeded_from": str(seed_tree) if seed_tree else None,
        "compiler": _compiler(), "make_jobs": jobs, "build_env": BUILD_ENV,
        "ccache": ccache, "kbuild_steps": make.steps,
        "durations_s": {"prepare": round(t1 - t0, 1), "config": round(t2 - t1, 1),
                        "compile": round(t3 - t2, 1), "modules_and_kmod": round(t4 - t3, 1),
                        "total": round(time.monotonic() - t0, 1)},
        "reproducer": f"cd {tree} && make olddefconfig && "
                      + " ".join(f"{k}='{v}'" for k, v in BUILD_ENV.items())
                      + f" LOCALVERSION='{make.env['LOCALVERSION']}'"
                      + f" make -j{jobs} CC='{make.cc}' bzImage modules",
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (art / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
    if not seed_tree:
        cache.record(steps_entry, "steps", count=make.steps)
    cache.record(f"kbuild-{key}", key, release=release, source=spec.source.describe())
    d = meta["durations_s"]
    console.print(f"[green]✓[/] {name} = {release}: compile {d['compile']}s, "  # type: ignore[index]
                  f"total {d['total']}s; ccache {ccache}")
    return name


# -- prebuilt kernels ---------------------------------------------------------------------------
def register_prebuilt(cache: Cache, bzimage: Path, modules: Path, build_dir: Path) -> str:
    """Register a kernel someone built: ``bzimage``, ``modules`` (a ``lib/modules/<release>``
    directory, a directory holding ``lib/modules/<release>``, or a tarball of either, e.g.
    tuxmake's modules.tar.xz) and ``build_dir`` (its build tree, to compile pinlab.ko).
    Returns its kernel id. Raises :class:`KernelSourceError` on a missing or malformed
    input, :class:`KernelCompileError` when pinlab.ko does not build against it."""
    for p in (bzimage, modules, build_dir):
        if not p.exists():
            raise KernelSourceError(f"no such file or directory: {p}")
    if not (build_dir / "Module.symvers").exists() or not (build_dir / ".config").exists():
        raise KernelSourceError(f"{build_dir} is not a built kernel tree (no .config and "
                                f"Module.symvers)")
    key = digest(RECIPE, "prebuilt", bzimage, modules if modules.is_file() else
                 str(modules.resolve()), build_dir / ".config", build_dir / "Module.symvers",
                 _compiler())
    name = PREFIX + key
    if is_built(cache, name):
        return name
    _, art, ko = _dirs(cache, key)
    shutil.rmtree(art, ignore_errors=True)
    lib = art / "modroot" / "lib" / "modules"
    lib.mkdir(parents=True)
    if modules.is_file():
        with tarfile.open(modules) as tf:
            tf.extractall(art / "tarball", filter="data")
        found = sorted((art / "tarball").rglob("modules.order"))
        src_dirs = [f.parent for f in found]
    elif (modules / "modules.order").exists() or (modules / "modules.dep").exists():
        src_dirs = [modules]
    else:
        src_dirs = [d for d in (modules / "lib" / "modules").glob("*") if d.is_dir()]
    if len(src_dirs) != 1:
        raise KernelSourceError(f"{modules}: expected one lib/modules/<release>, "
                                f"found {[str(d) for d in src_dirs]}")
    release = src_dirs[0].name
    shutil.copytree(src_dirs[0], lib / release, symlinks=True)
    shutil.rmtree(art / "tarball", ignore_errors=True)
    for link in ("build", "source"):
        (lib / release / link).unlink(missing_ok=True)
    subprocess.run(["depmod", "-b", str(art / "modroot"), release], check=False,
                   capture_output=True)
    shutil.copy(bzimage, art / "vmlinuz")
    shutil.copy(build_dir / ".config", art / "config")
    ko.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **BUILD_ENV, "CCACHE_DIR": str(cache.path("kbuild", "ccache"))}
    _build_kmod(cache, build_dir, ko, art / "build.log", env)
    meta = {"id": name, "release": release, "source": f"prebuilt {bzimage}",
            "source_ident": f"prebuilt:{key}", "patches": [], "tree": str(build_dir),
            "config": {"base": str(build_dir / ".config")},
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (art / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
    cache.record(f"kbuild-{key}", key, release=release, source=meta["source"])
    return name


# -- booting a built kernel -----------------------------------------------------------------
def ensure_built_kernel(cache: Cache, name: str, rootfs: Rootfs) -> Kernel:
    """The :class:`~pinlab.images.kernel.Kernel` of a built kernel id, with the same
    initramfs and modules disk as a Debian kernel (made here, from its modules, on first
    use). Raises :class:`KernelSourceError` if ``name`` is not built."""
    meta = _meta(cache, name)
    key = _key(name)
    tree, art, _ = _dirs(cache, key)
    release = str(meta["release"])
    kernel = Kernel(name, release, art / "vmlinuz", art / "initramfs.img",
                    art / "modules.img", Path(str(meta.get("tree") or tree)))
    pkey = digest(RECIPE, release, guest_file("initramfs-init"), rootfs.busybox,
                  (art / "vmlinuz"))
    if cache.fresh(f"kbuild-image-{key}", pkey, [kernel.initramfs, kernel.modules_img]):
        return kernel
    moddir = art / "modroot" / "lib" / "modules" / release
    initramfs_image(kernel.initramfs, moddir, rootfs.busybox)
    modules_disk(cache, art / "modroot" / "lib" / "modules", kernel.modules_img, release,
                 log=art / "build.log")
    cache.record(f"kbuild-image-{key}", pkey, release=release)
    return kernel
