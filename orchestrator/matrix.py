"""``pinlab matrix``: the scenario matrix as Avocado jobs, judged and reported.

The cells are Avocado tests (``tests/matrix``, tags ``kernel:`` ``mode:`` ``backing:``
``event:`` ``smoke``) that run in warm guests (``pool.py``). ``shard.select_cells`` picks
the cells (tag filters, then ``--shard I/N``), ``guests.plan_guests`` spreads them over
warm guests (one Avocado job per guest), and this writes ``verdicts.json``, ``junit.xml``
and an HTML grid (``verdicts.py``), and prints a table. Avocado's own
results.json/results.xml stay in each job's directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pinlab.images.build import ensure_images
from pinlab.images.kernel import KERNELS

from . import poolclient
from .artifacts import run_dir
from .avocadojob import Job, run_concurrently, run_one
from .cells import DEFAULT_FILTERS
from .celltest import CELL_TESTS, method_name
from .expectations import Cell
from .guests import GuestPlan, plan_guests
from .shard import Selection, Shard, select_cells
from .verdicts import document, kernel_identity, write_all
from .verdicts import write_html as write_html  # re-exported: callers used matrix.write_html

REPO = Path(__file__).resolve().parent.parent
TASKS_PER_KERNEL = 2
DEFAULT_KERNELS = list(KERNELS)
console = Console()


def references(cells: list[Cell] | tuple[Cell, ...]) -> list[str]:
    """Avocado references that resolve to exactly these cells' tests: one reference to the
    cells' test file with an anchored regex over ``Class.method`` (the pinlab-matrix
    resolver, celltest.CellResolver, matches it with ``re.search``, as Avocado's python
    resolver does)."""
    if not cells:
        return []
    names = sorted(re.escape(method_name(c)) for c in cells)
    return [f"{CELL_TESTS}:^({'|'.join(names)})$"]


def matrix_jobs(plan: GuestPlan, out: Path) -> list[Job]:
    """One Avocado job per warm guest, its test processes pointed at that guest's pool by
    ``PINLAB_POOL_SLOT``. Two tasks per job: while one cell runs in the guest, avocado
    starts the next cell's test process, which then waits for the pool."""
    return [Job(f"kernel {g.name}", out / f"kernel-{g.name}", references(g.cells),
                parallel_tasks=TASKS_PER_KERNEL,
                env={poolclient.SLOT_ENV: str(g.slot)}) for g in plan.slots]


def run_avocado(plan: GuestPlan, out: Path) -> list[Job]:
    """Run the plan's jobs, ``plan.concurrent`` at a time."""
    jobs = matrix_jobs(plan, out)
    kernels = list(plan.per_kernel())
    poolclient.stop_all(kernels)  # a pool left by an older run may hold older code
    try:
        if plan.concurrent == 1:
            for job in jobs:
                run_one(job)
        else:
            run_concurrently(jobs, limit=plan.concurrent)
    finally:
        poolclient.stop_all(kernels)
    return jobs


def collect(results: list[Path]) -> list[dict[str, Any]]:
    """Each cell test's verdict.json from Avocado's results.json files; a test that wrote
    none (it crashed, or timed out) becomes an ``error`` verdict with Avocado's status."""
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


def print_table(verdicts: list[dict[str, Any]], seconds: float) -> None:
    """One row per cell, coloured by verdict."""
    table = Table(title=f"pinlab matrix: {len(verdicts)} cells in {seconds:.0f}s")
    for col in ("kernel", "mode", "backing", "event", "expected", "observed", "verdict"):
        table.add_column(col)
    for v in verdicts:
        style = {"match": "green", "mismatch": "red"}.get(v["verdict"], "yellow")
        event = f"{v['event']}+{v['options']}" if v.get("options") else v["event"]
        table.add_row(v["kernel"], v["mode"], v["backing"], event, str(v["expected"]),
                      str(v["observed"]), f"[{style}]{v['verdict']}[/]")
    console.print(table)


def resolve_shard(text: str | None) -> Shard | None:
    """``--shard I/N`` if given, else the CI engine's variables (``Shard.from_env``)."""
    try:
        return Shard.resolve(text)
    except ValueError as exc:
        raise SystemExit(f"pinlab: {exc}") from None


def run_matrix(kernels: list[str] | None = None, tags: list[str] | None = None,
               json_out: str | None = None, html_dir: str | None = None,
               concurrent: bool = True, shard: Shard | None = None,
               jobs: int | None = None, out: Path | None = None,
               full: bool = False) -> int:
    """Run the selected cells (``shard.select_cells``) and write the verdicts.

    ``jobs``: total warm guests (default from the host, ``guests.plan_guests``);
    ``concurrent=False`` runs one guest at a time; ``out``: the output directory (default a
    fresh ``$PINLAB_RESULTS/matrix-*``). Without ``tags`` the cells are the default slice
    (``cells.DEFAULT_FILTERS``: the cells with options only as smoke cells) unless
    ``full``: every cell. Returns 0 when every cell matched (an empty shard
    included), 1 otherwise."""
    names = list(dict.fromkeys(kernels or DEFAULT_KERNELS))
    if not tags and not full:
        tags = list(DEFAULT_FILTERS)
    try:
        sel: Selection = select_cells(names, tags, shard)
        plan = plan_guests(list(sel.cells), jobs)
    except ValueError as exc:
        raise SystemExit(f"pinlab: {exc}") from None
    if not sel.selected:
        # (Avocado itself would only say "Test Suite could not be created")
        console.print(f"[red]pinlab: no matrix cell matches --tags {' OR '.join(tags or [])} "
                      f"on kernel {', '.join(names)}[/]; tags are kernel:K, mode:M, "
                      "backing:B, event:E and smoke (comma: AND, repeated --tags: OR, "
                      "-tag: NOT)")
        return 2
    used = list(dict.fromkeys(c.kernel for c in sel.cells))   # a shard may need fewer
    for k in used:
        ensure_images(k)
    if out is None:
        out = run_dir("matrix")
    out.mkdir(parents=True, exist_ok=True)
    if not concurrent:
        plan = GuestPlan(plan.slots, 1)
    where = f"shard {sel.shard}: " if sel.shard else ""
    console.print(f"{where}{len(sel.cells)} of {sel.selected} selected cells; guests "
                  f"{plan.per_kernel()} ({plan.concurrent} at a time)", highlight=False)
    t0 = time.monotonic()
    ran = run_avocado(plan, out) if plan.slots else []
    results = [r for r in (j.results() for j in ran) if r]
    for j in ran:
        if j.results() is None:
            console.print(f"[red]{j.name}: avocado wrote no results (exit {j.rc})[/]")
    seconds = time.monotonic() - t0
    doc = document(collect(results), list(sel.cells),
                   {**sel.describe(), "seconds": round(seconds, 1),
                    "guests": plan.per_kernel(), "host": os.uname().nodename},
                   {k: kernel_identity(k) for k in used}, out / "verdicts.json")
    verdicts = doc["verdicts"]
    print_table(verdicts, seconds)
    jpath, junit, page = write_all(doc, out)
    if json_out:
        shutil.copyfile(jpath, json_out)
    if html_dir:
        write_html(verdicts, Path(html_dir), base=out)
    console.print(f"verdicts: {jpath}\njunit:    {junit}\nhtml:     {page}\n"
                  f"artifacts: {out}")
    bad = [v for v in verdicts if v["verdict"] != "match"]
    failed_jobs = [j for j in ran if j.rc != 0 or j.results() is None]
    return 1 if bad or failed_jobs else 0
