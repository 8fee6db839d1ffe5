"""The reports of ``pinlab validate``, all written from its one source of truth,
``validate.json`` (the document ``validate.run_validate`` builds):

* ``summary.md``: base vs candidate, counts per result and per kernel-log signature, each
  cell that is not ``unchanged`` with its evidence; pasteable in a mailing-list reply;
* ``index.html``: base and candidate side by side, coloured by harm (harm.toml);
* ``junit.xml``: regression = failure, infra-error = error, flaky = skipped;
* ``ktap.txt``: KTAP version 1 (Documentation/dev-tools/ktap.rst);
* ``kcidb.json``: KCIDB I/O schema (kcidb-io, kcidb_io.schema.LATEST), validated before it
  is written.
"""

from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from .compare import RESULTS
from .harm import HarmTable
from .harm import load as load_harm

Doc = dict[str, Any]
RESULT_COLOUR = {"regression": "#e53935", "fix": "#43a047", "changed": "#1e88e5",
                 "unchanged": "#eeeeee", "flaky": "#8e24aa", "infra-error": "#b0bec5"}
ORIGIN = "pinlab"



def _dotted(r: dict[str, Any], first: str) -> str:
    """A result's cell as a dotted path from ``first`` ("mode" or "backing"):
    ``pin.anon.migrate`` or, with options, ``pin.anon.migrate.fast``."""
    parts = [r["mode"], r["backing"], r["event"]][["mode", "backing"].index(first):]
    return ".".join([*parts, *(str(r.get("options") or "").split("+") if r.get("options")
                                else [])])


def counts(doc: Doc) -> dict[str, int]:
    c = Counter(r["result"] for r in doc["results"])
    return {k: c.get(k, 0) for k in RESULTS}


def signature_counts(doc: Doc) -> dict[str, dict[str, list[int]]]:
    """Per kernel-log signature and side: [attempts that logged it, attempts], 0-day style
    (``WARNING:at_...`` | base 0/12 | candidate 9/12)."""
    out: dict[str, dict[str, list[int]]] = {}
    totals = {role: sum(len(r["attempts"][role]) for r in doc["results"])
              for role in ("base", "candidate")}
    for r in doc["results"]:
        for role in ("base", "candidate"):
            for a in r["attempts"][role]:
                for sig in a.get("signatures", {}):
                    row = out.setdefault(sig, {k: [0, totals[k]] for k in totals})
                    row[role][0] += 1
    return dict(sorted(out.items()))


def verdict_line(code: int) -> str:
    return {0: "no regression", 1: "REGRESSION", 2: "incomplete"}.get(code, f"exit {code}")


def _side(r: Doc, role: str) -> str:
    cls = r[role]
    if cls:
        return cls
    seen = Counter(a["observed"] for a in r["attempts"][role])
    return " / ".join(f"{k} x{n}" for k, n in seen.most_common()) or "-"


def _attempts_line(atts: list[Doc]) -> str:
    return ", ".join(f"#{a['n']} {a['observed']}" + ("*" if a.get("fresh") else "")
                     + (f" [{'; '.join(a['error_signatures'])}]" if a.get("error_signatures")
                        else "") for a in atts)


# ------------------------------------------------------------------------------ Markdown
def markdown(doc: Doc) -> str:
    b, c = doc["base"], doc["candidate"]
    n = counts(doc)
    lines = [f"pinlab validate: {c['label']} against {b['label']}", "",
             f"    base:      {b['label']}, kernel {b['kernel']}, {b.get('release') or '?'}",
             f"    candidate: {c['label']}, kernel {c['kernel']}, {c.get('release') or '?'}",
             f"    cells:     {len(doc['results'])} (tags: "
             f"{' OR '.join(doc['tags']) if doc['tags'] else 'all'}); a cell that differs "
             f"is re-run {doc['reruns']} times on freshly booted guests on both kernels",
             f"    verdict:   {verdict_line(doc['exit_code'])} (exit {doc['exit_code']}), "
             f"{doc['seconds']:.0f} s"]
    bc = doc.get("base_cache") or {}
    if bc.get("used"):
        lines.append(f"    base:      first pass from the cache ({bc['key']}, recorded "
                     f"{bc.get('recorded')} by {bc.get('run')}); reruns ran fresh")
    lines += ["", "| result | cells |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in n.items()]
    sigs = signature_counts(doc)
    lines += ["", "Kernel-log signatures (attempts that logged it / attempts):", ""]
    if sigs:
        lines += ["| signature | base | candidate |", "|---|---:|---:|"]
        lines += [f"| `{s}` | {v['base'][0]}/{v['base'][1]} | "
                  f"{v['candidate'][0]}/{v['candidate'][1]} |" for s, v in sigs.items()]
    else:
        lines.append("none on either kernel.")
    shown = [r for r in doc["results"] if r["result"] != "unchanged"]
    order = {k: i for i, k in enumerate(RESULTS)}
    if shown:
        lines += ["", "Cells that are not unchanged (* = on a freshly booted guest):"]
    for r in sorted(shown, key=lambda r: (order[r["result"]], r["cell"])):
        lines += ["", f"### {r['result']}: {r['cell']}", "",
                  f"    {_side(r, 'base')} -> {_side(r, 'candidate')}",
                  f"    {r['reason']}",
                  f"    base:      {_attempts_line(r['attempts']['base'])}",
                  f"    candidate: {_attempts_line(r['attempts']['candidate'])}"]
        exp = r.get("expected") or {}
        if exp.get("base") or exp.get("candidate"):
            lines.append(f"    expected:  base {exp.get('base')}, candidate "
                         f"{exp.get('candidate')} (orchestrator/data/expectations.toml)")
        facts = next((a.get("facts") for a in reversed(r["attempts"]["candidate"])
                      if a.get("facts")), None)
        if facts:
            lines.append(f"    candidate facts: {json.dumps(facts, default=str)[:400]}")
        for role in ("base", "candidate"):
            if r["attempts"][role]:
                lines.append(f"    {role + ' files:':16} "
                             f"{Path(r['attempts'][role][-1]['artifacts']).parent}/attempt-*")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ HTML
def html_page(doc: Doc, table: HarmTable) -> str:
    b, c = doc["base"], doc["candidate"]
    e = html.escape

    def cls_cell(r: Doc, role: str) -> str:
        atts = r["attempts"][role]
        name = r[role]
        try:
            colour = table.level(name).colour if name else "#ffffff"
        except ValueError:
            colour = "#ffffff"
        title = e("\n".join(f"#{a['n']} {a['why']}{' fresh' if a.get('fresh') else ''}: "
                            f"{a['observed']} {json.dumps(a.get('signatures') or {})}"
                            for a in atts))
        link = atts[-1]["artifacts"] if atts else ""
        return (f'<td style="background:{colour}" title="{title}">'
                f'<a href="file://{e(link)}">{e(_side(r, role))}</a>'
                f'<br><small>{len(atts)} attempt(s)</small></td>')

    n = counts(doc)
    out = ["<!doctype html><meta charset=utf-8>",
           f"<title>pinlab validate: {e(c['label'])} vs {e(b['label'])}</title>",
           "<style>td,th{border:1px solid #999;padding:4px;font:12px sans-serif;"
           "vertical-align:top}table{border-collapse:collapse}td a{color:inherit}"
           ".legend td{min-width:1em}</style>",
           f"<h1>pinlab validate: {verdict_line(doc['exit_code'])}</h1>",
           f"<p>base <b>{e(b['label'])}</b> ({e(str(b.get('release')))}) vs candidate "
           f"<b>{e(c['label'])}</b> ({e(str(c.get('release')))}); "
           f"{len(doc['results'])} cells, {doc['seconds']:.0f} s. "
           + ", ".join(f"{k} {v}" for k, v in n.items()) + "</p>",
           "<table class=legend><tr><th colspan=2>harm (orchestrator/data/harm.toml)</th></tr>"]
    for lv in (*table.levels, table.infra):
        rank = str(lv.harm) if lv.harm >= 0 else "-"
        out.append(f'<tr><td style="background:{lv.colour}"></td><td>{rank} {e(lv.name)}'
                   "</td></tr>")
    out += ["</table><p></p><table><tr><th>cell</th><th>base</th><th>candidate</th>"
            "<th>result</th><th>why</th></tr>"]
    order = {k: i for i, k in enumerate(RESULTS)}
    for r in sorted(doc["results"], key=lambda r: (order[r["result"]], r["cell"])):
        out.append(f"<tr><th>{e(r['cell'])}</th>{cls_cell(r, 'base')}"
                   f"{cls_cell(r, 'candidate')}"
                   f'<td style="background:{RESULT_COLOUR[r["result"]]}">'
                   f"<b>{e(r['result'])}</b></td><td>{e(r['reason'])}</td></tr>")
    out.append("</table>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ JUnit
def junit(doc: Doc) -> str:
    n = counts(doc)
    suite = ET.Element("testsuite", name="pinlab.validate", tests=str(len(doc["results"])),
                       failures=str(n["regression"]), errors=str(n["infra-error"]),
                       skipped=str(n["flaky"]), time=str(doc["seconds"]))
    props = ET.SubElement(suite, "properties")
    for role in ("base", "candidate"):
        ET.SubElement(props, "property", name=role,
                      value=f"{doc[role]['label']} {doc[role].get('release') or ''}".strip())
    for r in doc["results"]:
        secs = sum(a.get("wall_seconds") or 0 for role in ("base", "candidate")
                   for a in r["attempts"][role])
        tc = ET.SubElement(suite, "testcase", classname=f"pinlab.validate.{r['mode']}",
                           name=_dotted(r, "backing"), time=f"{secs:.2f}")
        msg = f"{r['result']}: {r['reason']}"
        if r["result"] == "regression":
            ET.SubElement(tc, "failure", message=msg, type="regression").text = msg
        elif r["result"] == "infra-error":
            ET.SubElement(tc, "error", message=msg, type="infra-error").text = msg
        elif r["result"] == "flaky":
            ET.SubElement(tc, "skipped", message=msg)
        ET.SubElement(tc, "system-out").text = (
            f"{msg}\nbase: {_attempts_line(r['attempts']['base'])}\n"
            f"candidate: {_attempts_line(r['attempts']['candidate'])}\n")
    ET.indent(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, "unicode") + "\n"


# ------------------------------------------------------------------------------ KTAP
def _ktap_text(s: str) -> str:
    return re.sub(r"[#\n]", " ", s)


def ktap(doc: Doc) -> str:
    """KTAP version 1: one test per cell. regression -> not ok; infra-error -> not ok with
    an ERROR directive; flaky -> ok # SKIP; the rest ok. Diagnostics before each line."""
    out = ["KTAP version 1",
           f"# pinlab validate: base {doc['base']['label']} ({doc['base'].get('release')}), "
           f"candidate {doc['candidate']['label']} ({doc['candidate'].get('release')})",
           f"1..{len(doc['results'])}"]
    for i, r in enumerate(doc["results"], 1):
        name = "pinlab." + _dotted(r, "mode")
        out.append(f"# {r['cell']}: {r['result']}: {_ktap_text(r['reason'])}")
        if r["result"] == "regression":
            out.append(f"not ok {i} {name}")
        elif r["result"] == "infra-error":
            out.append(f"not ok {i} {name} # ERROR {_ktap_text(r['reason'])}")
        elif r["result"] == "flaky":
            out.append(f"ok {i} {name} # SKIP flaky")
        else:
            out.append(f"ok {i} {name}")
    c = counts(doc)
    out.append("# " + ", ".join(f"{k}: {v}" for k, v in c.items()))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ KCIDB
KCIDB_STATUS = {"regression": "FAIL", "infra-error": "MISS", "flaky": "DONE",
                "fix": "PASS", "changed": "PASS", "unchanged": "PASS"}


def _kcidb_id(*parts: str) -> str:
    return f"{ORIGIN}:" + ":".join(re.sub(r"[^A-Za-z0-9_.-]", "_", p) for p in parts)


def kcidb(doc: Doc, run: str) -> dict[str, Any]:
    """The run as KCIDB I/O data (kcidb_io.schema.LATEST): a checkout and a build per
    kernel; per cell a test on each build. Candidate tests carry the comparison
    (regression FAIL, infra-error MISS, flaky DONE, others PASS); base tests are the
    reference measurement (DONE, or MISS without a usable attempt). Path
    ``pinlab.<mode>.<backing>.<event>[.<option>...]``; the classes and attempts go in ``misc``."""
    from kcidb_io.schema import LATEST

    data: dict[str, Any] = {"version": {"major": LATEST.major, "minor": LATEST.minor},
                            "checkouts": [], "builds": [], "tests": []}
    for role in ("base", "candidate"):
        s = doc[role]
        cid = _kcidb_id(run, role)
        data["checkouts"].append({
            "id": cid, "origin": ORIGIN, "start_time": doc["started"],
            "comment": s["label"], "misc": {"role": role, "kernel": s["kernel"],
                                            "source": s.get("source", {})}})
        data["builds"].append({
            "id": cid, "checkout_id": cid, "origin": ORIGIN, "architecture": "x86_64",
            "config_name": str(s.get("source", {}).get("kind", "unknown")),
            "comment": f"{s['label']} {s.get('release') or ''}".strip(), "status": "PASS",
            "misc": {"release": s.get("release")}})
    for r in doc["results"]:
        path = "pinlab." + _dotted(r, "mode")
        for role in ("base", "candidate"):
            atts = r["attempts"][role]
            if role == "candidate":
                status = KCIDB_STATUS[r["result"]]
            else:
                status = "DONE" if any(not a["infra"] for a in atts) else "MISS"
            data["tests"].append({
                "id": _kcidb_id(run, role, r["cell"]), "build_id": _kcidb_id(run, role),
                "origin": ORIGIN, "path": path, "status": status,
                "start_time": doc["started"],
                "duration": float(sum(a.get("wall_seconds") or 0 for a in atts)),
                "environment": {"comment": "QEMU TCG guest, pinlab vfio-user DMA device"},
                "comment": f"{r['result']}: {r['reason']}"[:1000],
                "misc": {"result": r["result"], "observed": r[role],
                         "attempts": [{"observed": a["observed"], "why": a["why"],
                                       "fresh": a.get("fresh"),
                                       "signatures": a.get("signatures", {})}
                                      for a in atts]}})
    LATEST.validate(data)      # raises jsonschema.ValidationError if not KCIDB
    return data


# ------------------------------------------------------------------------------ all
def write_all(doc: Doc, out: Path, table: HarmTable | None = None) -> dict[str, Path]:
    """Write every report into ``out``; returns {format: path}. Raises
    jsonschema.ValidationError if the KCIDB data does not validate."""
    table = table or load_harm()
    paths = {"json": out / "validate.json", "markdown": out / "summary.md",
             "html": out / "index.html", "junit": out / "junit.xml",
             "ktap": out / "ktap.txt", "kcidb": out / "kcidb.json"}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(doc))
    paths["html"].write_text(html_page(doc, table))
    paths["junit"].write_text(junit(doc))
    paths["ktap"].write_text(ktap(doc))
    paths["kcidb"].write_text(json.dumps(kcidb(doc, out.name), indent=2) + "\n")
    return paths
