"""Everything a guest needs, built (or reused) in dependency order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .cache import Cache
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
        elif n in KERNELS:
            out.append(n)
        else:
            raise SystemExit(f"pinlab: unknown kernel {n!r} (known: {', '.join(KERNELS)}, all)")
    return list(dict.fromkeys(out))


def ensure_images(kernel: str = DEFAULT_KERNEL, *, cache: Cache | None = None,
                  extra_packages: list[str] | None = None) -> GuestImages:
    cache = cache or Cache.default()
    with cache.locked():
        qemu = ensure_qemu(cache)
        rootfs = ensure_rootfs(cache, extra_packages)
        k = ensure_kernel(cache, kernel, rootfs)
        ko = ensure_kmod(cache, k)
    return GuestImages(qemu, rootfs, k, ko)
