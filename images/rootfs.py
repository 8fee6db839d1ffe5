"""The guest root filesystem: Debian 13, minimal, booted read-only with a throw-away overlay.

Built with mmdebstrap into a directory, customised (our PID 1, sshd, keys), then packed into
an ext4 image with ``mke2fs -d`` (no loop mounts). Each guest boots it through a QEMU
``snapshot=on`` drive, so nothing a test does reaches the image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .cache import Cache, digest
from .debian import Suite, Tree, mmdebstrap
from .steps import run

RECIPE = "rootfs-v1"
SUITE = Suite("trixie", epoch=1735689600)
PACKAGES = [
    "openssh-server", "python3", "e2fsprogs", "xfsprogs", "btrfs-progs", "util-linux", "kmod",
    "procps", "iproute2", "pciutils", "busybox-static",
]
SSHD_CONF = """\
# pinlab: key-only root login, fast start, ed25519 host key made at image build time
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
HostKey /etc/ssh/ssh_host_ed25519_key
"""


@dataclass(frozen=True)
class Rootfs:
    image: Path
    busybox: Path
    host_key_pub: Path  # the guest's sshd host key, pinned by the orchestrator
    client_key: Path  # private key for root@guest

    @classmethod
    def at(cls, d: Path) -> Rootfs:
        return cls(d / "rootfs.img", d / "busybox", d / "ssh_host_ed25519_key.pub",
                   d / "id_ed25519")

    def outputs(self) -> list[Path]:
        return [self.image, self.busybox, self.host_key_pub, self.client_key]


def guest_file(name: str) -> bytes:
    """The bytes of one init script baked into an image (images/init/: ``pinlab-init``,
    the rootfs's PID 1; ``initramfs-init``)."""
    return resources.files("pinlab.images").joinpath("init", name).read_bytes()


def _customise(tree: Path, out: Rootfs) -> None:
    init = tree / "usr/local/sbin/pinlab-init"
    init.parent.mkdir(parents=True, exist_ok=True)
    init.write_bytes(guest_file("pinlab-init"))
    init.chmod(0o755)
    lib = tree / "usr/local/lib/pinlab"
    lib.mkdir(parents=True, exist_ok=True)
    (tree / "etc/hostname").write_text("pinlab\n")
    (tree / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (tree / "etc/ssh/sshd_config.d/pinlab.conf").write_text(SSHD_CONF)
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    keygen = ["chroot", str(tree), "ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
    subprocess.run([*keygen, "-C", "pinlab-guest", "-f", "/etc/ssh/ssh_host_ed25519_key"],
                   check=True)
    subprocess.run([*keygen, "-C", "pinlab-client", "-f", "/root/pinlab-client-key"],
                   check=True)
    ssh = tree / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(tree / "root/pinlab-client-key.pub", ssh / "authorized_keys")
    (ssh / "authorized_keys").chmod(0o600)
    shutil.move(tree / "root/pinlab-client-key", out.client_key)
    (tree / "root/pinlab-client-key.pub").unlink()
    out.client_key.chmod(0o600)
    shutil.copy(tree / "etc/ssh/ssh_host_ed25519_key.pub", out.host_key_pub)
    shutil.copy(tree / "usr/bin/busybox", out.busybox)
    (tree / "usr/lib/modules").mkdir(parents=True, exist_ok=True)


def tree_size(tree: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(tree):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def ensure_rootfs(cache: Cache, extra_packages: list[str] | None = None) -> Rootfs:
    if extra_packages is None:  # keep whatever extras the cached image was built with
        entry = cache.entry("rootfs") or {}
        recorded = entry.get("extra", [])
        extra_packages = list(recorded) if isinstance(recorded, list) else []
    extra = sorted(set(extra_packages))
    d = cache.path("rootfs", "trixie")
    out = Rootfs.at(d)
    key = digest(RECIPE, SUITE, PACKAGES, extra, guest_file("pinlab-init"), SSHD_CONF)
    if cache.fresh("rootfs", key, out.outputs()):
        return out
    d.mkdir(parents=True, exist_ok=True)
    tree = d / "tree"
    log = cache.logs() / "rootfs.log"
    mmdebstrap(Tree(SUITE, tree, include=PACKAGES + extra), log=log,
               title="guest rootfs (Debian 13, minimal)")
    _customise(tree, out)
    size_mb = tree_size(tree) * 13 // 10 // (1 << 20) + 384
    tmp = out.image.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run(["mke2fs", "-q", "-t", "ext4", "-L", "pinlab-root", "-U",
         "8e9b1a52-7d0e-4c5e-9a61-70696e6c6162", "-E", "root_owner=0:0",
         "-d", tree, tmp, f"{size_mb}M"],
        log=log, title="pack rootfs into ext4", env={"E2FSPROGS_FAKE_TIME": str(SUITE.epoch)})
    tmp.replace(out.image)
    shutil.rmtree(tree)
    cache.record("rootfs", key, packages=PACKAGES + extra, extra=extra, size_mb=size_mb)
    return out
