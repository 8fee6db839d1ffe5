"""The expectations table is data; these tests keep it loadable and unambiguous, and keep
every source a reader can open: a row of docs/pinning-semantics.md that exists, an upstream
commit, a kernel document or a file of this repository, and no path outside the repository
anywhere in the code or the docs."""

from __future__ import annotations

import re
import subprocess
import tempfile
import unittest
from pathlib import Path

from pinlab.common.vocab import GUEST_HOME
from pinlab.orchestrator.expectations import Cell, expect, load

REPO = Path(__file__).resolve().parents[2]
SEMANTICS = "docs/pinning-semantics.md"
ROW_HEADING = re.compile(r"^### Row (\d+) ", re.M)
# "docs/pinning-semantics.md row 7", "... rows 7 and 8", "... rows 1, 2, 3 and 6", "rows 26-28"
ROW_CITE = re.compile(r"docs/pinning-semantics\.md,? rows? (\d+(?:(?:, | and |-)\d+)*)")
COMMIT = re.compile(r"\b[0-9a-f]{12}\b")
KERNEL_DOC = re.compile(r"\bDocumentation/[\w./-]+\.rst\b")
REPO_FILE = re.compile(r"\b(?:[\w.-]+/)+[\w.-]+\.(?:md|py|c|h|toml|rst)\b")
# absolute paths of a development machine, and the unpublished background material. /root/
# is also the guest's home: the guest's install directory (vocab.GUEST_HOME, which the
# bench's guest helper uses too) is a path inside the guest image, not on a machine.
OUTSIDE = re.compile(r"(?<![\w.~-])(?:/work/|/home/|/Users/|/root/(?!pinlab\b))"
                     r"|shared/reference")
# the old shorthand for the background document ("ref §3 row 2", "ref row 5b", "ref [TR]")
REF_SHORTHAND = re.compile(r"\bref\b\s*(?:§|rows?\b|\[)")


def cited_rows(text: str) -> set[int]:
    """The row numbers of docs/pinning-semantics.md that ``text`` cites."""
    rows: set[int] = set()
    for m in ROW_CITE.finditer(text):
        for part in re.split(r", | and ", m.group(1)):
            lo, _, hi = part.partition("-")
            rows.update(range(int(lo), int(hi or lo) + 1))
    return rows


def repo_text_files() -> dict[str, str]:
    """Repository-relative path -> text of every file of the repository's code and docs that
    git tracks or would track (untracked, not ignored), or, without git, every file outside
    .git, .venv and caches. Binary files and this test file (which spells the patterns) are
    left out."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        names = [n for n in out.splitlines() if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".ruff_cache", ".pytest_cache"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    me = Path(__file__).resolve()
    files: dict[str, str] = {}
    for name in names:
        p = REPO / name
        if not p.is_file() or p.resolve() == me:
            continue
        data = p.read_bytes()
        if b"\0" in data:
            continue
        try:
            files[name] = data.decode()
        except UnicodeDecodeError:
            continue
    return files


class ExpectationsTest(unittest.TestCase):
    def test_shipped_table_loads_and_covers_baseline(self) -> None:
        rules = load()
        self.assertTrue(rules)
        for mode in ("gup", "pin", "longterm", "odp"):
            e = expect(Cell("6.12", mode, "anon", "dma-write"), rules)
            self.assertIsNotNone(e, mode)
            assert e is not None
            self.assertEqual(e.expected, "COHERENT")
            self.assertTrue(e.source)

    def test_first_match_wins_and_lists(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d, "t.toml")
            p.write_text('[[rule]]\nkernel = ["6.12", "7"]\nmode = "longterm"\nbacking = "ext4"\n'
                         'event = "*"\nexpected = "PIN_REFUSED(EFAULT)"\nsource = "6.5 rule"\n'
                         '[[rule]]\nexpected = "COHERENT"\nsource = "default"\n')
            rules = load(p)
            self.assertEqual(expect(Cell("6.12", "longterm", "ext4", "x"), rules).expected,
                             "PIN_REFUSED(EFAULT)")
            self.assertEqual(expect(Cell("6.1", "longterm", "ext4", "x"), rules).expected,
                             "COHERENT")

    def test_rule_without_source_is_rejected(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d, "t.toml")
            p.write_text('[[rule]]\nexpected = "COHERENT"\n')
            with self.assertRaises(ValueError):
                load(p)

    def test_races_match_and_say_so(self) -> None:
        from pinlab.orchestrator.celltest import judge

        with tempfile.TemporaryDirectory() as d:
            p = Path(d, "t.toml")
            p.write_text('[[rule]]\nexpected = "WRITEBACK_STALE"\n'
                         'races = ["WRITES_LOST_SILENTLY"]\nsource = "counted runs"\n')
            e = expect(Cell("6.1", "pin", "btrfs", "writeback"), load(p))
            assert e is not None
            self.assertTrue(e.accepts("WRITEBACK_STALE"))
            self.assertTrue(e.accepts("WRITES_LOST_SILENTLY"))
            self.assertFalse(e.accepts("COHERENT"))
        # the shipped table: 6.1 btrfs writeback races between the two classes
        cell = Cell("6.1", "pin", "btrfs", "writeback")
        for observed, verdict, raced in (("WRITEBACK_STALE", "match", False),
                                         ("WRITES_LOST_SILENTLY", "match", True),
                                         ("COHERENT", "mismatch", False),
                                         ("INCONCLUSIVE(no disk read)", "error", False)):
            v = judge(cell, {"observed": observed})
            self.assertEqual((v["verdict"], v["raced"]), (verdict, raced), observed)

    def test_races_are_other_classes_never_inconclusive(self) -> None:
        bad = ['races = ["COHERENT"]', 'races = "WRITES_LOST_SILENTLY"',
               'races = ["INCONCLUSIVE(x)"]', 'races = [""]']
        for line in bad:
            with self.subTest(line=line), tempfile.TemporaryDirectory() as d:
                p = Path(d, "t.toml")
                p.write_text(f'[[rule]]\nexpected = "COHERENT"\n{line}\nsource = "s"\n')
                with self.assertRaises(ValueError):
                    load(p)


class SourcesTest(unittest.TestCase):
    """Sources a reader can open (issue 10, item 9)."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.doc = (REPO / SEMANTICS).read_text()
        cls.rows = [int(n) for n in ROW_HEADING.findall(cls.doc)]
        cls.rules = load()
        cls.files = repo_text_files()

    def test_semantics_rows_are_numbered_once_in_order(self) -> None:
        self.assertTrue(self.rows, f"{SEMANTICS} has no '### Row N ' headings")
        # numbered once and in order; numbers handed out ahead to parallel branches may
        # leave a gap until those land
        self.assertEqual(self.rows[0], 1)
        self.assertEqual(self.rows, sorted(set(self.rows)))

    def test_every_rule_source_names_something_a_reader_can_open(self) -> None:
        for i, r in enumerate(self.rules):
            src = str(r["source"])
            with self.subTest(rule=i, expected=r["expected"]):
                anchors = (cited_rows(src) or COMMIT.search(src) or KERNEL_DOC.search(src)
                           or any((REPO / f).is_file() for f in REPO_FILE.findall(src)))
                self.assertTrue(anchors, f"rule {i} cites no row, commit, kernel document or "
                                         f"repository file: {src}")
                self.assertIsNone(REF_SHORTHAND.search(src),
                                  f"rule {i} uses the undefined 'ref' shorthand: {src}")
                self.assertIsNone(OUTSIDE.search(src),
                                  f"rule {i} names a path outside the repository: {src}")

    def test_cited_rows_exist(self) -> None:
        have = set(self.rows)
        texts = {"expectations rule sources": "\n".join(str(r["source"]) for r in self.rules),
                 **self.files}
        for name, text in texts.items():
            with self.subTest(file=name):
                missing = cited_rows(text) - have
                self.assertFalse(missing, f"{name} cites rows {sorted(missing)} that "
                                          f"{SEMANTICS} does not have")

    def test_commits_cited_by_rules_are_listed_in_the_semantics_notes(self) -> None:
        # the notes give each commit with its subject; a rule cites only those
        for i, r in enumerate(self.rules):
            for c in COMMIT.findall(str(r["source"])):
                self.assertIn(c, self.doc, f"rule {i} cites commit {c}, not in {SEMANTICS}")

    def test_no_path_outside_the_repository_in_code_or_docs(self) -> None:
        self.assertIn(SEMANTICS, self.files)
        self.assertIn("orchestrator/data/expectations.toml", self.files)
        bad = []
        for name, text in sorted(self.files.items()):
            for n, line in enumerate(text.splitlines(), 1):
                if OUTSIDE.search(line) or str(REPO) in line:
                    bad.append(f"{name}:{n}: {line.strip()}")
                elif name != SEMANTICS and REF_SHORTHAND.search(line):
                    bad.append(f"{name}:{n}: (undefined 'ref' citation) {line.strip()}")
        self.assertEqual(bad, [], "paths outside the repository:\n" + "\n".join(bad))

    def test_the_checks_catch_what_they_are_for(self) -> None:
        # the patterns themselves, on the kinds of text the old table and sources had
        self.assertTrue(OUTSIDE.search('"ref" = /work/shared/reference/x.md'))
        self.assertTrue(OUTSIDE.search(" * shared/reference/kernel-pinning-semantics.md"))
        self.assertTrue(OUTSIDE.search("cache in /root/.cache/pinlab"))
        self.assertTrue(OUTSIDE.search("see /home/dev/notes.md"))
        self.assertIsNone(OUTSIDE.search(f"python3 {GUEST_HOME}/pinlab/guest/pinlab_cell.py"))
        self.assertIsNone(OUTSIDE.search('"$1/opt/pinlab-kernel/root/lib"'))
        self.assertTrue(REF_SHORTHAND.search("ref §3 row 2 [TR]"))
        self.assertTrue(REF_SHORTHAND.search("(ref row 5b)"))
        self.assertIsNone(REF_SHORTHAND.search("an extra reference (ref-1 > mapcount)"))
        self.assertEqual(cited_rows("docs/pinning-semantics.md rows 1, 2 and 26-28; "
                                    "docs/pinning-semantics.md row 9"), {1, 2, 9, 26, 27, 28})


if __name__ == "__main__":
    unittest.main()
