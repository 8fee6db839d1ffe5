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
     "verdicts": [{"kernel", "mode", "backing", "event", "expected", "observed",
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
    return Cell(str(v["kernel"]), str(v["mode"]), str(v["backing"]), str(v["event"]))


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
            "event": cell.event, "expected": "?", "observed": "MISSING", "verdict": "error",
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
                             name=f"{v['mode']}/{v['backing']}/{v['event']}",
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


def write_html(verdicts: list[dict[str, Any]], d: Path, base: Path | None = None) -> Path:
    """The grid: rows event × backing, columns mode × kernel, coloured by verdict. Relative
    artifact paths are taken relative to ``base`` (default: ``d``'s parent)."""
    base = d.parent if base is None else base
    d.mkdir(parents=True, exist_ok=True)
    cols = sorted({(v["mode"], v["kernel"]) for v in verdicts})
    rows = sorted({(v["event"], v["backing"]) for v in verdicts})
    by = {(v["event"], v["backing"], v["mode"], v["kernel"]): v for v in verdicts}
    colour = {"match": "#c8efc8", "mismatch": "#f7b2b2", "error": "#f3d58a"}
    n = counts(verdicts)
    summary = ", ".join(f"{k} {n[k]}" for k in ("match", "mismatch", "error"))
    out = ["<!doctype html><meta charset=utf-8><title>pinlab matrix</title>",
           "<style>td,th{border:1px solid #999;padding:4px;font:12px sans-serif}"
           "table{border-collapse:collapse}td a{color:inherit}</style>",
           f"<h1>pinlab matrix</h1><p>{len(verdicts)} cells: {summary}. Rows: event × backing;"
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
            art = v.get("artifacts")
            href = ("" if not art else Path(art).resolve().as_uri() if Path(art).is_absolute()
                    else os.path.relpath(base / art, d))
            out.append(f'<td style="background:{colour.get(v["verdict"], "#ddd")}" '
                       f'title="{title}"><a href="{html.escape(href)}">'
                       f'{html.escape(str(v["observed"]))}</a>{mark}</td>')
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
