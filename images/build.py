"""Everything a guest needs, built (or reused) in dependency order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .cache import Cache
from .kbuild import built_kmod, ensure_built_kernel, is_built, is_kernel_id
from .kernel import DEFAULT_KERNEL, KERNELS, Kernel, ensure_kernel
from .kmod import ensure_kmod
from .qemu import QemuRuntime, ensure_qemu
from .rootfs import Rootfs, ensure_rootfs


@dataclass(frozen=True)
class GuestImages:
    qemu: QemuRuntime
    rootfs: Rootfs
    kernel: Kernel
    kmod: Path


def resolve_kernels(names: list[str] | None) -> list[str]:
    if not names:
        return [DEFAULT_KERNEL]
    out: list[str] = []
    for n in names:
        if n == "all":
            out += list(KERNELS)
        elif n in KERNELS or is_kernel_id(n):
            out.append(n)
        else:
            raise SystemExit(f"pinlab: unknown kernel {n!r} (known: {', '.join(KERNELS)}, all, "
                             "or a built kernel's build:<key>)")
    return list(dict.fromkeys(out))


def known_kernel(name: str, cache: Cache | None = None) -> bool:
    """A Debian kernel name (``KERNELS``) or a built kernel id that is in the cache."""
    if name in KERNELS:
        return True
    return is_kernel_id(name) and is_built(cache or Cache.default(), name)


def ensure_images(kernel: str = DEFAULT_KERNEL, *, cache: Cache | None = None,
                  extra_packages: list[str] | None = None) -> GuestImages:
    """Everything a guest of ``kernel`` needs: a Debian kernel name ("6.12") or a built
    kernel id ("build:<key>", see :mod:`pinlab.images.kbuild`; it must be built)."""
    cache = cache or Cache.default()
    with cache.locked():
        qemu = ensure_qemu(cache)
        rootfs = ensure_rootfs(cache, extra_packages)
        if is_kernel_id(kernel):
            k = ensure_built_kernel(cache, kernel, rootfs)
            ko = built_kmod(cache, kernel)
        else:
            k = ensure_kernel(cache, kernel, rootfs)
            ko = ensure_kmod(cache, k)
    return GuestImages(qemu, rootfs, k, ko)
