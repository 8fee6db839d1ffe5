"""Kernel builds without compiling a kernel: the config fragment check on real .config files
made by ``olddefconfig`` from Debian's 6.12 source, patch application (real git) and its
failure report, the build-step error, and the cache keys of built kernels."""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

from pinlab.images import kbuild, kconfig, ksource
from pinlab.images.cache import Cache
from pinlab.images.kerrors import KernelBuildError

DATA = Path(__file__).resolve().parent.parent / "data"
KCONFIG = DATA / "kconfig"
PATCHES = DATA / "patches"

GUP_BEFORE = """\
static bool writable_file_mapping_allowed(struct vm_area_struct *vma,
\t\t\t\t\t  unsigned long gup_flags)
{
\tif ((gup_flags & (FOLL_PIN | FOLL_LONGTERM)) !=
\t    (FOLL_PIN | FOLL_LONGTERM))
\t\treturn true;

\treturn !vma_needs_dirty_tracking(vma);
}
"""

BAD_PATCH = """\
From: pinlab <pinlab@localhost>
Subject: [PATCH] mm/gup: a patch for another kernel

---
diff --git a/mm/gup.c b/mm/gup.c
--- a/mm/gup.c
+++ b/mm/gup.c
@@ -3,6 +3,5 @@
 {
-\tif ((gup_flags & (FOLL_PIN | FOLL_LONGTERM | FOLL_WRITE)) !=
-\t    (FOLL_PIN | FOLL_LONGTERM | FOLL_WRITE))
+\tif (!(gup_flags & FOLL_LONGTERM))
 \t\treturn true;
\x20
 \treturn !vma_needs_dirty_tracking(vma);
--\x20
pinlab
"""

GOOD_PATCH = """\
From: pinlab <pinlab@localhost>
Subject: [PATCH] mm/gup: allow them all

---
diff --git a/mm/gup.c b/mm/gup.c
--- a/mm/gup.c
+++ b/mm/gup.c
@@ -6,4 +6,4 @@
 \t\treturn true;
\x20
-\treturn !vma_needs_dirty_tracking(vma);
+\treturn true;
 }
--\x20
pinlab
"""


def real_config(name: str) -> str:
    """A .config that ``make olddefconfig`` wrote for Debian's 6.12.117 source (kept xz'ed:
    tests/data/kconfig/<name>.xz)."""
    return lzma.decompress((KCONFIG / f"{name}.xz").read_bytes()).decode()


def git(tree: Path, *args: str) -> str:
    env = {**os.environ, **ksource.GIT_IDENTITY}
    return subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True,
                          text=True, env=env).stdout


class FragmentCheck(unittest.TestCase):
    def test_pinlab_fragment_holds_in_the_real_config(self) -> None:
        final = real_config("6.12-defconfig-pinlab.config")
        kconfig.check(kconfig.pinlab_fragment(), final)   # raises if a line was dropped
        opts = kconfig.parse(final)
        self.assertEqual(opts["CONFIG_HMM_MIRROR"].value, "y")
        self.assertEqual(opts["CONFIG_BTRFS_FS"].value, "y")   # the btrfs backing
        self.assertEqual(opts["CONFIG_DEBUG_INFO_NONE"].value, "y")
        self.assertEqual(opts["CONFIG_LOCALVERSION"].value, '""')   # make LOCALVERSION=
        self.assertIsNone(opts["CONFIG_LOCALVERSION_AUTO"].value)

    def test_hmm_mirror_without_its_selector_is_dropped(self) -> None:
        # Real olddefconfig output for pinlab's fragment minus the InfiniBand lines: the
        # CONFIG_HMM_MIRROR=y line alone cannot set a symbol without a prompt.
        frag = (KCONFIG / "pinlab-without-infiniband.fragment").read_text()
        final = KCONFIG / "6.12-defconfig-no-infiniband.config.xz"
        with self.assertRaises(kconfig.ConfigFragmentError) as cm:
            kconfig.check(frag, real_config(final.name[:-3]), final)
        self.assertEqual(cm.exception.dropped, [("CONFIG_HMM_MIRROR=y", None)])
        self.assertIn("CONFIG_HMM_MIRROR=y  ->  absent", str(cm.exception))
        self.assertIsInstance(cm.exception, KernelBuildError)

    def test_changed_value_and_unset_lines(self) -> None:
        final = real_config("6.12-defconfig-pinlab.config")
        frag = ("CONFIG_XFS_FS=m\n# CONFIG_EXT4_FS is not set\n# CONFIG_NOT_A_SYMBOL is not set\n"
                "# a comment\nCONFIG_TMPFS=y\n")
        with self.assertRaises(kconfig.ConfigFragmentError) as cm:
            kconfig.check(frag, final)
        self.assertEqual(cm.exception.dropped, [("CONFIG_XFS_FS=m", "CONFIG_XFS_FS=y"),
                                                ("# CONFIG_EXT4_FS is not set",
                                                 "CONFIG_EXT4_FS=y")])

    def test_later_line_wins(self) -> None:
        opts = kconfig.parse("CONFIG_A=y\n# CONFIG_A is not set\nCONFIG_B=\"x y\"\n")
        self.assertIsNone(opts["CONFIG_A"].value)
        self.assertEqual(opts["CONFIG_B"].value, '"x y"')

    def test_build_fragment(self) -> None:
        text = kconfig.build_fragment(debug_info=False, signing_keys=True)
        opts = kconfig.parse(text)
        self.assertEqual(opts["CONFIG_LOCALVERSION"].value, '""')
        self.assertEqual(opts["CONFIG_DEBUG_INFO_NONE"].value, "y")
        self.assertEqual(opts["CONFIG_SYSTEM_TRUSTED_KEYS"].value, '""')
        dbg = kconfig.parse(kconfig.build_fragment(debug_info=True, signing_keys=False))
        self.assertNotIn("CONFIG_DEBUG_INFO_NONE", dbg)
        self.assertNotIn("CONFIG_SYSTEM_TRUSTED_KEYS", dbg)


class Patches(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pinlab-kbuild-"))
        self.tree = self.tmp / "tree"
        (self.tree / "mm").mkdir(parents=True)
        (self.tree / "mm" / "gup.c").write_text(GUP_BEFORE)
        (self.tmp / "bad.patch").write_text(BAD_PATCH)
        (self.tmp / "good.patch").write_text(GOOD_PATCH)

    def tearDown(self) -> None:
        shutil.rmtree(self.tmp)

    def test_unpacked_tree_apply(self) -> None:
        ksource.apply_patches(self.tree, [self.tmp / "good.patch"], git_am=False)
        self.assertNotIn("vma_needs_dirty_tracking", (self.tree / "mm/gup.c").read_text())

    def test_unpacked_tree_failure_shows_hunk(self) -> None:
        with self.assertRaises(ksource.PatchApplyError) as cm:
            ksource.apply_patches(self.tree, [self.tmp / "bad.patch"], git_am=False)
        err = cm.exception
        self.assertIn("patch failed: mm/gup.c:3", err.output)
        self.assertTrue(err.hunk.startswith("+++ b/mm/gup.c\n@@ -3,6 +3,5 @@"), err.hunk)
        self.assertIn("+\tif (!(gup_flags & FOLL_LONGTERM))", err.hunk)
        self.assertIn("--- failing hunk ---", str(err))
        self.assertIsInstance(err, KernelBuildError)
        self.assertEqual((self.tree / "mm/gup.c").read_text(), GUP_BEFORE)  # untouched

    def test_series_check_names_the_failing_patch(self) -> None:
        series = [self.tmp / "good.patch", self.tmp / "bad.patch"]
        with self.assertRaises(ksource.PatchApplyError) as cm:
            ksource.check_patches(self.tree, series)
        self.assertEqual(cm.exception.patch, self.tmp / "bad.patch")
        self.assertIn("@@ -3,6 +3,5 @@", cm.exception.hunk)
        ksource.check_patches(self.tree, series[:1])          # the good one alone applies
        self.assertEqual((self.tree / "mm/gup.c").read_text(), GUP_BEFORE)  # only checked

    def test_git_am_series_and_failure(self) -> None:
        git(self.tree, "init", "-q")
        git(self.tree, "add", ".")
        git(self.tree, "commit", "-qm", "base")
        ksource.apply_patches(self.tree, [self.tmp / "good.patch"], git_am=True)
        self.assertIn("mm/gup: allow them all", git(self.tree, "log", "-1", "--format=%s"))
        head = git(self.tree, "rev-parse", "HEAD")
        with self.assertRaises(ksource.PatchApplyError) as cm:
            ksource.apply_patches(self.tree, [self.tmp / "bad.patch"], git_am=True)
        self.assertIn("@@ -3,6 +3,5 @@", cm.exception.hunk)
        # the failed am was aborted: the clone is back where it was, no am in progress
        self.assertEqual(git(self.tree, "rev-parse", "HEAD"), head)
        self.assertFalse((self.tree / ".git" / "rebase-apply").exists())

    def test_missing_patch(self) -> None:
        with self.assertRaises(ksource.KernelSourceError):
            ksource.apply_patches(self.tree, [self.tmp / "nope.patch"], git_am=False)


class GitTrees(unittest.TestCase):
    """A git source is cloned (the user's repository is left as it was) and a candidate
    tree seeded from a built one keeps the times of what did not change, so make
    recompiles only what the checkout or a patch touched."""

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pinlab-kbuild-"))
        self.cache = Cache(self.tmp / "cache")
        self.repo = self.tmp / "linux"
        (self.repo / "mm").mkdir(parents=True)
        git(self.repo, "init", "-q")
        (self.repo / "mm" / "gup.c").write_text(GUP_BEFORE)
        (self.repo / "mm" / "other.c").write_text("int x;\n")
        git(self.repo, "add", ".")
        git(self.repo, "commit", "-qm", "base")
        self.c1 = git(self.repo, "rev-parse", "HEAD").strip()
        (self.repo / "mm" / "other.c").write_text("int y;\n")
        git(self.repo, "commit", "-qam", "candidate")
        self.c2 = git(self.repo, "rev-parse", "HEAD").strip()
        (self.tmp / "good.patch").write_text(GOOD_PATCH)

    def tearDown(self) -> None:
        shutil.rmtree(self.tmp)

    def spec(self, rev: str, patches: list[Path] | None = None) -> kbuild.BuildSpec:
        src = ksource.resolve(self.cache, ksource.parse_source(rev, self.repo))
        return kbuild.BuildSpec(src, patches or [], kbuild.ConfigSpec("defconfig"))

    def test_clone_seed_and_patch(self) -> None:
        before = git(self.repo, "status", "--porcelain", "--branch")
        t1 = self.tmp / "trees" / "one"
        kbuild._prepare_tree(self.cache, self.spec(self.c1), t1, None)
        self.assertEqual(git(t1, "rev-parse", "HEAD").strip(), self.c1)
        self.assertEqual((t1 / "mm/other.c").read_text(), "int x;\n")
        (t1 / "mm" / "other.o").write_text("object")
        old = 1_000_000_000
        for p in t1.rglob("*"):
            if ".git" not in p.parts:
                os.utime(p, (old, old))
        t2 = self.tmp / "trees" / "two"
        kbuild._prepare_tree(self.cache, self.spec(self.c2, [self.tmp / "good.patch"]), t2,
                             t1)
        self.assertEqual((t2 / "mm/other.c").read_text(), "int y;\n")
        self.assertEqual((t2 / "mm/other.o").read_text(), "object")   # the build came along
        self.assertEqual(int((t2 / "mm/other.o").stat().st_mtime), old)
        self.assertGreater((t2 / "mm/other.c").stat().st_mtime, old)   # checkout touched it
        self.assertGreater((t2 / "mm/gup.c").stat().st_mtime, old)     # the patch did
        self.assertNotIn("vma_needs_dirty_tracking", (t2 / "mm/gup.c").read_text())
        self.assertEqual(git(t2, "log", "-1", "--format=%s").strip(), "mm/gup: allow them all")
        # the user's repository: same HEAD, same status, no worktree added
        self.assertEqual(git(self.repo, "rev-parse", "HEAD").strip(), self.c2)
        self.assertEqual(git(self.repo, "status", "--porcelain", "--branch"), before)
        self.assertEqual(len(git(self.repo, "worktree", "list").splitlines()), 1)


class BuildSteps(unittest.TestCase):
    def test_failing_make_raises_with_log_tail(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="pinlab-kbuild-"))
        try:
            (tmp / "Makefile").write_text("all:\n\t@echo 'mm/gup.c:42:1: error: expected ;'"
                                          "\n\t@false\n")
            make = kbuild._Make(Cache(tmp), tmp, tmp / "build.log", jobs=1)
            with self.assertRaises(kbuild.KernelCompileError) as cm:
                make("compile", "all")
            self.assertIn("mm/gup.c:42:1: error: expected ;", cm.exception.tail)
            self.assertEqual(cm.exception.log, tmp / "build.log")
            self.assertEqual(os.path.basename(cm.exception.log), "build.log")
            self.assertNotEqual(cm.exception.code, 0)
        finally:
            shutil.rmtree(tmp)


class CacheKeys(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pinlab-kbuild-"))
        self.cache = Cache(self.tmp)
        self.src = ksource.SourceSpec("debian", "6.12", version="6.12_6.12.117-1")
        (self.tmp / "a.patch").write_text(GOOD_PATCH)
        (self.tmp / "b.patch").write_text(BAD_PATCH)
        (self.tmp / "copy-of-a.patch").write_text(GOOD_PATCH)

    def tearDown(self) -> None:
        shutil.rmtree(self.tmp)

    def kid(self, patches: list[str], **cfg: object) -> str:
        return kbuild.kernel_id(self.cache, kbuild.BuildSpec(
            self.src, [self.tmp / p for p in patches], kbuild.ConfigSpec(**cfg)))  # type: ignore[arg-type]

    def test_keys(self) -> None:
        base = self.kid([])
        self.assertTrue(kbuild.is_kernel_id(base), base)
        self.assertEqual(base, self.kid([]))                          # stable
        self.assertEqual(self.kid(["a.patch"]), self.kid(["copy-of-a.patch"]))  # content
        ids = {base, self.kid(["a.patch"]), self.kid(["b.patch"]),
               self.kid(["a.patch", "b.patch"]), self.kid(["b.patch", "a.patch"]),
               self.kid([], base="defconfig"), self.kid([], debug_info=True)}
        self.assertEqual(len(ids), 7)
        other = kbuild.kernel_id(self.cache, kbuild.BuildSpec(
            ksource.SourceSpec("debian", "6.12", version="6.12_6.12.118-1")))
        self.assertNotEqual(other, base)
        self.assertFalse(kbuild.is_built(self.cache, base))
        with self.assertRaises(KernelBuildError):
            kbuild.ensure_built_kernel(self.cache, base, None)  # type: ignore[arg-type]

    def test_prebuilt_bad_input(self) -> None:
        img = self.tmp / "bzImage"
        img.write_bytes(b"not really")
        mods = self.tmp / "lib" / "modules" / "6.12.0-test"
        mods.mkdir(parents=True)
        build = self.tmp / "build"
        build.mkdir()
        with self.assertRaisesRegex(ksource.KernelSourceError, "no such file"):
            kbuild.register_prebuilt(self.cache, self.tmp / "nope", mods, build)
        with self.assertRaisesRegex(ksource.KernelSourceError, "not a built kernel tree"):
            kbuild.register_prebuilt(self.cache, img, mods, build)

    def test_ids(self) -> None:
        self.assertFalse(kbuild.is_kernel_id("6.12"))
        self.assertFalse(kbuild.is_kernel_id("build:xyz"))
        self.assertTrue(kbuild.is_kernel_id("build:0123456789abcdef"))

    def test_bad_sources(self) -> None:
        with self.assertRaises(ksource.KernelSourceError):
            ksource.parse_source("debian:5.10")
        with self.assertRaises(ksource.KernelSourceError):
            ksource.parse_source("v6.12")            # a revision needs --tree
        with self.assertRaises(ksource.KernelSourceError):
            ksource.resolve(self.cache, ksource.parse_source("HEAD", self.tmp))  # not git
        tree = self.tmp / "repo"
        tree.mkdir()
        git(tree, "init", "-q")
        (tree / "f").write_text("x")
        git(tree, "add", "f")
        git(tree, "commit", "-qm", "one")
        spec = ksource.resolve(self.cache, ksource.parse_source("HEAD", tree))
        self.assertEqual(spec.commit, git(tree, "rev-parse", "HEAD").strip())
        with self.assertRaises(ksource.KernelSourceError):
            ksource.resolve(self.cache, ksource.parse_source("no-such-rev", tree))


if __name__ == "__main__":
    unittest.main()
