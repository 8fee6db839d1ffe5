"""A run's verdicts as files that stand alone: ``verdicts.json``, ``junit.xml`` and
``html/index.html``, for a whole run, one shard of it, or shards merged.

``verdicts.json`` is an object::

    {"format": "pinlab-verdicts/2",
     "pinlab": {"version": "0.1.0", "commit": "<git HEAD or null>"},
     "expectations": "<sha256 of expectations.toml>",
     "kernels": {"6.12": {"release": "...", "kernel": "<image key>", "kmod": "<key>"}},  # ran
     "selection": {"kernels": [...], "tags": [...], "shard": {"index": 1, "total": 3} | null,
                   "selected": <cells in the whole selection>},
     "shards": [<the selections merged>]       # merged files only
     "cells": ["6.12/pin/anon/dma-write", ...],  # this file's cells, in run order
     "verdicts": [{"kernel", "mode", "backing", "event", "options", "expected", "observed",
                   "verdict": "match" | "mismatch" | "error", "source", "evidence",
                   "seconds", "artifacts": <path relative to this file's directory>, ...}]}

Every id in ``cells`` has exactly one verdict; a cell Avocado never reported gets verdict
``error`` with observed ``MISSING`` (KCIDB's MISS: the harness did not run it).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from .expectations import Cell

FORMAT = "pinlab-verdicts/2"
REPO = Path(__file__).resolve().parent.parent


def cell_of(v: dict[str, Any]) -> Cell:
    """The cell a verdict entry is about. Raises KeyError if a field is missing."""
    return Cell(str(v["kernel"]), str(v["mode"]), str(v["backing"]), str(v["event"]),
                str(v.get("options") or ""))


def pinlab_identity() -> dict[str, str | None]:
    """The installed pinlab's version and, in a git checkout, its commit (``-dirty`` when
    tracked files differ from it)."""
    try:
        version = metadata.version("pinlab")
    except metadata.PackageNotFoundError:
        version = "unknown"
    commit = None
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=False)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD"],
                                   capture_output=True, check=False).returncode != 0
            commit = head.stdout.strip() + ("-dirty" if dirty else "")
    return {"version": version, "commit": commit}


def expectations_hash() -> str:
    """SHA-256 of the expectations table the verdicts were judged against."""
    data = resources.files("pinlab.orchestrator").joinpath(
        "data", "expectations.toml").read_bytes()
    return hashlib.sha256(data).hexdigest()


def kernel_identity(kernel: str) -> dict[str, Any]:
    """What a kernel's verdicts came from: its release and the cache manifest's keys of its
    kernel image and pinlab.ko (``images/cache.py``)."""
    from pinlab.images.cache import Cache

    cache = Cache.default()
    entry = cache.entry(f"kernel-{kernel}") or {}
    kmod = cache.entry(f"kmod-{kernel}") or {}
    return {"release": entry.get("release"), "kernel": entry.get("key"),
            "kmod": kmod.get("key")}


def missing_verdict(cell: Cell, reason: str) -> dict[str, Any]:
    """The verdict entry of a cell that never reported: ``error``, observed ``MISSING``."""
    return {"kernel": cell.kernel, "mode": cell.mode, "backing": cell.backing,
            "event": cell.event, "options": cell.options, "expected": "?",
            "observed": "MISSING", "verdict": "error",
            "source": "", "evidence": {"reason": reason}, "artifacts": None}


def document(verdicts: list[dict[str, Any]], cells: list[Cell], selection: dict[str, Any],
             kernels: dict[str, Any], out_file: Path,
             pinlab: dict[str, str | None] | None = None,
             expectations: str | None = None) -> dict[str, Any]:
    """The verdicts.json object for ``cells`` (one verdict each, in ``cells`` order; cells
    without one get a MISSING error). Artifact paths are made relative to ``out_file``'s
    directory when they lie under it."""
    by_id = {cell_of(v).name: v for v in verdicts}
    rows = []
    for c in cells:
        v = dict(by_id.get(c.name) or missing_verdict(c, "Avocado reported no result"))
        art = v.get("artifacts")
        if art and Path(art).is_absolute():
            rel = os.path.relpath(art, out_file.parent)
            v["artifacts"] = rel if not rel.startswith("..") else str(art)
        rows.append(v)
    return {"format": FORMAT, "pinlab": pinlab or pinlab_identity(),
            "expectations": expectations or expectations_hash(), "kernels": kernels,
            "selection": selection, "cells": [c.name for c in cells], "verdicts": rows}


def counts(verdicts: list[dict[str, Any]]) -> dict[str, int]:
    """How many verdicts are ``match``, ``mismatch`` and ``error``."""
    return {k: sum(v["verdict"] == k for v in verdicts) for k in ("match", "mismatch", "error")}


def write_junit(doc: dict[str, Any], path: Path) -> Path:
    """JUnit XML: one testsuite per kernel, one testcase per cell (``<failure>`` for a
    mismatch, ``<error>`` for an error), as GitLab's ``reports:junit`` and GitHub test
    reporters read it."""
    root = ET.Element("testsuites", name="pinlab matrix")
    suites: dict[str, ET.Element] = {}
    for v in doc["verdicts"]:
        suite = suites.get(v["kernel"])
        if suite is None:
            suite = suites[v["kernel"]] = ET.SubElement(root, "testsuite",
                                                        name=f"pinlab.{v['kernel']}")
        case = ET.SubElement(suite, "testcase", classname=f"pinlab.{v['kernel']}",
                             name=cell_of(v).short,
                             time=f"{float(v.get('seconds') or 0):.2f}")
        if v["verdict"] != "match":
            tag = "failure" if v["verdict"] == "mismatch" else "error"
            el = ET.SubElement(case, tag, type=str(v["observed"]),
                               message=f"expected {v['expected']}, observed {v['observed']}")
            el.text = json.dumps(v.get("evidence"), default=str)[:4000]
        if v.get("artifacts"):
            ET.SubElement(case, "system-out").text = f"artifacts: {v['artifacts']}"
    for suite in [root, *suites.values()]:
        cases = suite.iter("testcase")
        rows = list(cases)
        suite.set("tests", str(len(rows)))
        suite.set("failures", str(sum(c.find("failure") is not None for c in rows)))
        suite.set("errors", str(sum(c.find("error") is not None for c in rows)))
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _order(values: set[str], preferred: list[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(values, key=lambda v: (rank.get(v, len(rank)), v))


def write_html(verdicts: list[dict[str, Any]], d: Path, base: Path | None = None) -> Path:
    """The matrix as a grid: rows event x backing, columns mode x kernel with the modes in
    the order of the story (gup, pin, longterm, odp). Each cell is coloured by the harm of
    its observed class (harm.toml, with a legend); a mismatch with its expectation gets a
    thick red frame and the expected class, an infrastructure error a dashed frame, and a
    cell seen more than once with different classes (repeated or merged runs) is marked
    flaky. Relative artifact paths (merged shards) are taken relative to ``base`` (default:
    ``d``'s parent). Returns the page's path."""
    from pinlab.images.kernel import KERNELS

    from .cells import MODES, pairs
    from .harm import load as load_harm

    base = d.parent if base is None else base
    table = load_harm()
    d.mkdir(parents=True, exist_ok=True)
    kernels = _order({v["kernel"] for v in verdicts}, list(KERNELS))
    modes = _order({v["mode"] for v in verdicts}, MODES)
    cols = [(m, k) for m in modes for k in kernels
            if any(v["mode"] == m and v["kernel"] == k for v in verdicts)]
    pair_rank = {(e, b): i for i, (b, e) in enumerate(pairs())}
    # a row per event variant (event and options) and backing
    rows = sorted({(cell_of(v).variant, v["backing"]) for v in verdicts},
                  key=lambda r: (pair_rank.get((r[0].partition("+")[0], r[1]), len(pair_rank)),
                                 r))
    by: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for v in verdicts:
        by.setdefault((cell_of(v).variant, v["backing"], v["mode"], v["kernel"]), []).append(v)
    n = counts(verdicts)
    summary = ", ".join(f"{k} {n[k]}" for k in ("match", "mismatch", "error"))
    flaky = sum(len({v["observed"] for v in vs}) > 1 for vs in by.values())
    out = ["<!doctype html><meta charset=utf-8><title>pinlab matrix</title>",
           "<style>td,th{border:1px solid #999;padding:4px;font:12px sans-serif}"
           "table{border-collapse:collapse}td a{color:inherit}"
           "td.mismatch{outline:3px solid #d50000;outline-offset:-3px}"
           "td.error{outline:2px dashed #263238;outline-offset:-3px}"
           "td.flaky{background-image:repeating-linear-gradient(45deg,transparent 0 6px,"
           "rgba(0,0,0,.18) 6px 8px)}</style>",
           f"<h1>pinlab matrix</h1><p>{len(verdicts)} cells: {summary}, flaky {flaky}. "
           "Rows: event × backing; columns: mode × kernel. Colour: the harm of the observed "
           "class; hover a cell for its name (KERNEL/MODE/BACKING/EVENT, for <code>pinlab up "
           "--cell</code>) and source; click for artifacts.</p>",
           "<table><tr><th>colour</th><th>harm (orchestrator/data/harm.toml)</th></tr>"]
    for lv in (*table.levels, table.infra):
        rank = str(lv.harm) if lv.harm >= 0 else "-"
        out.append(f'<tr><td style="background:{lv.colour}"></td><td>{rank} '
                   f"{html.escape(lv.name)}</td></tr>")
    out += ['<tr><td class="mismatch"></td><td>mismatch: observed ≠ expected (✗)</td></tr>',
            '<tr><td class="error"></td><td>error: the experiment did not run</td></tr>',
            '<tr><td class="flaky"></td><td>flaky: different classes in repeated runs (≈)'
            "</td></tr></table><p></p>", "<table><tr><th></th>"]
    out += [f"<th>{html.escape(m)}<br>{html.escape(k)}</th>" for m, k in cols]
    out.append("</tr>")
    for ev, b in rows:
        out.append(f"<tr><th>{html.escape(ev)}<br>{html.escape(b)}</th>")
        for m, k in cols:
            vs = by.get((ev, b, m, k))
            if not vs:
                out.append("<td></td>")
                continue
            v = vs[-1]
            try:
                lv = table.level(str(v["observed"]))
            except ValueError:
                lv = table.infra
            marks = [] if v["verdict"] == "match" else [v["verdict"]]
            observed = list(dict.fromkeys(str(x["observed"]) for x in vs))
            if len(observed) > 1:
                marks.append("flaky")
            text = "<br>≈ ".join(html.escape(o) for o in observed)
            if v["verdict"] == "mismatch":
                text += f"<br>✗ expected {html.escape(str(v['expected']))}"
            fg = "#fff" if lv.harm >= 5 else "#000"
            name = cell_of(v).name
            title = html.escape(f"{name}\ndebug by hand: pinlab up --cell {name}\n{lv.name}\n"
                                f"{v.get('source', '')}\n{json.dumps(v.get('evidence'))[:600]}")
            art = v.get("artifacts")
            href = ("" if not art else Path(art).resolve().as_uri() if Path(art).is_absolute()
                    else os.path.relpath(base / art, d))
            out.append(f'<td class="{" ".join(marks)}" style="background-color:{lv.colour};'
                       f'color:{fg}" title="{title}"><a href="{html.escape(href)}">'
                       f'{text}</a></td>')
        out.append("</tr>")
    out.append("</table>")
    page = d / "index.html"
    page.write_text("\n".join(out) + "\n")
    return page


def write_all(doc: dict[str, Any], out: Path) -> tuple[Path, Path, Path]:
    """Write ``out/verdicts.json``, ``out/junit.xml`` and ``out/html/index.html``."""
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "verdicts.json"
    jpath.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return jpath, write_junit(doc, out / "junit.xml"), write_html(doc["verdicts"], out / "html")
