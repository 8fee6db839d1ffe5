"""``pinlab matrix``: the scenario matrix as an Avocado job, judged and reported.

The cells are Avocado tests (``tests/matrix``, tags ``kernel:`` ``mode:`` ``backing:``
``event:`` ``smoke``) that run in one warm guest per kernel (``pool.py``). This runs the
job for the chosen kernels and tags, then writes a verdict JSON (one entry per cell with
kernel, mode, backing, event, expected, observed, verdict, evidence and its artifacts),
prints a table, and writes an HTML grid. Avocado's own results.json/results.xml stay in
the job directory.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pinlab.images.build import ensure_images
from pinlab.images.kernel import KERNELS

from . import pool
from .artifacts import run_dir

REPO = Path(__file__).resolve().parent.parent
DEFAULT_KERNELS = list(KERNELS)
console = Console()


def run_avocado(kernels: list[str], tags: list[str] | None, out: Path,
                references: list[str] | None = None) -> tuple[int, Path | None]:
    filters = [",".join(["matrix", f"kernel:{k}", *(tags or [])]) for k in kernels]
    cmd = [sys.executable, "-m", "avocado", "--config", str(REPO / "tests/avocado.conf"), "run",
           "--max-parallel-tasks", "1", "--job-results-dir", str(out), "--disable-sysinfo",
           *[f"--filter-by-tags={f}" for f in filters],
           *(references or [str(REPO / "tests/matrix")])]
    console.print("$ " + " ".join(cmd))
    pool.stop_all(kernels)  # a pool left by an older run may hold older code
    try:
        rc = subprocess.run(cmd, cwd=REPO, check=False).returncode
    finally:
        pool.stop_all(kernels)
    found = sorted(out.glob("job-*/results.json"))
    return rc, (found[-1] if found else None)


def collect(results: Path) -> list[dict[str, Any]]:
    verdicts = []
    for t in json.loads(results.read_text()).get("tests", []):
        logdir = Path(t.get("logdir", ""))
        vfile, cfile = logdir / "verdict.json", logdir / "cell.json"
        if vfile.exists():
            v = json.loads(vfile.read_text())
        else:
            cell = json.loads(cfile.read_text()) if cfile.exists() else {
                "kernel": "?", "mode": "?", "backing": "?", "event": str(t.get("id"))}
            v = {**cell, "expected": "?", "observed": "ERROR", "verdict": "error",
                 "evidence": {"avocado": t.get("status"), "reason": t.get("fail_reason")},
                 "artifacts": str(logdir)}
        v["test"] = t.get("id")
        v["status"] = t.get("status")
        verdicts.append(v)
    return verdicts


def write_html(verdicts: list[dict[str, Any]], d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cols = sorted({(v["mode"], v["kernel"]) for v in verdicts})
    rows = sorted({(v["event"], v["backing"]) for v in verdicts})
    by = {(v["event"], v["backing"], v["mode"], v["kernel"]): v for v in verdicts}
    colour = {"match": "#c8efc8", "mismatch": "#f7b2b2", "error": "#f3d58a"}
    counts = ", ".join(f"{k} {sum(v['verdict'] == k for v in verdicts)}"
                       for k in ("match", "mismatch", "error"))
    out = ["<!doctype html><meta charset=utf-8><title>pinlab matrix</title>",
           "<style>td,th{border:1px solid #999;padding:4px;font:12px sans-serif}"
           "table{border-collapse:collapse}td a{color:inherit}</style>",
           f"<h1>pinlab matrix</h1><p>{len(verdicts)} cells: {counts}. Rows: event × backing;"
           " columns: mode × kernel. Hover a cell for its source; click for artifacts.</p>",
           "<table><tr><th></th>"]
    out += [f"<th>{html.escape(m)}<br>{html.escape(k)}</th>" for m, k in cols]
    out.append("</tr>")
    for ev, b in rows:
        out.append(f"<tr><th>{html.escape(ev)}<br>{html.escape(b)}</th>")
        for m, k in cols:
            v = by.get((ev, b, m, k))
            if not v:
                out.append("<td></td>")
                continue
            mark = "" if v["verdict"] == "match" else \
                f"<br>✗ expected {html.escape(str(v['expected']))}"
            title = html.escape(f"{v.get('source', '')}\n{json.dumps(v.get('evidence'))[:600]}")
            out.append(f'<td style="background:{colour.get(v["verdict"], "#ddd")}" '
                       f'title="{title}"><a href="file://{html.escape(str(v["artifacts"]))}">'
                       f'{html.escape(str(v["observed"]))}</a>{mark}</td>')
        out.append("</tr>")
    out.append("</table>")
    page = d / "index.html"
    page.write_text("\n".join(out) + "\n")
    return page


def report(verdicts: list[dict[str, Any]], out: Path, json_out: str | None,
           html_dir: str | None, seconds: float) -> None:
    table = Table(title=f"pinlab matrix: {len(verdicts)} cells in {seconds:.0f}s")
    for col in ("kernel", "mode", "backing", "event", "expected", "observed", "verdict"):
        table.add_column(col)
    for v in verdicts:
        style = {"match": "green", "mismatch": "red"}.get(v["verdict"], "yellow")
        table.add_row(v["kernel"], v["mode"], v["backing"], v["event"], str(v["expected"]),
                      str(v["observed"]), f"[{style}]{v['verdict']}[/]")
    console.print(table)
    jpath = Path(json_out) if json_out else out / "verdicts.json"
    jpath.write_text(json.dumps(verdicts, indent=2, default=str) + "\n")
    page = write_html(verdicts, Path(html_dir) if html_dir else out / "html")
    console.print(f"verdicts: {jpath}\nhtml:     {page}\nartifacts: {out}")


def run_matrix(kernels: list[str] | None = None, tags: list[str] | None = None,
               json_out: str | None = None, html_dir: str | None = None) -> int:
    names = list(dict.fromkeys(kernels or DEFAULT_KERNELS))
    for k in names:
        if k not in KERNELS:
            raise SystemExit(f"pinlab: unknown kernel {k!r} (known: {', '.join(KERNELS)})")
        ensure_images(k)
    out = run_dir("matrix")
    t0 = time.monotonic()
    rc, results = run_avocado(names, tags, out)
    if results is None:
        console.print(f"[red]avocado wrote no results (exit {rc})[/]")
        return 1
    verdicts = collect(results)
    report(verdicts, out, json_out, html_dir, time.monotonic() - t0)
    bad = [v for v in verdicts if v["verdict"] != "match"]
    if not verdicts:
        console.print("[red]no cell matched the filters[/]")
    return 1 if bad or not verdicts or rc != 0 else 0
