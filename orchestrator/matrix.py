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
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pinlab.images.build import ensure_images
from pinlab.images.kbuild import is_kernel_id
from pinlab.images.kernel import KERNELS

from . import poolclient
from .artifacts import run_dir
from .avocadojob import Job, run_concurrently, run_one

REPO = Path(__file__).resolve().parent.parent
TASKS_PER_KERNEL = 2
DEFAULT_KERNELS = list(KERNELS)
console = Console()


def matrix_jobs(kernels: list[str], tags: list[str] | None, out: Path,
                references: list[str] | None = None) -> list[Job]:
    """One Avocado job per kernel. ``tags`` are avocado tag filters: each may be a
    comma-separated AND; repeated ones are ORed, as with ``avocado run --filter-by-tags``.
    Two tasks per job: while one cell runs in the guest, avocado starts the next cell's
    test process, which then waits for the pool."""
    return [Job(f"kernel {k}", out / f"kernel-{k}", references or [str(REPO / "tests/matrix")],
                tags=[f"matrix,kernel:{k}" + (f",{t}" if t else "") for t in (tags or [""])],
                parallel_tasks=TASKS_PER_KERNEL) for k in kernels]


def run_avocado(kernels: list[str], tags: list[str] | None, out: Path,
                references: list[str] | None = None,
                concurrent: bool = True) -> list[Job]:
    """Run the kernels' jobs (at the same time unless ``concurrent`` is false)."""
    jobs = matrix_jobs(kernels, tags, out, references)
    poolclient.stop_all(kernels)  # a pool left by an older run may hold older code
    try:
        if concurrent:
            run_concurrently(jobs)
        else:
            for job in jobs:
                run_one(job)
    finally:
        poolclient.stop_all(kernels)
    return jobs


def collect(results: list[Path]) -> list[dict[str, Any]]:
    verdicts = []
    tests = [t for r in results for t in json.loads(r.read_text()).get("tests", [])]
    for t in tests:
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
               json_out: str | None = None, html_dir: str | None = None,
               concurrent: bool = True) -> int:
    names = list(dict.fromkeys(kernels or DEFAULT_KERNELS))
    for k in names:
        if k not in KERNELS and not is_kernel_id(k):
            raise SystemExit(f"pinlab: unknown kernel {k!r} (known: {', '.join(KERNELS)})")
        ensure_images(k)
    out = run_dir("matrix")
    t0 = time.monotonic()
    jobs = run_avocado(names, tags, out, concurrent=concurrent)
    results = [r for r in (j.results() for j in jobs) if r]
    for j in jobs:
        if j.results() is None:
            console.print(f"[red]{j.name}: avocado wrote no results (exit {j.rc})[/]")
    if not results:
        return 1
    verdicts = collect(results)
    report(verdicts, out, json_out, html_dir, time.monotonic() - t0)
    bad = [v for v in verdicts if v["verdict"] != "match"]
    if not verdicts:
        console.print("[red]no cell matched the filters[/]")
    failed_jobs = [j for j in jobs if j.rc != 0 or j.results() is None]
    return 1 if bad or not verdicts or failed_jobs else 0
