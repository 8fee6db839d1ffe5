"""The Avocado side of the matrix: one test per cell, run in the kernel's warm guest pool.

The cells' tests are made from the event registry when they are needed, not written in a
file. ``tests/matrix/test_cells.py`` only calls :func:`cell_test_classes`, which makes one
``Kernel<k>`` class per kernel with one ``test_<mode>__<backing>__<event>`` method per cell
(what Avocado's runner imports). Avocado finds them through :class:`CellResolver`, a
resolver plugin (entry point ``avocado.plugins.resolver`` in pyproject.toml): for a
reference to that file (or to ``tests/matrix``, which Avocado expands to it), with or
without a ``:regex`` over ``Class.method``, it returns the cells' runnables with their tags
(:func:`~pinlab.orchestrator.cells.cell_tags`), so ``avocado run tests/matrix
--filter-by-tags=...``, ``pinlab matrix --tags`` and ``--shard`` select as before.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from avocado import Test
from avocado.core.extension_manager import PluginPriority
from avocado.core.nrunner.runnable import Runnable
from avocado.core.plugin_interfaces import Resolver
from avocado.core.references import reference_split
from avocado.core.resolver import (
    ReferenceResolution,
    ReferenceResolutionResult,
    get_file_assets,
)

from . import poolclient
from .expectations import INCONCLUSIVE, Cell, expect, load

#: The file the cells' tests live in (its Avocado test ids name it).
CELL_TESTS = Path(__file__).resolve().parent.parent / "tests" / "matrix" / "test_cells.py"


def judge(cell: Cell, result: dict[str, Any]) -> dict[str, Any]:
    exp = expect(cell, load())
    observed = str(result.get("observed", "ERROR"))
    expected = exp.expected if exp else "UNKNOWN"
    # INCONCLUSIVE (evidence missing) and a failed experiment are never a match or a
    # mismatch: the run could not tell, so the cell is an error
    verdict = ("error" if observed in ("ERROR", "KERNEL_ERROR") and expected != observed
               or observed.startswith(INCONCLUSIVE) or exp is None
               else "match" if exp.accepts(observed) else "mismatch")
    return {"kernel": cell.kernel, "mode": cell.mode, "backing": cell.backing,
            "event": cell.event, "options": cell.options, "expected": expected,
            "observed": observed,
            "verdict": verdict, "raced": bool(exp) and observed in exp.races,
            "source": exp.source if exp else "no rule",
            "evidence": result.get("evidence", {}), "seconds": result.get("seconds"),
            "release": result.get("release"), "guest": result.get("guest")}


class CellTest(Test):
    """:avocado: disable"""

    timeout = 900

    def cell(self, kernel: str, mode: str, backing: str, event: str, options: str = "") -> None:
        cell = Cell(kernel, mode, backing, event, options)
        art = Path(self.logdir) / "cell"
        (Path(self.logdir) / "cell.json").write_text(json.dumps(cell.__dict__))
        result = poolclient.run_cell(cell, art)
        v = judge(cell, result)
        v["artifacts"] = str(art)
        (Path(self.logdir) / "verdict.json").write_text(json.dumps(v, indent=2, default=str))
        self.whiteboard = json.dumps({k: v[k] for k in ("expected", "observed", "verdict")})
        self.log.info("cell %s: expected %s, observed %s (%s)", cell.name, v["expected"],
                      v["observed"], v["verdict"])
        self.log.info("evidence: %s", json.dumps(v["evidence"], default=str)[:4000])
        if v["verdict"] == "error":
            self.error(f"{cell.name}: {v['observed']} (expected {v['expected']}); "
                       f"evidence {json.dumps(v['evidence'], default=str)[:1500]}")
        if v["verdict"] == "mismatch":
            self.fail(f"{cell.name}: expected {v['expected']}, observed {v['observed']}; "
                      f"evidence {json.dumps(v['evidence'], default=str)[:1500]}")


def method_name(cell: Cell) -> str:
    """The cell's test ``Class.method``, e.g. ``Kernel6_12.test_pin__anon__dma_write``, with
    ``__<option>`` per option (``test_pin__anon__migrate__fast``)."""
    return (f"{class_name(cell.kernel)}.test_{_ident(cell.mode)}__{_ident(cell.backing)}__"
            f"{_ident(cell.event)}" + "".join(f"__{_ident(o)}" for o in cell.option_names))


def _ident(s: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in s)


def class_name(kernel: str) -> str:
    """The test class of a kernel's cells: ``Kernel6_12``."""
    return f"Kernel{_ident(kernel)}"


def _cell_method(cell: Cell) -> Any:
    def test(self: CellTest) -> None:
        self.cell(cell.kernel, cell.mode, cell.backing, cell.event, cell.options)

    test.__name__ = method_name(cell).split(".", 1)[1]
    test.__doc__ = f"Matrix cell {cell.name}."
    return test


def cell_test_classes(module: str) -> dict[str, type[CellTest]]:
    """One :class:`CellTest` subclass per kernel (``Kernel6_12``, ...) with one test method
    per cell of that kernel, for the module ``module`` (their ``__module__``, which
    Avocado's loader checks)."""
    from pinlab.images.kernel import KERNELS  # only here: a cell test need not import it

    from .cells import all_cells

    out: dict[str, type[CellTest]] = {}
    for kernel in KERNELS:
        body: dict[str, Any] = {"__module__": module,
                                "__doc__": f"Cells on kernel {kernel}."}
        for c in all_cells(kernel):
            fn = _cell_method(c)
            body[fn.__name__] = fn
        out[class_name(kernel)] = type(class_name(kernel), (CellTest,), body)
    return out


def tag_map(tags: list[str]) -> dict[str, set[str] | None]:
    """Avocado's form of a test's tags (as its docstring parser makes them):
    ``key:value`` -> ``{key: {value, ...}}``, a bare tag -> ``{tag: None}``."""
    out: dict[str, set[str] | None] = {}
    for t in tags:
        key, sep, val = t.partition(":")
        if sep:
            out[key] = (out.get(key) or set()) | {val}
        else:
            out[key] = None
    return out


def cell_runnables(module_path: str, pattern: str | None = None) -> list[Runnable]:
    """The avocado-instrumented runnables of every cell of every kernel (uri
    ``<module_path>:Kernel<k>.test_<mode>__<backing>__<event>``, tagged), in the matrix's
    order; with ``pattern``, only those whose ``Class.method`` it matches (``re.search``, as
    Avocado's own python resolver does)."""
    from pinlab.images.kernel import KERNELS

    from .cells import all_cells, cell_tags, smoke

    rx = re.compile(pattern) if pattern is not None else None
    out = []
    for kernel in KERNELS:
        cells = all_cells(kernel)
        smoke_set = smoke(cells)
        for c in cells:
            name = method_name(c)
            if rx is not None and not rx.search(name):
                continue
            out.append(Runnable("avocado-instrumented", f"{module_path}:{name}",
                                tags=tag_map(cell_tags(c, smoke_set)),
                                assets=get_file_assets(module_path)))
    return out


class CellResolver(Resolver):
    """Avocado resolver of the matrix's cells (see the module's docstring). Claims only
    references to :data:`CELL_TESTS`; anything else is NOTFOUND, for the next resolver."""

    name = "pinlab-matrix"
    description = "pinlab matrix cells, made from the event registry"
    priority = PluginPriority.VERY_HIGH

    def resolve(self, reference: str) -> ReferenceResolution:
        module_path, pattern = reference_split(reference)
        if not (os.path.isfile(module_path)
                and os.path.samefile(module_path, CELL_TESTS)):
            return ReferenceResolution(reference, ReferenceResolutionResult.NOTFOUND)
        runnables = cell_runnables(module_path, pattern)
        if not runnables:
            return ReferenceResolution(reference, ReferenceResolutionResult.NOTFOUND,
                                       info=f"no matrix cell matches {pattern!r}")
        return ReferenceResolution(reference, ReferenceResolutionResult.SUCCESS, runnables)
