"""A kernel pinlab built (``pinlab kernel build``) boots like a Debian kernel and has what
the matrix needs; the same kernel registered as a prebuilt one (bzImage + modules + build
tree) boots too.

Needs a built kernel: the ``kernel`` parameter (``-p kernel=build:<key>``), or else the
newest one in the cache; the test is skipped when there is none (building one takes
~20-60 minutes on 2 cores: ``./pinlab.sh kernel build --base debian:6.12``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pinlab.images import kbuild
from pinlab.images.cache import Cache
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.guesttest import GuestTest
from pinlab.orchestrator.session import GuestSession


class KbuildBootTest(GuestTest):
    """:avocado: enable"""

    def kernel_under_test(self) -> tuple[Cache, str, dict]:
        cache = Cache.default()
        kid = self.params.get("kernel", default=None)
        if not kid or not kbuild.is_kernel_id(kid):
            kid = kbuild.newest_built(cache)
        if kid is None:
            self.cancel("no built kernel in the cache")
        meta = json.loads((cache.path("kernels", f"build-{kid[6:]}") / "kernel.json")
                          .read_text())
        return cache, kid, meta

    def check_guest(self, kid: str, release: str) -> None:
        with GuestSession.boot(kid, self.artifacts / kid.replace(":", "-")) as s:
            self.remember(s)
            ssh = s.guest.ssh
            self.assertEqual(ssh.run("uname -r", check=True).out.strip(), release)
            # pinlab.ko (built against this tree) is loaded and bound to the device
            self.assertEqual(ssh.run("test -c /dev/pinlab0", timeout=30).rc, 0)
            # odp's hmm_range_fault() exists only with HMM_MIRROR (selected, not set)
            syms = ssh.run("grep -wc hmm_range_fault /proc/kallsyms", timeout=30).out
            self.assertGreaterEqual(int(syms.strip() or 0), 1)
            # built in (pinlab.config) or, on a registered Debian kernel, modules
            fs = ssh.run("modprobe -a xfs ext4 2>/dev/null; cat /proc/filesystems",
                         check=True).out
            for name in ("ext4", "xfs", "hugetlbfs", "tmpfs"):
                self.assertIn(name, fs)
            ctl = ssh.run("cat /sys/fs/cgroup/cgroup.controllers", check=True).out.split()
            self.assertIn("memory", ctl)
            dm = classify(s.guest.dmesg())
            self.assertEqual(dm.severe(), {}, f"kernel complained: {dm.severe()}")

    def test_built_kernel_boots(self) -> None:
        """
        :avocado: tags=guest,kbuild
        """
        _, kid, meta = self.kernel_under_test()
        self.check_guest(kid, str(meta["release"]))

    def test_prebuilt_registration_boots(self) -> None:
        """
        :avocado: tags=guest,kbuild
        """
        cache, kid, meta = self.kernel_under_test()
        tree = Path(str(meta["tree"]))
        if not (tree / "arch/x86/boot/bzImage").exists():
            self.cancel(f"{kid} has no bzImage in its tree (a registered or removed build)")
        mods = cache.path("kernels", f"build-{kid[6:]}", "modroot", "lib", "modules",
                          str(meta["release"]))
        pre = kbuild.register_prebuilt(cache, tree / "arch/x86/boot/bzImage", mods, tree)
        self.assertNotEqual(pre, kid)
        self.assertTrue(kbuild.is_built(cache, pre))
        self.assertEqual(kbuild.register_prebuilt(cache, tree / "arch/x86/boot/bzImage",
                                                  mods, tree), pre)   # cached
        self.check_guest(pre, str(meta["release"]))


class DemoPatchesTest(GuestTest):
    """:avocado: enable"""

    def test_demo_patches_apply_to_debian_6_12(self) -> None:
        """
        The demonstration patches (tests/data/patches) apply to Debian's 6.12 source,
        which this downloads and unpacks into the cache if it is not there (about 140 MB).

        :avocado: tags=kbuild
        """
        import os
        import subprocess

        from pinlab.images import ksource

        cache = Cache.default()
        src = ksource.debian_source(cache, ksource.resolve(cache, ksource.parse_source(
            "debian:6.12"))) / "src"
        patches = Path(__file__).resolve().parents[1] / "data" / "patches"
        found = sorted(patches.glob("6.12-*.patch"))
        self.assertTrue(found)
        for p in found:
            r = subprocess.run(["git", "apply", "--check", "-p1", str(p)], cwd=src,
                               capture_output=True, text=True, check=False,
                               env={**os.environ, "GIT_CEILING_DIRECTORIES": str(src.parent)})
            self.assertEqual(r.returncode, 0, f"{p.name}: {r.stderr}")
