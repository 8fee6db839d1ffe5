"""``pinlab matrix``: run cells in one warm guest per kernel, judge, report.

Writes a verdict JSON (a list of cells with kernel, mode, backing, event, expected,
observed, verdict, evidence, artifacts), prints a table, and writes an HTML grid.
"""

from __future__ import annotations

import html
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pinlab.images.kernel import KERNELS

from .artifacts import run_dir
from .expectations import Cell, expect, load
from .scenario import SCENARIOS
from .session import GuestSession

MODES = ["gup", "pin", "longterm"]
BACKINGS = ["anon"]
DEFAULT_KERNELS = list(KERNELS)
console = Console()


@dataclass
class Verdict:
    kernel: str
    mode: str
    backing: str
    event: str
    expected: str
    observed: str
    verdict: str  # match | mismatch | error
    source: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    artifacts: str = ""
    seconds: float = 0.0


def cells_for(kernel: str, tags: list[str] | None) -> list[Cell]:
    cells = [Cell(kernel, m, b, e) for e in SCENARIOS for b in BACKINGS for m in MODES]
    for tag in tags or []:
        key, _, value = tag.partition(":")
        if key in ("mode", "backing", "event", "kernel") and value:
            cells = [c for c in cells if getattr(c, key) == value]
    return cells


def run_kernel(kernel: str, cells: list[Cell], out: Path) -> list[Verdict]:
    rules = load()
    verdicts: list[Verdict] = []
    gdir = out / kernel / "guest"
    try:
        with GuestSession.boot(kernel, gdir) as s:
            for cell in cells:
                exp = expect(cell, rules)
                art = out / kernel / cell.name.replace("/", "_")
                art.mkdir(parents=True, exist_ok=True)
                t0 = time.monotonic()
                try:
                    obs = SCENARIOS[cell.event](s, cell, art)
                    observed, evidence = obs.observed, obs.evidence
                except Exception as exc:  # noqa: BLE001 - a cell error is a verdict
                    observed = "ERROR"
                    evidence = {"exception": repr(exc), "trace": traceback.format_exc()}
                expected = exp.expected if exp else "UNKNOWN"
                verdict = ("error" if observed == "ERROR" or not exp
                           else "match" if observed == expected else "mismatch")
                v = Verdict(cell.kernel, cell.mode, cell.backing, cell.event, expected,
                            observed, verdict, exp.source if exp else "no rule", evidence,
                            str(art), round(time.monotonic() - t0, 2))
                (art / "verdict.json").write_text(json.dumps(asdict(v), indent=2))
                verdicts.append(v)
                console.print(f"  {cell.name}: {observed} ({verdict})")
    except Exception as exc:  # noqa: BLE001 - the guest failed: every unrun cell is an error
        done = {(v.mode, v.backing, v.event) for v in verdicts}
        for cell in cells:
            if (cell.mode, cell.backing, cell.event) not in done:
                verdicts.append(Verdict(cell.kernel, cell.mode, cell.backing, cell.event,
                                        "?", "ERROR", "error", "", {"guest": repr(exc)},
                                        str(gdir)))
        console.print(f"[red]kernel {kernel}: {exc}[/]")
    return verdicts


def write_html(verdicts: list[Verdict], d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cols = sorted({(v.mode, v.kernel) for v in verdicts})
    rows = sorted({(v.event, v.backing) for v in verdicts})
    by = {(v.event, v.backing, v.mode, v.kernel): v for v in verdicts}
    colour = {"match": "#c8efc8", "mismatch": "#f7b2b2", "error": "#f3d58a"}
    out = ["<!doctype html><meta charset=utf-8><title>pinlab matrix</title>",
           "<style>td,th{border:1px solid #999;padding:4px;font:13px sans-serif}"
           "table{border-collapse:collapse}</style><h1>pinlab matrix</h1>",
           f"<p>{len(verdicts)} cells: "
           + ", ".join(f"{k} {sum(v.verdict == k for v in verdicts)}"
                       for k in ("match", "mismatch", "error")) + "</p><table><tr><th></th>"]
    out += [f"<th>{html.escape(m)}<br>{html.escape(k)}</th>" for m, k in cols]
    out.append("</tr>")
    for ev, b in rows:
        out.append(f"<tr><th>{html.escape(ev)}<br>{html.escape(b)}</th>")
        for m, k in cols:
            v = by.get((ev, b, m, k))
            if not v:
                out.append("<td></td>")
                continue
            mark = "" if v.verdict == "match" else f" ✗ expected {html.escape(v.expected)}"
            out.append(f'<td style="background:{colour[v.verdict]}" title='
                       f'"{html.escape(v.source)}"><a href="file://{html.escape(v.artifacts)}">'
                       f"{html.escape(v.observed)}</a>{mark}</td>")
        out.append("</tr>")
    out.append("</table>")
    page = d / "index.html"
    page.write_text("\n".join(out))
    return page


def run_matrix(kernels: list[str] | None = None, tags: list[str] | None = None,
               json_out: str | None = None, html_dir: str | None = None) -> int:
    names = kernels or DEFAULT_KERNELS
    out = run_dir("matrix")
    verdicts: list[Verdict] = []
    t0 = time.monotonic()
    for k in names:
        if k not in KERNELS:
            raise SystemExit(f"pinlab: unknown kernel {k!r}")
        cells = cells_for(k, tags)
        console.print(f"[bold]kernel {k}[/]: {len(cells)} cells")
        verdicts += run_kernel(k, cells, out)
    table = Table(title=f"pinlab matrix ({time.monotonic() - t0:.0f}s)")
    for col in ("kernel", "mode", "backing", "event", "expected", "observed", "verdict"):
        table.add_column(col)
    for v in verdicts:
        style = {"match": "green", "mismatch": "red", "error": "yellow"}[v.verdict]
        table.add_row(v.kernel, v.mode, v.backing, v.event, v.expected, v.observed,
                      f"[{style}]{v.verdict}[/]")
    console.print(table)
    jpath = Path(json_out) if json_out else out / "verdicts.json"
    jpath.write_text(json.dumps([asdict(v) for v in verdicts], indent=2) + "\n")
    page = write_html(verdicts, Path(html_dir) if html_dir else out / "html")
    console.print(f"verdicts: {jpath}\nhtml: {page}\nartifacts: {out}")
    bad = [v for v in verdicts if v.verdict != "match"]
    return 1 if bad or not verdicts else 0
