"""``pinlab merge DIR... --out DIR``: one verdicts.json, JUnit file and HTML grid from the
output directories of ``pinlab matrix --shard I/N`` runs.

It refuses (``MergeError``, naming the directories) when the shards do not belong to one
run: different pinlab versions or commits, expectations tables, kernels or selections
(kernels, tags, shard total); a shard given twice; a shard missing; or a shard whose cells
are not the ones ``shard.select_cells`` gives that shard of that selection (the split
changed, or files were mixed up). A directory of an unsharded run merges as shard 1/1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .shard import Shard, select_cells
from .verdicts import FORMAT, cell_of, counts, document, write_all

IDENTITY = ("pinlab", "expectations", "kernels")


class MergeError(ValueError):
    """The shards cannot be merged; the message says which and why."""


def load_shard(d: Path) -> dict[str, Any]:
    """``d/verdicts.json`` as written by ``pinlab matrix``. Raises MergeError if it is absent,
    not JSON, or not this format."""
    f = d / "verdicts.json"
    try:
        doc = json.loads(f.read_text())
    except FileNotFoundError:
        raise MergeError(f"{d}: no verdicts.json (not a pinlab matrix output directory, or "
                         "the shard did not finish)") from None
    except json.JSONDecodeError as exc:
        raise MergeError(f"{f}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise MergeError(f"{f}: format {got!r}, expected {FORMAT!r} (written by another "
                         "pinlab version)")
    return doc


def _shard_of(doc: dict[str, Any]) -> Shard:
    s = doc["selection"].get("shard")
    return Shard(int(s["index"]), int(s["total"])) if s else Shard(1, 1)


def _same(field: str, docs: list[tuple[Path, dict[str, Any]]], value: Any) -> None:
    groups: dict[str, list[str]] = {}
    for d, doc in docs:
        groups.setdefault(json.dumps(value(doc), sort_keys=True), []).append(str(d))
    if len(groups) > 1:
        lines = "\n".join(f"  {v}: {', '.join(ds)}" for v, ds in groups.items())
        raise MergeError(f"the shards come from different {field}:\n{lines}")


def check(docs: list[tuple[Path, dict[str, Any]]]) -> Shard:
    """Check that the shards are the complete set of one run; returns the total as
    ``Shard(total, total)``. Raises MergeError naming what differs, what is duplicated,
    what is missing."""
    if not docs:
        raise MergeError("no shard directories given")
    _same("pinlab versions", docs, lambda doc: doc["pinlab"])
    _same("expectations tables (sha256)", docs, lambda doc: doc["expectations"])
    for k in sorted({k for _, doc in docs for k in doc["kernels"]}):
        # a shard records only the kernels it ran; those that ran one must agree on it
        _same(f"builds of kernel {k} (release and image keys)",
              [(d, doc) for d, doc in docs if k in doc["kernels"]],
              lambda doc, k=k: doc["kernels"][k])
    _same("selections (kernels, tags, shard total)", docs, lambda doc: (
        doc["selection"]["kernels"], doc["selection"]["tags"], _shard_of(doc).total))
    total = _shard_of(docs[0][1]).total
    seen: dict[int, list[str]] = {}
    for d, doc in docs:
        seen.setdefault(_shard_of(doc).index, []).append(str(d))
    dup = {i: ds for i, ds in seen.items() if len(ds) > 1}
    if dup:
        raise MergeError("shard given more than once: " + "; ".join(
            f"{i}/{total} in {', '.join(ds)}" for i, ds in sorted(dup.items())))
    missing = [i for i in range(1, total + 1) if i not in seen]
    if missing:
        raise MergeError(f"shards missing: {', '.join(f'{i}/{total}' for i in missing)} "
                         f"(have {', '.join(f'{i}/{total}' for i in sorted(seen))})")
    sel = docs[0][1]["selection"]
    for d, doc in docs:
        shard = _shard_of(doc)
        want = [c.name for c in select_cells(sel["kernels"], sel["tags"] or None,
                                             shard if shard.total > 1 else None).cells]
        if doc["cells"] != want:
            extra = sorted(set(doc["cells"]) - set(want))
            lack = sorted(set(want) - set(doc["cells"]))
            raise MergeError(f"{d}: shard {shard} holds other cells than this pinlab gives "
                             f"that shard ({len(lack)} missing, e.g. {lack[:3]}; {len(extra)} "
                             f"extra, e.g. {extra[:3]})")
        ids = [cell_of(v).name for v in doc["verdicts"]]
        if ids != doc["cells"]:
            raise MergeError(f"{d}: its verdicts do not match its cell list")
    return Shard(total, total)


def merge(dirs: list[Path], out: Path) -> dict[str, Any]:
    """Merge the shard directories into ``out`` (verdicts.json, junit.xml, html/), cells in
    shard order. Returns the merged document. Raises MergeError (see ``check``)."""
    docs = [(d, load_shard(d)) for d in dirs]
    check(docs)
    docs.sort(key=lambda x: _shard_of(x[1]).index)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = []
    for d, doc in docs:
        for v in doc["verdicts"]:
            v = dict(v)
            art = v.get("artifacts")
            if art and not Path(art).is_absolute():   # relative to the shard's directory
                v["artifacts"] = os.path.relpath(d.resolve() / art, out.resolve())
            verdicts.append(v)
    first = docs[0][1]
    sel = first["selection"]
    cells = [c for _, doc in docs for c in doc["cells"]]
    merged = document(verdicts, [cell_of(v) for v in verdicts],
                      {"kernels": sel["kernels"], "tags": sel["tags"], "shard": None,
                       "selected": sel["selected"]},
                      {k: v for _, doc in docs for k, v in doc["kernels"].items()},
                      out / "verdicts.json", pinlab=first["pinlab"],
                      expectations=first["expectations"])
    merged["shards"] = [{"dir": str(d), **doc["selection"]} for d, doc in docs]
    assert merged["cells"] == cells
    write_all(merged, out)
    return merged


def main(dirs: list[str], out: str) -> int:
    """CLI: 0 if every merged cell matched, 1 if any did not, 2 if the merge was refused."""
    from rich.console import Console

    console = Console()
    try:
        doc = merge([Path(d) for d in dirs], Path(out))
    except MergeError as exc:
        console.print(f"[red]pinlab merge: refused:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    n = counts(doc["verdicts"])
    console.print(f"merged {len(doc['shards'])} shards, {len(doc['cells'])} cells: "
                  f"{n['match']} match, {n['mismatch']} mismatch, {n['error']} error\n"
                  f"verdicts: {Path(out) / 'verdicts.json'}\njunit:    {Path(out) / 'junit.xml'}"
                  f"\nhtml:     {Path(out) / 'html' / 'index.html'}", highlight=False,
                  soft_wrap=True)
    return 0 if n["mismatch"] == n["error"] == 0 else 1
