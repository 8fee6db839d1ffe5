"""``pinlab bench shards``: what more warm guests and more machines would gain, measured in
one run on one slice.

Runs ``pinlab matrix`` on the slice, each run a separate process with its own pools, one
after another: the default guest plan (the baseline), the same with ``--jobs J`` for each
``--jobs`` value, then the slice's ``N`` shards (``--shard i/N``, as N machines would run
them, but here in turn), and ``pinlab merge`` of the shards. Prints each run's matrix time
and its ratio to the baseline, whether the merged verdicts equal the baseline's cell for
cell, the host's load average, and the speed-up N machines would give: measured (baseline
/ slowest shard) and from the fit ``T = F + n·c`` (fixed cost F, per-cell cost c) to the
baseline and the mean shard. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pinlab.orchestrator.artifacts import run_dir


def _matrix(out: Path, pools: Path, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PINLAB_POOL_DIR": str(pools)}
    for k in ("PINLAB_SHARD", "CI_NODE_INDEX", "CI_NODE_TOTAL", "JOB_COMPLETION_INDEX"):
        env.pop(k, None)
    t0 = time.monotonic()
    with (out.parent / f"{out.name}.log").open("wb") as log:
        rc = subprocess.run([sys.executable, "-m", "pinlab.cli", "matrix", *args, "--out",
                             str(out)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL, check=False).returncode
    wall = time.monotonic() - t0
    doc = json.loads((out / "verdicts.json").read_text())
    return {"rc": rc, "wall_s": round(wall, 1), "matrix_s": doc["selection"]["seconds"],
            "cells": len(doc["cells"]), "guests": doc["selection"]["guests"],
            "outcome": {c: (v["observed"], v["verdict"])
                        for c, v in zip(doc["cells"], doc["verdicts"], strict=True)}}


def run(slice_args: list[str], shards: int, jobs: list[int], out: Path) -> dict[str, Any]:
    """Returns ``{"load": [before, after], "runs": {name: {...}}, "merge_equal": bool,
    "speedup": {...}}``; times in seconds."""
    pools = Path(tempfile.mkdtemp(prefix="pinlab-bench-"))   # short socket paths
    load0 = os.getloadavg()
    try:
        runs: dict[str, dict[str, Any]] = {}
        runs["default"] = _matrix(out / "default", pools / "default", slice_args)
        for j in jobs:
            runs[f"jobs-{j}"] = _matrix(out / f"jobs-{j}", pools / f"jobs-{j}",
                                        [*slice_args, "--jobs", str(j)])
        names = [f"shard-{i}" for i in range(1, shards + 1)]
        for i, name in enumerate(names, 1):
            runs[name] = _matrix(out / name, pools / name,
                                 [*slice_args, "--shard", f"{i}/{shards}"])
    finally:
        shutil.rmtree(pools, ignore_errors=True)
    merged = subprocess.run([sys.executable, "-m", "pinlab.cli", "merge",
                             *[str(out / n) for n in names], "--out", str(out / "merged")],
                            capture_output=True, text=True, check=False)
    equal = False
    if merged.returncode in (0, 1):
        doc = json.loads((out / "merged" / "verdicts.json").read_text())
        equal = ({c: (v["observed"], v["verdict"]) for c, v in
                  zip(doc["cells"], doc["verdicts"], strict=True)}
                 == runs["default"]["outcome"])
    base = runs["default"]["matrix_s"]
    shard_t = [runs[n]["matrix_s"] for n in names]
    n_cells = runs["default"]["cells"]
    per_shard = n_cells / shards
    c = (base - statistics.mean(shard_t)) / (n_cells - per_shard) if shards > 1 else 0.0
    fixed = base - n_cells * c
    model = {n: round(base / (fixed + n_cells * c / n), 2) for n in (2, 3, 4, 6, 8, 10)}
    for r in runs.values():
        r["ratio"] = round(r["matrix_s"] / base, 3)
        r.pop("outcome")
    return {"load": [list(load0), list(os.getloadavg())], "runs": runs,
            "merge_rc": merged.returncode, "merge_equal": equal,
            "speedup": {"measured": round(base / max(shard_t), 2),
                        "fit": {"fixed_s": round(fixed, 1), "per_cell_s": round(c, 2)},
                        "model": model}}


def table(res: dict[str, Any]) -> str:
    lines = [f"load average before {res['load'][0]}, after {res['load'][1]}",
             f"{'run':<10} {'cells':>5} {'guests':<14} {'matrix s':>9} {'ratio':>6}"]
    for name, r in res["runs"].items():
        lines.append(f"{name:<10} {r['cells']:>5} {json.dumps(r['guests']):<14} "
                     f"{r['matrix_s']:>9.1f} {r['ratio']:>6.3f}")
    s = res["speedup"]
    lines += [f"merged shards equal the default run cell for cell: {res['merge_equal']} "
              f"(merge exit {res['merge_rc']})",
              f"speed-up on N machines, measured (default / slowest shard): {s['measured']}",
              f"fit T = F + n*c: F = {s['fit']['fixed_s']} s, c = {s['fit']['per_cell_s']} s;"
              " model: " + ", ".join(f"N={n}: {v}x" for n, v in s["model"].items())]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pinlab bench shards")
    ap.add_argument("--kernel", action="append", help="default: 6.12")
    ap.add_argument("--tags", action="append", help="default: mode:pin")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--jobs", type=int, action="append", default=[],
                    help="also run with this many warm guests (repeatable)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    slice_args = [a for k in (args.kernel or ["6.12"]) for a in ("--kernel", k)]
    slice_args += [a for t in (args.tags or ["mode:pin"]) for a in ("--tags", t)]
    out = run_dir("bench-shards")
    res = run(slice_args, args.shards, args.jobs, out)
    (out / "shards.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
