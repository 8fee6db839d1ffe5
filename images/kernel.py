"""Guest kernels from Debian binary packages, and the build roots their modules build in.

For each kernel a build root (mmdebstrap) holds that release's compiler and the matching
``linux-headers``; the ``linux-image`` package is downloaded into it, unpacked and depmod'ed.
From there we take the kernel image, a modules disk (ext4, mounted by the guest at
``/usr/lib/modules``) and a tiny busybox initramfs that loads virtio_blk and ext4.
"""

from __future__ import annotations

import lzma
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .cache import Cache, digest
from .cpio import Newc
from .debian import Suite, Tree, mmdebstrap
from .rootfs import Rootfs, guest_file, tree_size
from .steps import run

RECIPE = "kernel-v2"
BUILD_PACKAGES = ["gcc", "make", "libc6-dev", "linux-headers-amd64", "kmod", "xz-utils",
                  "bc", "libelf-dev", "perl"]
INITRAMFS_MODULES = ["crc32c_generic", "crc32c-intel", "virtio_pci", "virtio_blk", "ext4"]
FETCH_HOOK = r"""set -e
kver=$(chroot "$1" dpkg-query -W -f='${Depends}' linux-headers-amd64 \
  | sed -n 's/.*linux-headers-\([^ ,]*\).*/\1/p')
mkdir -p "$1/opt/pinlab-kernel/root"
chroot "$1" sh -c "cd /opt/pinlab-kernel && apt-get download linux-image-$kver"
# 7.x packages split the image into linux-{binary,modules,base}-X behind a small wrapper
deps=$(chroot "$1" sh -c "dpkg-deb -f /opt/pinlab-kernel/linux-image-$kver*.deb Depends" \
  | tr ',|' '\n\n' | sed -n "s/^ *\(linux-[a-z]*-$kver\)\( .*\)\{0,1\}$/\1/p")
for dep in $deps; do
  chroot "$1" sh -c "cd /opt/pinlab-kernel && apt-get download $dep"
done
for deb in "$1"/opt/pinlab-kernel/linux-*.deb; do
  chroot "$1" dpkg-deb -x "/opt/pinlab-kernel/$(basename "$deb")" /opt/pinlab-kernel/root
done
# trixie's package ships usr/lib/modules, bookworm's lib/modules: give both one path
[ -e "$1/opt/pinlab-kernel/root/lib" ] || ln -s usr/lib "$1/opt/pinlab-kernel/root/lib"
chroot "$1" depmod -b /opt/pinlab-kernel/root "$kver"
rm -f "$1"/opt/pinlab-kernel/linux-*.deb
echo "$kver" > "$1/opt/pinlab-kernel/KVER"
"""


@dataclass(frozen=True)
class KernelSpec:
    name: str  # "6.1", "6.12", "7"
    suite: Suite
    description: str


KERNELS: dict[str, KernelSpec] = {
    "6.12": KernelSpec("6.12", Suite("trixie"), "Debian 13 (trixie) linux-image-amd64"),
    "6.1": KernelSpec("6.1", Suite("bookworm"), "Debian 12 (bookworm) linux-image-amd64"),
    "7": KernelSpec("7", Suite("trixie", extra_suites=("trixie-backports",),
                               prefer="trixie-backports"),
                    "Debian 13 trixie-backports linux-image-amd64 (7.x)"),
}
DEFAULT_KERNEL = "6.12"


@dataclass(frozen=True)
class Kernel:
    name: str
    release: str  # uname -r
    vmlinuz: Path
    initramfs: Path
    modules_img: Path
    buildroot: Path

    @property
    def headers(self) -> str:
        """The headers directory inside the build root."""
        return f"/usr/src/linux-headers-{self.release}"


def ensure_buildroot(cache: Cache, spec: KernelSpec) -> tuple[Path, str]:
    root = cache.path("buildroot", spec.name)
    key = digest(RECIPE, spec.suite, BUILD_PACKAGES, FETCH_HOOK)
    marker = root / "opt/pinlab-kernel/KVER"
    if not cache.fresh(f"buildroot-{spec.name}", key, [marker]):
        hook = cache.path("buildroot", ".fetch-kernel.sh")
        hook.parent.mkdir(parents=True, exist_ok=True)
        hook.write_text(FETCH_HOOK)
        mmdebstrap(Tree(spec.suite, root, variant="apt", include=BUILD_PACKAGES,
                        hooks=[("customize", f'sh {hook} "$1"')]),
                   log=cache.logs() / f"buildroot-{spec.name}.log",
                   title=f"build root + kernel {spec.name} ({spec.description})")
        cache.record(f"buildroot-{spec.name}", key, release=marker.read_text().strip())
    return root, marker.read_text().strip()


def _module_order(moddir: Path, wanted: list[str]) -> list[str]:
    """The .ko paths for ``wanted`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        base = Path(mod).name.split(".ko")[0]
        by_name[base] = mod
        by_name[base.replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in deps.get(mod, []):
            visit(d)
        order.append(mod)

    for name in wanted:
        mod = by_name.get(name) or by_name.get(name.replace("-", "_"))
        if mod:  # absent: built in
            visit(mod)
    return order


def initramfs_image(path: Path, moddir: Path, busybox: Path) -> None:
    """A busybox initramfs at ``path`` that loads ``INITRAMFS_MODULES`` (those built as
    modules in ``moddir``, a ``lib/modules/<release>`` with ``modules.dep``) and switches
    to the disk with serial pinlab-root."""
    cpio = Newc()
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", guest_file("initramfs-init"), 0o755)
    names = []
    for mod in _module_order(moddir, INITRAMFS_MODULES):
        data = (moddir / mod).read_bytes()
        if mod.endswith(".xz"):
            data = lzma.decompress(data)
        name = Path(mod).name.split(".ko")[0] + ".ko"
        cpio.file(f"modules/{name}", data)
        names.append(name)
    cpio.file("modules.load", ("\n".join(names) + "\n").encode())
    cpio.write(path)


def ensure_kernel(cache: Cache, name: str, rootfs: Rootfs) -> Kernel:
    spec = KERNELS[name]
    broot, release = ensure_buildroot(cache, spec)
    d = cache.path("kernels", name)
    kernel = Kernel(name, release, d / "vmlinuz", d / "initramfs.img", d / "modules.img", broot)
    key = digest(RECIPE, release, guest_file("initramfs-init"), INITRAMFS_MODULES,
                 rootfs.busybox)
    if cache.fresh(f"kernel-{name}", key, [kernel.vmlinuz, kernel.initramfs, kernel.modules_img]):
        return kernel
    d.mkdir(parents=True, exist_ok=True)
    kroot = broot / "opt/pinlab-kernel/root"
    moddir = kroot / "lib/modules" / release
    # 6.1/6.12 ship /boot/vmlinuz-X; 7.x's linux-binary-X ships /usr/lib/modules/X/vmlinuz
    for image, config in ((kroot / f"boot/vmlinuz-{release}", kroot / f"boot/config-{release}"),
                          (moddir / "vmlinuz", moddir / "config")):
        if image.exists():
            shutil.copy(image, kernel.vmlinuz)
            shutil.copy(config, d / "config")
            break
    else:
        raise FileNotFoundError(f"no kernel image for {release} in {kroot}")
    initramfs_image(kernel.initramfs, moddir, rootfs.busybox)
    modules_disk(cache, kroot / "lib/modules", kernel.modules_img, release,
                 log=cache.logs() / f"kernel-{name}.log")
    cache.record(f"kernel-{name}", key, release=release)
    return kernel


def modules_disk(cache: Cache, lib_modules: Path, image: Path, release: str, *,
                 log: Path) -> None:
    """An ext4 image of ``lib_modules`` (holding ``<release>/``), which the guest mounts at
    /usr/lib/modules (label pinlab-mods); 20 % + 64 MiB larger than the tree."""
    tmp = image.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    size_mb = tree_size(lib_modules / release) * 12 // 10 // (1 << 20) + 64
    run(["mke2fs", "-q", "-t", "ext4", "-L", "pinlab-mods", "-E", "root_owner=0:0",
         "-d", lib_modules, tmp, f"{size_mb}M"],
        log=log, title=f"modules disk for {release}",
        env={"E2FSPROGS_FAKE_TIME": "1735689600"})
    tmp.replace(image)


BUILT_PREFIX = "build:"   # kernels pinlab built or registered (images/kbuild.py)


def is_kernel_id(name: str) -> bool:
    """Whether ``name`` names a built kernel (``build:<16 hex digits>``, images/kbuild.py);
    kept here, beside KERNELS, so that cell code can ask without importing the builder."""
    return (name.startswith(BUILT_PREFIX)
            and re.fullmatch(r"[0-9a-f]{16}", name[len(BUILT_PREFIX):]) is not None)
