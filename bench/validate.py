"""``pinlab bench validate``: what validating a one-file kernel patch costs a developer
whose base kernel is already built and whose base matrix results are already cached
(``orchestrator/basecache.py``), against a baseline measured in the same run.

In one run, one after another, each a separate ``pinlab`` process:

1. the baseline: ``pinlab matrix`` on the slice, on one kernel: Debian's prebuilt kernel of
   the base's release line (``--baseline-kernel``, default 6.12; ``pinlab matrix`` runs
   the Debian kernels, the built ones go through ``validate``). It is what running the
   slice once costs on this machine under this load;
2. if the base's results for the slice are not cached yet: ``pinlab validate`` once (the
   base runs and is stored): the figure ``validate_base_not_cached``;
3. ``pinlab validate --base SRC --patch P --tags SLICE`` with the base cached: the figure
   ``validate_base_cached``, whose goal is under 300 s (issue 9).

``--uncached`` also runs step 3 with ``--no-base-cache`` when step 2 was not needed.

Printed (``--json``: one object): one key per figure, each ``{"value", "baseline",
"ratio", "goal", "unit"}`` (ratio = value / baseline), plus the load average before and
after, the kernels, each run's exit code and result counts. ``one_file_rebuild`` is the
candidate's build time as ``kernel.json`` recorded it (``measured_here`` says whether that
build happened in this run; a built kernel is reused from the image cache, a tree costs
2.2 GB, so a bench does not rebuild one on purpose), against the base's cold build.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pinlab.images import kbuild, ksource
from pinlab.images.cache import Cache
from pinlab.orchestrator.artifacts import run_dir

PATCHES = Path(__file__).resolve().parent.parent / "tests" / "data" / "patches"
GOAL_S = 300.0


def _pinlab(args: list[str], log: Path) -> tuple[int, float]:
    """Run ``pinlab ARGS`` (this interpreter), output to ``log``: (exit code, wall s)."""
    env = dict(os.environ)
    for k in ("PINLAB_SHARD", "CI_NODE_INDEX", "CI_NODE_TOTAL", "JOB_COMPLETION_INDEX"):
        env.pop(k, None)
    t0 = time.monotonic()
    with log.open("wb") as fh:
        rc = subprocess.run([sys.executable, "-m", "pinlab.cli", *args], stdout=fh,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            check=False).returncode
    return rc, round(time.monotonic() - t0, 1)


def _validate(common: list[str], out: Path, extra: list[str] | None = None) -> dict[str, Any]:
    rc, wall = _pinlab(["validate", *common, *(extra or []), "--out", str(out)],
                       out.parent / f"{out.name}.log")
    try:
        doc = json.loads((out / "validate.json").read_text())
    except (OSError, ValueError):
        return {"rc": rc, "wall_s": wall, "error": f"no validate.json (see {out}.log)"}
    return {"rc": rc, "wall_s": wall, "validate_s": doc["seconds"],
            "results": dict(Counter(r["result"] for r in doc["results"])),
            "base_cache": doc.get("base_cache"), "out": str(out)}


def _figure(value: float | None, baseline: float | None, goal: float | None = None,
            **extra: Any) -> dict[str, Any]:
    ratio = round(value / baseline, 3) if value is not None and baseline else None
    return {"value": value, "baseline": baseline, "ratio": ratio, "goal": goal, "unit": "s",
            **extra}


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The benchmark; returns the JSON object described in the module docstring."""
    cache = Cache.default()
    src = ksource.parse_source(a.base, a.tree)
    cfg = kbuild.ConfigSpec(a.config)
    base_id = kbuild.kernel_id(cache, kbuild.BuildSpec(src, [], cfg))
    cand_spec = kbuild.BuildSpec(src, [Path(a.patch)], cfg)
    cand_id = kbuild.kernel_id(cache, cand_spec)
    cand_prebuilt = kbuild.is_built(cache, cand_id)
    out = run_dir("bench-validate")
    load0 = os.getloadavg()
    tags = [x for t in a.tags for x in ("--tags", t)]
    common = ["--base", a.base, *(["--tree", a.tree] if a.tree else []), "--patch", a.patch,
              "--config", a.config, "--reruns", str(a.reruns), *tags]

    m_rc, m_wall = _pinlab(["matrix", "--kernel", a.baseline_kernel, *tags, "--out",
                            str(out / "matrix")], out / "matrix.log")
    runs: dict[str, Any] = {"matrix": {"rc": m_rc, "wall_s": m_wall,
                                       "kernel": a.baseline_kernel}}
    first = _validate(common, out / "validate-1")
    runs["validate-1"] = first
    uncached = None
    if not (first.get("base_cache") or {}).get("used"):
        uncached, cached = first, _validate(common, out / "validate-2")
        runs["validate-2"] = cached
    else:
        cached = first
        if a.uncached:
            uncached = _validate(common, out / "validate-nocache", ["--no-base-cache"])
            runs["validate-nocache"] = uncached
    meta = kbuild.kernel_meta(cache, cand_id) if kbuild.is_built(cache, cand_id) else {}
    base_meta = kbuild.kernel_meta(cache, base_id) if kbuild.is_built(cache, base_id) else {}

    def total(m: dict[str, Any]) -> float | None:
        d = m.get("durations_s") or {}
        return d.get("total")

    figures = {
        "validate_base_cached": _figure(
            cached["wall_s"], m_wall, GOAL_S,
            base_cache_used=bool((cached.get("base_cache") or {}).get("used"))),
        "validate_base_not_cached": _figure(uncached["wall_s"] if uncached else None,
                                            m_wall),
        "cached_vs_not_cached": _figure(cached["wall_s"],
                                        uncached["wall_s"] if uncached else None),
        "one_file_rebuild": _figure(total(meta), total(base_meta),
                                    measured_here=not cand_prebuilt),
    }
    return {"load": {"before": list(load0), "after": list(os.getloadavg())},
            "slice": a.tags, "base": {"source": a.base, "id": base_id},
            "candidate": {"patch": a.patch, "id": cand_id}, "figures": figures,
            "runs": runs, "out": str(out)}


def table(res: dict[str, Any]) -> str:
    lines = [f"load average before {res['load']['before']}, after {res['load']['after']}",
             f"slice {' OR '.join(res['slice'])}; base {res['base']['id']}, candidate "
             f"{res['candidate']['id']} ({res['candidate']['patch']})",
             f"{'figure':<26} {'value s':>9} {'baseline s':>11} {'ratio':>7} {'goal s':>7}"]
    for name, f in res["figures"].items():
        def s(x: Any, fmt: str) -> str:
            return format(x, fmt) if x is not None else "-"
        lines.append(f"{name:<26} {s(f['value'], '9.1f')} {s(f['baseline'], '11.1f')} "
                     f"{s(f['ratio'], '7.3f')} {s(f['goal'], '7.0f')}")
    for name, r in res["runs"].items():
        lines.append(f"{name}: exit {r['rc']}, {r['wall_s']} s"
                     + (f", {r['results']}" if r.get("results") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pinlab bench validate")
    p.add_argument("--base", default="debian:6.12")
    p.add_argument("--tree")
    p.add_argument("--config", default="small")
    p.add_argument("--patch", default=str(PATCHES / "6.12-gup-comment-only.patch"),
                   help="the one-file patch (default: the comment-only mm/gup.c patch)")
    p.add_argument("--tags", action="append",
                   help="the slice (default: mode:longterm,backing:ext4)")
    p.add_argument("--baseline-kernel", default="6.12",
                   help="the Debian kernel `pinlab matrix` runs the slice on (the baseline)")
    p.add_argument("--reruns", type=int, default=3)
    p.add_argument("--uncached", action="store_true",
                   help="also time validate with --no-base-cache if the base was cached")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.tags = a.tags or ["mode:longterm,backing:ext4"]
    try:
        res = run(a)
    except (ksource.KernelSourceError, FileNotFoundError) as exc:
        print(f"pinlab bench validate: {exc}", file=sys.stderr)
        return 2
    Path(res["out"], "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
