"""The guest's code and its install path: pinlab.guest and pinlab.common go into the guest
under one GUEST_HOME, named in exactly one place, and import on the host the same way."""

from __future__ import annotations

import ast
import importlib
import re
import unittest
from pathlib import Path

from pinlab.common import vocab
from pinlab.orchestrator.session import GUEST_PACKAGE_INIT, guest_files

ROOT = Path(__file__).resolve().parents[2]
CODE_DIRS = ("bench", "common", "device", "examples", "guest", "images", "orchestrator",
             "pinlab", "tests", "ci")


def code_files() -> list[Path]:
    out = []
    for d in CODE_DIRS:
        out += [p for p in (ROOT / d).rglob("*") if p.is_file()
                and p.suffix in (".py", ".sh", ".yml", ".yaml", ".toml", "")
                and "__pycache__" not in p.parts]
    return [*out, ROOT / "pinlab.sh"]


class GuestLayoutTest(unittest.TestCase):
    def test_install_path_is_written_once(self) -> None:
        home = re.compile(re.escape(vocab.GUEST_HOME) + r"(?![\w-])")
        where = [str(p.relative_to(ROOT)) for p in code_files()
                 if home.search(p.read_text(errors="replace"))]
        # this test names no path itself: it reads vocab.GUEST_HOME
        self.assertEqual(where, ["common/vocab.py"])

    def test_guest_receives_common_and_guest_only(self) -> None:
        files = guest_files()
        self.assertEqual(files["pinlab/__init__.py"], GUEST_PACKAGE_INIT)
        tops = {rel.split("/")[1] for rel in files if rel.count("/") >= 2}
        self.assertEqual(tops, set(vocab.GUEST_SUBPACKAGES))
        for sub in vocab.GUEST_SUBPACKAGES:
            on_disk = sorted(str(p.relative_to(ROOT / sub)) for p in (ROOT / sub).rglob("*.py"))
            self.assertEqual(sorted(r.split("/", 2)[2] for r in files
                                    if r.startswith(f"pinlab/{sub}/")), on_disk)

    def test_guest_code_imports_only_stdlib_and_itself(self) -> None:
        allowed = {"pinlab", "pinlab.guest", "pinlab.common"}
        for sub in vocab.GUEST_SUBPACKAGES:
            for p in (ROOT / sub).rglob("*.py"):
                for node in ast.walk(ast.parse(p.read_text())):
                    names: list[str] = []
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.module:
                        names = [node.module]
                    for n in names:
                        if n.startswith("pinlab"):
                            self.assertIn(".".join(n.split(".")[:2]), allowed,
                                          f"{p.name} imports {n}")
                mod = ".".join(p.relative_to(ROOT / sub).with_suffix("").parts)
                importlib.import_module(f"pinlab.{sub}" + ("" if mod == "__init__" else
                                                           "." + mod.removesuffix(".__init__")))

    def test_guest_python_command(self) -> None:
        cmd = vocab.guest_python("kcheck", "hold", "pin it")
        self.assertTrue(cmd.startswith(f"env PYTHONPATH={vocab.GUEST_HOME} python3 -m "
                                       "pinlab.guest.kcheck "), cmd)
        self.assertTrue(cmd.endswith("hold 'pin it'"), cmd)


if __name__ == "__main__":
    unittest.main()
